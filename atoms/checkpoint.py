"""Training checkpoints: an SAE folder in the SAELens layout plus the trainer's state.

A checkpoint folder holds ``cfg.json``, ``sae_weights.safetensors`` and ``checksums.json``
(``atoms.sae_io``: SAELens tools load it as it is), ``trainer_state.pt`` (optimiser, data
position, RNG, history) and, written last, ``checkpoint.json`` (step and the state's sha256).
The folder is built under a temporary name and renamed into place, so a folder with that name
is always complete; loading re-checks every checksum.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from atoms.errors import InputError, TrainingDiverged
from atoms.io import code_version, file_sha256
from atoms.sae import SAEConfig, SparseAutoencoder
from atoms.sae_io import load_sae, save_sae

TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_JSON = "checkpoint.json"


def step_folder(root, step: int) -> Path:
    """``<root>/step_0001500`` for step 1500."""
    return Path(root) / f"step_{step:07d}"


def write_checkpoint(sae: SparseAutoencoder, payload: dict, folder, metadata: dict | None = None
                     ) -> Path:
    """Write ``sae`` and the ``Trainer.state_dict()`` payload to ``folder`` atomically.

    Refuses (TrainingDiverged) to write non-finite weights: the last checkpoint stays good.
    """
    folder = Path(folder)
    step = int(payload["state"]["step"])
    for name, p in sae.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingDiverged(f"training: non-finite {name} at step {step}; "
                                   "checkpoint not written", step=step)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_sae(sae, tmp, metadata)
        torch.save(payload, tmp / TRAINER_STATE)
        info = {"step": step, "trainer_state_sha256": file_sha256(tmp / TRAINER_STATE),
                "code_version": code_version(), "metadata": metadata or {}}
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(info, indent=1))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def checkpoint_step(folder) -> int:
    """The step recorded in ``folder/checkpoint.json``; InputError if it is missing or bad."""
    path = Path(folder) / CHECKPOINT_JSON
    try:
        return int(json.loads(path.read_text())["step"])
    except FileNotFoundError:
        raise InputError(f"{path}: missing (not a finished checkpoint)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def load_checkpoint(folder, expect: SAEConfig | None = None
                    ) -> tuple[SparseAutoencoder, dict]:
    """(SAE, trainer payload) from a checkpoint folder, every checksum and shape verified.

    ``expect``: the run's SAE config; a checkpoint of another architecture is an InputError.
    """
    folder = Path(folder)
    checkpoint_step(folder)
    info = json.loads((folder / CHECKPOINT_JSON).read_text())
    state = folder / TRAINER_STATE
    if not state.exists():
        raise InputError(f"{state}: missing")
    if file_sha256(state) != info.get("trainer_state_sha256"):
        raise InputError(f"{state}: sha256 does not match {folder / CHECKPOINT_JSON}")
    sae = load_sae(folder, expect)
    payload = torch.load(state, map_location="cpu", weights_only=True)
    return sae, payload


def find_checkpoints(root, pattern: str = "step_*") -> list[Path]:
    """Finished checkpoint folders under ``root`` matching ``pattern``, oldest step first."""
    root = Path(root)
    found = [p for p in root.glob(pattern) if (p / CHECKPOINT_JSON).exists()]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(root, keep: int) -> None:
    """Delete all but the newest ``keep`` finished checkpoints (and stale temporaries)."""
    for stale in Path(root).glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in find_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
