"""Training checkpoints: an SAE folder in the SAELens layout plus the trainer's state.

A checkpoint folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``atoms.sae.saelens``, the
SAELens layout), ``trainer_state.pt`` (optimiser, data position, RNG, history),
``checkpoint.json`` (step, metadata) and ``checksums.json`` over all of them. It is built under a
temporary name and renamed into place (``atomic_folder``), so a folder with that name is always
complete; loading re-checks every checksum.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from atoms.core.errors import InputError, TrainingDiverged
from atoms.core.io import atomic_folder, code_version
from atoms.sae.model import SAEConfig, SparseAutoencoder
from atoms.sae.saelens import load_sae, write_sae_files

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
    with atomic_folder(folder) as tmp:
        write_sae_files(sae, tmp, metadata, name=folder)
        torch.save(payload, tmp / TRAINER_STATE)
        info = {"step": step, "code_version": code_version(), "metadata": metadata or {}}
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(info, indent=1))
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
    state = folder / TRAINER_STATE
    sae = load_sae(folder, expect)  # verifies checksums.json, which lists trainer_state.pt
    if not state.exists():
        raise InputError(f"{state}: missing")
    payload = torch.load(state, map_location="cpu", weights_only=True)  # tensors and plain data
    return sae, payload


def find_checkpoints(root, pattern: str = "step_*") -> list[Path]:
    """Finished checkpoint folders under ``root`` matching ``pattern``, oldest step first."""
    root = Path(root)
    found = [p for p in root.glob(pattern) if (p / CHECKPOINT_JSON).exists()]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(root, keep: int) -> None:
    """Delete all but the newest ``keep`` finished checkpoints (and stale temporaries)."""
    for stale in [*Path(root).glob(".step_*.tmp"), *Path(root).glob(".step_*.old")]:
        shutil.rmtree(stale, ignore_errors=True)
    for old in find_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
