"""Native SAE checkpoints in the SAELens v6 folder layout, so SAELens can load them as-is.

A folder holds ``cfg.json`` (SAELens keys plus our ``"atoms"`` block), ``sae_weights.safetensors``
(W_enc, W_dec, b_enc, b_dec and, for JumpReLU, threshold), ``atoms_metric.safetensors`` when
S̃ ≠ I, ``atoms_whitening.safetensors`` for a checkpoint in the AIP geometry (the training
form; the final SAE is saved folded, ``SparseAutoencoder.folded``), and ``checksums.json``
(sha256 of every other file). The input scale s is folded into the saved weights so that they
work on raw inputs with SAELens's forward pass
(``sae_lens/saes/jumprelu_sae.py``, ``sae.py: process_sae_in``):

    pre' = (x − b_dec') W_enc + b_enc',  f' = pre'·1[pre' > θ'],  x̂ = f' W_dec + b_dec',
    b_enc' = b_enc/s,  b_dec' = b_dec/s,  θ' = θ/s   ⇒  pre' = pre/s,  f' = f/s (input units).

``load_sae`` undoes the fold (b·s, θ·s) and restores ``input_scale`` = s so training resumes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atoms.aip.metric import Whitening
from atoms.core.config import from_dict, to_dict
from atoms.core.errors import AtomsError, InputError
from atoms.core.io import CHECKSUMS, atomic_folder, code_version, file_sha256
from atoms.sae.model import SAEConfig, SparseAutoencoder, build_sae

log = logging.getLogger(__name__)

CFG, WEIGHTS, METRIC = "cfg.json", "sae_weights.safetensors", "atoms_metric.safetensors"
WHITENING = "atoms_whitening.safetensors"
# SAELens registry names (sae_lens/saes/{jumprelu,standard,topk}_sae.py: architecture()).
ARCHITECTURE = {"threshold": "jumprelu", "relu": "standard", "topk": "topk",
                "batchtopk": "batchtopk"}
KIND = {v: k for k, v in ARCHITECTURE.items()}
# Fields that define the architecture: a resumed run must agree on all of them.
ARCH_FIELDS = ("kind", "d_in", "d_sae", "sparsity_loss", "bias", "decoder_norm", "k", "geometry",
               "whitening")


def verify_checksums(folder: Path) -> None:
    """Raise InputError naming the first file whose sha256 differs from checksums.json."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder / CHECKSUMS}: missing or unreadable ({type(e).__name__})") \
            from None
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: listed in {CHECKSUMS} but missing")
        if file_sha256(path) != digest:
            raise InputError(f"{path}: sha256 differs from {CHECKSUMS} (truncated or corrupted)")


# -- tensor helpers shared with atoms.sae.formats -----------------------------------------------
def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or .npz file, as float32 torch tensors."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return {k: torch.from_numpy(np.asarray(data[k], np.float32)) for k in data.files}
        return {k: v.float() for k, v in load_file(path).items()}
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError, EOFError) as e:
        msg = " ".join(str(e).split())[:120]
        raise InputError(f"{path}: not a readable weights file ({msg})") from None


def take(tensors: dict, key: str, shape: tuple, path: Path, why: str) -> torch.Tensor:
    """tensors[key] checked for presence, ``shape`` and finiteness; errors name file and key."""
    if key not in tensors:
        raise InputError(f"{path}: missing tensor '{key}' (has {sorted(tensors)})")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"{path}: {key} has shape {tuple(t.shape)} but {why}")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{path}: {key} holds NaN/Inf")
    return t


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def field(cfg: dict, name: str, path: Path, kinds=(int,)):
    """cfg[name], required and of one of ``kinds``; the error names the file and field."""
    if name not in cfg:
        raise InputError(f"{path}: missing field '{name}'")
    value = cfg[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InputError(f"{path}: {name}={value!r} has the wrong type")
    return value


def unit_rows(w: torch.Tensor, atol: float = 1e-4) -> bool:
    return bool(((w.norm(dim=1) - 1).abs() < atol).all())


def assemble(cfg: SAEConfig, w_enc, w_dec, b_enc, b_dec, threshold=None, scale: float = 1.0):
    """An SAE of ``cfg`` whose raw-input forward is pre = (s·x − b_dec) W_enc + b_enc."""
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(b_dec)
        if threshold is not None:
            sae.threshold.copy_(threshold)
        sae.input_scale.fill_(scale)
    return sae


# -- save -----------------------------------------------------------------------------------
def _folded(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    s = float(sae.input_scale)
    b_dec = sae.b_dec.detach() if sae.cfg.bias else torch.zeros_like(sae.b_dec)
    out = {"W_enc": sae.W_enc.detach(), "W_dec": sae.W_dec.detach(),
           "b_enc": sae.b_enc.detach() / s, "b_dec": b_dec / s}
    if sae.cfg.kind in ("threshold", "batchtopk"):
        out["threshold"] = sae.threshold.detach() / s
    return {k: v.float().cpu().contiguous().clone() for k, v in out.items()}


def write_sae_files(sae: SparseAutoencoder, folder: Path, metadata: dict | None = None,
                    name: Path | None = None) -> None:
    """cfg.json, sae_weights.safetensors (and the metric) into an existing ``folder``; errors
    name ``name`` (the final folder) when given. Callers make it atomic (``atomic_folder``)."""
    s = float(sae.input_scale)
    folder, name = Path(folder), name or Path(folder)
    if not (np.isfinite(s) and s > 0):
        raise InputError(f"{name}: input_scale must be positive and finite, got {s}")
    if sae.cfg.kind == "threshold" and bool((sae.threshold < 0).any()):
        # SAELens gates on relu(θ); a negative θ would change its codes (call constrain_()).
        raise InputError(f"{name}: threshold has negative entries; SAELens clamps θ at 0")
    # SAELens v6 SAEConfig.to_dict keys (sae_lens/saes/sae.py); 'sae_lens_version' ≥ 6 stops
    # handle_config_defaulting (loading/pretrained_sae_loaders.py) from the pre-6 conversion.
    meta = {"sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0",
            "model_name": None, "hook_name": None, "hook_head_index": None, **(metadata or {})}
    cfg = {"architecture": ARCHITECTURE[sae.cfg.kind], "d_in": sae.cfg.d_in,
           "d_sae": sae.cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta}
    if sae.cfg.kind in ("topk", "batchtopk"):  # TopKSAEConfig fields (saes/topk_sae.py)
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    cfg["atoms"] = {"sae_config": to_dict(sae.cfg), "input_scale": s,
                    "code_version": code_version()}
    if getattr(sae, "trained_geometry", None):
        cfg["atoms"]["trained_geometry"] = sae.trained_geometry  # folded from this geometry
    metric = sae.metric.detach().float().cpu()
    (folder / CFG).write_text(json.dumps(cfg, indent=1) + "\n")
    save_file(_folded(sae), folder / WEIGHTS)
    if not torch.equal(metric, torch.eye(sae.cfg.d_in)):
        save_file({"metric": metric.contiguous()}, folder / METRIC)
    if sae.whiten is not None:
        save_file({"whiten": sae.whiten.cpu().contiguous(), "unwhiten": sae.unwhiten.cpu()
                   .contiguous(), "centre": sae.centre.cpu().contiguous()}, folder / WHITENING)


def save_sae(sae: SparseAutoencoder, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write ``sae`` to ``folder`` atomically in the SAELens layout; returns the folder."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        write_sae_files(sae, tmp, metadata, name=folder)
    return folder


# -- load -----------------------------------------------------------------------------------
def read_sae_cfg(folder: str | Path) -> dict:
    """The parsed cfg.json of an SAE folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected {CFG} + {WEIGHTS})")
    return read_json(folder / CFG)


def _config(raw: dict, path: Path) -> tuple[SAEConfig, float]:
    """(SAEConfig, input scale) from our 'atoms' block, or inferred for a plain SAELens cfg."""
    arch = raw.get("architecture", "standard")  # pre-6 default (handle_pre_6_0_config)
    act = raw.get("activation_fn", raw.get("activation_fn_str"))
    if act == "topk" and "k" not in raw:  # pre-6 topk: activation_fn_kwargs.k
        arch, raw = "topk", {**raw, "k": (raw.get("activation_fn_kwargs") or {}).get("k")}
    if arch not in KIND:
        raise InputError(f"{path}: architecture={arch!r} is not one of {sorted(KIND)}")
    d_in, d_sae = field(raw, "d_in", path), field(raw, "d_sae", path)
    try:
        if "atoms" not in raw:
            k = field(raw, "k", path) if arch in ("topk", "batchtopk") else 0
            cfg = SAEConfig(d_in=d_in, d_sae=d_sae, kind=KIND[arch], k=k, decoder_norm="none")
            return cfg, 1.0
        block = raw["atoms"]
        cfg = from_dict(SAEConfig, block["sae_config"], "atoms.sae_config")
        scale = float(block["input_scale"])
    except (AtomsError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None
    said = {"architecture": arch, "d_in": d_in, "d_sae": d_sae}
    mine = {"architecture": ARCHITECTURE[cfg.kind], "d_in": cfg.d_in, "d_sae": cfg.d_sae}
    for name, value in said.items():
        if value != mine[name]:
            raise InputError(f"{path}: {name}={value!r} disagrees with atoms.sae_config")
    if not (np.isfinite(scale) and scale > 0):
        raise InputError(f"{path}: atoms.input_scale must be positive and finite, got {scale}")
    return cfg, scale


def _check_expect(cfg: SAEConfig, expect: SAEConfig, path: Path) -> None:
    for name in ARCH_FIELDS:
        got, want = getattr(cfg, name), getattr(expect, name)
        if name == "k" and not {"topk", "batchtopk"} & {cfg.kind, expect.kind}:
            continue
        if got != want:
            raise InputError(f"{path}: {name}={got!r} but the run expects {name}={want!r}")


def load_sae(folder: str | Path, expect: SAEConfig | None = None) -> SparseAutoencoder:
    """Read an SAE folder (ours or plain SAELens) into an SAE with the input scale unfolded.

    ``sae.provenance`` says which it got: ``layout`` 'atoms' (our cfg.json with its ``atoms``
    block: the exact SAEConfig and input scale) or 'saelens' (a plain SAELens folder; SAELens
    drops the ``atoms`` block and the metric file when it re-saves one of ours, so the config
    is inferred and the input scale is 1), whether an AIP ``metric`` file was there, and the
    SAELens ``metadata`` (model, hook, context size, dataset).
    """
    folder = Path(folder)
    raw = read_sae_cfg(folder)
    ours = "atoms" in raw
    if ours or (folder / CHECKSUMS).exists():
        verify_checksums(folder)
    cfg_path, w_path = folder / CFG, folder / WEIGHTS
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):  # SAELens SAEConfig.__post_init__ lists the modes
        raise InputError(f"{cfg_path}: normalize_activations={norm!r} is not supported "
                         "(fold the scaling into the weights first)")
    cfg, s = _config(raw, cfg_path)
    tensors = read_tensors(w_path)
    if "log_threshold" in tensors and "threshold" not in tensors:  # old SAELens training SAEs
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    scaling = tensors.pop("scaling_factor", None)  # pre-6 SAELens finetuning scale
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise InputError(f"{w_path}: scaling_factor is not all ones (finetuning scale unsupported)")
    d, n = cfg.d_in, cfg.d_sae
    why = f"{CFG} says d_in={d}, d_sae={n}"
    w_enc = take(tensors, "W_enc", (d, n), w_path, why)
    w_dec = take(tensors, "W_dec", (n, d), w_path, why)
    b_enc = take(tensors, "b_enc", (n,), w_path, why)
    b_dec = take(tensors, "b_dec", (d,), w_path, why)
    gated = cfg.kind in ("threshold", "batchtopk")
    theta = take(tensors, "threshold", (n,), w_path, why) if gated else None
    if not ours:
        if not raw.get("apply_b_dec_to_input", True):  # their pre = x W_enc + b_enc
            b_enc = b_enc + b_dec @ w_enc
        if cfg.kind == "topk" and raw.get("rescale_acts_by_decoder_norm", False):
            norms = w_dec.norm(dim=1)  # topk on pre·‖d‖, decode f/‖d‖ (topk_sae.py)
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
        if theta is not None:
            theta = theta.clamp_min(0)  # SAELens gates on relu(θ): exact for θ < 0 too
        if unit_rows(w_dec):
            cfg.decoder_norm = "euclidean"
        cfg.bias = bool(b_enc.any() or b_dec.any())
    if expect is not None:
        _check_expect(cfg, expect, cfg_path)
    theta = None if theta is None else theta * s
    sae = assemble(cfg, w_enc, w_dec, b_enc * s, b_dec * s, theta, s)
    has_metric = (folder / METRIC).exists()
    if has_metric:
        metric = take(read_tensors(folder / METRIC), "metric", (d, d), folder / METRIC, why)
        sae.metric.copy_(metric)
    if cfg.geometry == "aip":
        w = read_tensors(folder / WHITENING)
        shapes = {"whiten": (d, d), "unwhiten": (d, d), "centre": (d,)}
        sae.set_whitening(Whitening(*(take(w, k, v, folder / WHITENING, why)
                                      for k, v in shapes.items())))
    elif "trained_geometry" in raw.get("atoms", {}):
        sae.trained_geometry = raw["atoms"]["trained_geometry"]
    sae.provenance = {"layout": "atoms" if ours else "saelens", "metric": has_metric,
                      "metadata": raw.get("metadata") or {}}
    if not ours:
        log.info("%s: a plain SAELens folder (no atoms block; re-saved by SAELens?): input "
                 "scale 1, architecture read from its cfg.json, %s", folder,
                 "AIP metric file found" if has_metric else "no AIP metric")
    return sae
