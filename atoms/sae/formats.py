"""Other SAE layouts: sparsify (export + import), SAELens, Gemma Scope and Llama Scope imports.

Every import rebuilds the foreign forward pass exactly with our
pre = (s·x − b_dec) W_enc + b_enc, codes = act(pre), x̂ = (codes W_dec + b_dec)/s, folding
whatever the format does differently into the weights; what cannot be folded is an InputError
naming the field. The source of each format rule is cited where it is used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from atoms.aip.r2 import r2_scores
from atoms.core.errors import ConfigError, InputError
from atoms.core.io import CHECKSUMS, atomic_folder
from atoms.core.validation import as_rows, check_finite
from atoms.sae.model import SAEConfig, SparseAutoencoder, ThresholdSAE, TopKSAE
from atoms.sae.saelens import (
    CFG,
    WEIGHTS,
    assemble,
    field,
    load_sae,
    read_json,
    read_tensors,
    take,
    unit_rows,
    verify_checksums,
)


def _cfg(path: Path, **kwargs) -> SAEConfig:
    try:
        return SAEConfig(**kwargs)
    except ConfigError as e:
        raise InputError(f"{path}: {e}") from None


# -- sparsify (EleutherAI/sparsify: sparsify/sparse_coder.py, config.py, fused_encoder.py) -----
# cfg.json = SparseCoderConfig.to_dict() + d_in; sae.safetensors keys encoder.weight (N, d),
# encoder.bias (N,), W_dec (N, d), b_dec (d,) [+ W_skip (d, d) with skip_connection].
# encode: pre = ReLU((x − b_dec) encoder.weightᵀ + encoder.bias), top-k of pre;
# decode: x̂ = Σ top_acts · W_dec[top_indices] + b_dec.
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
APPROXIMATION = "atoms_approximation.json"
"""Written beside a sparsify export that approximates a threshold or ReLU SAE by TopK."""
_SPARSIFY_UNSUPPORTED = ("transcode", "skip_connection", "embed_skip", "gram_lookup")


def export_sparsify(sae: SparseAutoencoder, folder: str | Path,
                    approximate_with_topk: int | None = None, sample=None) -> Path:
    """Write ``sae`` as a sparsify TopK coder: exactly for a TopK SAE (its own k).

    Folds s as for SAELens: encoder.bias = b_enc/s, b_dec' = b_dec/s, so ReLU+top-k selects
    the same latents (pre' = pre/s) and x̂ is unchanged. A threshold or ReLU SAE is not a TopK
    coder (its gate is a threshold, not a count): it is exported only when the caller asks for
    the approximation TopK_k(ReLU(pre)) with ``approximate_with_topk=k`` and passes ``sample``
    rows, on which the active-set agreement and the R² change are measured, printed and written
    to ``atoms_approximation.json``.
    """
    folder = Path(folder)
    kind, n_latents = sae.cfg.kind, sae.cfg.d_sae
    if kind == "topk":
        k = sae.cfg.k
    elif approximate_with_topk is None:
        raise InputError(f"{folder}: a {kind} SAE is not a TopK coder, and sparsify's layout "
                         "would drop its thresholds; pass approximate_with_topk=k and sample= "
                         "rows to export a measured approximation")
    else:
        k = approximate_with_topk
    if not isinstance(k, int) or not 1 <= k <= n_latents:
        raise InputError(f"{folder}: approximate_with_topk={k!r} must be an integer in "
                         f"[1, d_sae={n_latents}]")
    approximation = None
    if kind != "topk":
        if sample is None:
            raise InputError(f"{folder}: approximate_with_topk needs sample= rows to measure "
                             "the approximation on")
        approximation = topk_approximation(sae, sample, k)
        print(f"sparsify export of a {kind} SAE as TopK k={k}: "
              f"{approximation['active_set_kept']:.1%} of {approximation['rows']} rows keep "
              f"their active set (mean Jaccard {approximation['active_set_jaccard']:.3f}); "
              f"R² {approximation['r2_original']:.4f} → {approximation['r2_topk']:.4f}")
    s = float(sae.input_scale)
    d, n = sae.cfg.d_in, sae.cfg.d_sae
    b_dec = sae.b_dec.detach() if sae.cfg.bias else torch.zeros(d)
    tensors = {"encoder.weight": sae.W_enc.detach().T, "encoder.bias": sae.b_enc.detach() / s,
               "W_dec": sae.W_dec.detach(), "b_dec": b_dec / s}
    cfg = {"activation": "topk", "expansion_factor": max(1, n // d),
           "normalize_decoder": sae.cfg.decoder_norm == "euclidean", "num_latents": n, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}
    with atomic_folder(folder) as tmp:
        (tmp / SPARSIFY_CFG).write_text(json.dumps(cfg, indent=1) + "\n")
        if approximation is not None:
            (tmp / APPROXIMATION).write_text(json.dumps(approximation, indent=1) + "\n")
        save_file({key: v.float().contiguous() for key, v in tensors.items()},
                  tmp / SPARSIFY_WEIGHTS)
    return folder


@torch.no_grad()
def topk_approximation(sae: SparseAutoencoder, sample, k: int) -> dict:
    """How far TopK_k(ReLU(pre)) is from ``sae`` on ``sample`` rows (input units): the fraction
    of rows whose active set is unchanged, the mean Jaccard of the active sets, and the
    centred Euclidean R² of both reconstructions."""
    x = as_rows(sample, "sample", d=sae.cfg.d_in).float()
    check_finite(x, "sample")
    codes, pre = sae.encode(x)
    values, index = torch.relu(pre).topk(k, dim=-1)
    approx = torch.zeros_like(pre).scatter(-1, index, values)
    a, b = codes != 0, approx != 0
    union = (a | b).sum(1).clamp_min(1)
    return {"k": k, "rows": len(x), "active_set_kept": float((a == b).all(1).float().mean()),
            "active_set_jaccard": float(((a & b).sum(1) / union).mean()),
            "r2_original": r2_scores(x, sae.decode(codes))["euclid_centred"],
            "r2_topk": r2_scores(x, sae.decode(approx))["euclid_centred"]}


def import_sparsify(folder: str | Path) -> TopKSAE:
    """A sparsify TopK coder folder (cfg.json + sae.safetensors) as a TopKSAE."""
    folder = Path(folder)
    cfg_path, w_path = folder / SPARSIFY_CFG, folder / SPARSIFY_WEIGHTS
    raw = read_json(cfg_path)
    if (folder / CHECKSUMS).exists():  # written by export_sparsify
        verify_checksums(folder)
    if raw.get("activation", "topk") != "topk":  # 'groupmax' picks one latent per group
        raise InputError(f"{cfg_path}: activation={raw['activation']!r} is not supported")
    for name in _SPARSIFY_UNSUPPORTED:
        if raw.get(name):
            raise InputError(f"{cfg_path}: {name}=true cannot be represented by a TopK SAE")
    d, k = field(raw, "d_in", cfg_path), field(raw, "k", cfg_path)
    n = field(raw, "num_latents", cfg_path) if raw.get("num_latents") else \
        d * field(raw, "expansion_factor", cfg_path)  # SparseCoder.__init__
    tensors = read_tensors(w_path)
    if "W_skip" in tensors:
        raise InputError(f"{w_path}: W_skip (skip connection) cannot be represented")
    why = f"{SPARSIFY_CFG} says d_in={d}, num_latents={n}"
    enc = take(tensors, "encoder.weight", (n, d), w_path, why)
    b_enc = take(tensors, "encoder.bias", (n,), w_path, why)
    w_dec = take(tensors, "W_dec", (n, d), w_path, why)
    b_dec = take(tensors, "b_dec", (d,), w_path, why)
    cfg = _cfg(cfg_path, d_in=d, d_sae=n, kind="topk", k=k,
               decoder_norm="euclidean" if unit_rows(w_dec) else "none")
    return assemble(cfg, enc.T, w_dec, b_enc, b_dec)


# -- SAELens -----------------------------------------------------------------------------------
def import_saelens(folder: str | Path) -> SparseAutoencoder:
    """A SAELens folder (jumprelu / standard / topk) — ``load_sae`` without an atoms block."""
    return load_sae(folder)


# -- Gemma Scope -------------------------------------------------------------------------------
# params.npz keys W_enc (d, N), W_dec (N, d), b_enc, b_dec, threshold (Gemma Scope tutorial
# JumpReLUSAE; SAELens loading/pretrained_sae_loaders.py: gemma_2_sae_huggingface_loader, which
# also maps lower-case 'w_' keys as in Gemma Scope 2 params.safetensors). Forward:
# pre = x W_enc + b_enc (b_dec not subtracted: apply_b_dec_to_input=False),
# f = 1[pre > θ]·ReLU(pre), x̂ = f W_dec + b_dec.
def import_gemma_scope(path: str | Path) -> ThresholdSAE:
    """A Gemma Scope ``params.npz`` (or safetensors with the same keys, or their folder)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("params.npz", "params.safetensors") if (path / n).exists()]
        if not found:
            raise InputError(f"{path}: no params.npz or params.safetensors")
        path = found[0]
    raw = read_tensors(path)
    tensors = {("W_" + key[2:] if key.startswith("w_") else key): v for key, v in raw.items()}
    if "affine_skip_connection" in tensors:
        raise InputError(f"{path}: affine_skip_connection (transcoder) cannot be represented")
    if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
        raise InputError(f"{path}: missing 2-D tensor 'W_enc' (has {sorted(tensors)})")
    d, n = tensors["W_enc"].shape
    why = f"W_enc has shape ({d}, {n})"
    w_enc = take(tensors, "W_enc", (d, n), path, why)
    w_dec = take(tensors, "W_dec", (n, d), path, why)
    b_enc = take(tensors, "b_enc", (n,), path, why)
    b_dec = take(tensors, "b_dec", (d,), path, why)
    theta = take(tensors, "threshold", (n,), path, why)
    cfg = _cfg(path, d_in=d, d_sae=n, decoder_norm="euclidean" if unit_rows(w_dec) else "none")
    # Our pre subtracts b_dec first, so b_enc' = b_enc + b_dec W_enc; 1[pre>θ]·ReLU(pre) equals
    # pre·1[pre > max(θ, 0)], so θ' = max(θ, 0) is exact even for negative θ.
    return assemble(cfg, w_enc, w_dec, b_enc + b_dec @ w_enc, b_dec, theta.clamp_min(0))


# -- Llama Scope (OpenMOSS lm-saes) ------------------------------------------------------------
# hyperparams.json = lm-saes SAEConfig; checkpoints/final.safetensors keys encoder.weight
# (N, d), encoder.bias, decoder.weight (d, N), decoder.bias (lm-saes src/lm_saes/sae.py,
# SparseAutoEncoder). encode: x̃ = f_in·x [− b_D if apply_decoder_bias_to_pre_encoder],
# h = x̃ Eᵀ + b_E, mask = 1[m·h > θ] with m = ‖decoder column‖ if sparsity_include_decoder_norm
# else 1, codes = h·mask; decode: x̂ = (codes Dᵀ + b_D)/f_out, f = √d_model / norm (dataset-wise).
# 'inference' mode first applies what lm-saes's Initializer does for state='inference'
# (initializer.py): standardize_parameters_of_dataset_norm (b_E/f_in, b_D/f_out, D·f_in/f_out,
# no input scaling), then transform_to_unit_decoder_norm (D/n, E·n, b_E·n) when
# sparsity_include_decoder_norm; θ is left unchanged. SAELens's llama_scope loader instead
# gates pre > θ·√d/norm_in without the decoder norm (see the report in tests/test_formats.py).
LLAMA_HP, LLAMA_WEIGHTS = "hyperparams.json", ("checkpoints/final.safetensors", "final.safetensors")


def _llama_norms(hp: dict, tensors: dict, hp_path: Path) -> tuple[float, float]:
    """(f_in, f_out) = √d / dataset_average_activation_norm[in|out] (compute_norm_factor)."""
    mode = field(hp, "norm_activation", hp_path, (str,))
    if mode == "inference":
        return 1.0, 1.0
    if mode != "dataset-wise":  # token-/batch-wise rescale each input by its own norm
        raise InputError(f"{hp_path}: norm_activation={mode!r} cannot be represented "
                         "(only 'dataset-wise' or 'inference')")
    norms = hp.get("dataset_average_activation_norm") or {  # newer lm-saes: in the weights
        key.split(".", 1)[1]: float(v) for key, v in tensors.items()
        if key.startswith("dataset_average_activation_norm.")}
    if not isinstance(norms, dict):
        raise InputError(f"{hp_path}: dataset_average_activation_norm must be an object")
    hook_in = hp.get("hook_point_in", "in")
    found = [norms.get(k, norms.get(h)) for k, h in (("in", hook_in), ("out", hook_in))]
    if not all(isinstance(v, int | float) and v > 0 for v in found):
        raise InputError(f"{hp_path}: dataset_average_activation_norm needs positive 'in' and "
                         f"'out', got {norms!r}")
    d = math.sqrt(field(hp, "d_model", hp_path))
    return d / found[0], d / found[1]


def import_llama_scope(
    folder: str | Path, mode: Literal["inference", "training"] = "inference"
) -> ThresholdSAE:
    """A Llama Scope / lm-saes folder as a ThresholdSAE with s = f_in and unit decoder rows.

    With the lm-saes forward as h = (x − v) Eᵀ + b_E, codes = h·1[m·h > θ], x̂ = codes Dᵀ + b_D
    on raw x (after the mode's fold), ours is c·codes with c = s‖D_j‖:
    W_enc = Eᵀ‖D‖, W_dec = (D/‖D‖)ᵀ, b_dec = s·b_D, b_enc = c·b_E + (b_dec − s·v) W_enc,
    θ_j = θ·c_j/m_j (per latent).
    """
    folder = Path(folder)
    hp_path = folder / LLAMA_HP
    hp = read_json(hp_path)
    w_path = next((folder / p for p in LLAMA_WEIGHTS if (folder / p).exists()), None)
    if w_path is None:
        raise InputError(f"{folder}: no weights (looked for {', '.join(LLAMA_WEIGHTS)})")
    if mode not in ("inference", "training"):
        raise InputError(f"{folder}: mode={mode!r} must be 'inference' or 'training'")
    d = field(hp, "d_model", hp_path)
    n = field(hp, "d_sae", hp_path) if hp.get("d_sae") is not None else \
        d * field(hp, "expansion_factor", hp_path)
    act = hp.get("act_fn", "relu")  # lm-saes BaseSAEConfig default
    if act not in ("jumprelu", "relu"):
        raise InputError(f"{hp_path}: act_fn={act!r} is not supported (jumprelu or relu)")
    theta = float(field(hp, "jump_relu_threshold", hp_path, (int, float))) if act == "jumprelu" \
        else 0.0
    if hp.get("use_glu_encoder"):
        raise InputError(f"{hp_path}: use_glu_encoder=true cannot be represented")
    if hp.get("hook_point_out", hp.get("hook_point_in")) != hp.get("hook_point_in"):
        raise InputError(f"{hp_path}: hook_point_out differs from hook_point_in (a transcoder)")
    # Defaults of these differ between lm-saes versions, so they must be stated.
    sub = field(hp, "apply_decoder_bias_to_pre_encoder", hp_path, (bool,))
    include = hp.get("sparsity_include_decoder_norm", True)
    tensors = read_tensors(w_path)
    f_in, f_out = _llama_norms(hp, tensors, hp_path)
    why = f"{LLAMA_HP} says d_model={d}, d_sae={n}"
    E = take(tensors, "encoder.weight", (n, d), w_path, why)
    b_E = take(tensors, "encoder.bias", (n,), w_path, why)
    D = take(tensors, "decoder.weight", (d, n), w_path, why)
    use_bias = hp.get("use_decoder_bias", "decoder.bias" in tensors)
    b_D = take(tensors, "decoder.bias", (d,), w_path, why) if use_bias else torch.zeros(d)
    if mode == "inference":
        b_E, b_D, D = b_E / f_in, b_D / f_out, D * (f_in / f_out)
        if include:
            norm = D.norm(dim=0)
            D, E, b_E = D / norm, E * norm[:, None], b_E * norm
        v = b_D * sub
    else:
        E, v, D, b_D = E * f_in, b_D * sub / f_in, D / f_out, b_D / f_out
    m = D.norm(dim=0) if include else torch.ones(n)
    if mode == "training" and include:
        m = m * f_out  # the gate used the decoder in normalised output units
    s = f_in
    dn = D.norm(dim=0)
    if not bool((dn > 0).all()):
        raise InputError(f"{w_path}: decoder.weight column {int((dn <= 0).nonzero()[0])} "
                         "has zero norm")
    c = s * dn
    w_enc = E.T * dn
    b_dec = s * b_D
    b_enc = c * b_E + (b_dec - s * v) @ w_enc
    cfg = _cfg(hp_path, d_in=d, d_sae=n, decoder_norm="euclidean")
    return assemble(cfg, w_enc, (D / dn).T, b_enc, b_dec, theta * c / m, s)


def _detect(path: Path) -> str | None:
    """The layout of ``path``: 'saelens', 'sparsify', 'llama_scope', 'gemma_scope' or None."""
    if path.is_dir():
        if (path / CFG).is_file() and (path / WEIGHTS).is_file():
            return "saelens"
        if (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
            return "sparsify"
        if (path / LLAMA_HP).is_file():
            return "llama_scope"
        if (path / "params.npz").is_file() or (path / "params.safetensors").is_file():
            return "gemma_scope"
        return None
    if path.is_file() and path.suffix == ".npz":
        return "gemma_scope"
    if path.is_file() and path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                keys = {k.replace("w_", "W_", 1) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__})") \
                from None
        return "gemma_scope" if {"W_enc", "threshold"} <= keys else None
    return None


LOOKED_FOR = ("a folder with cfg.json + sae_weights.safetensors (ours/SAELens)",
              "cfg.json + sae.safetensors (sparsify)", "hyperparams.json (Llama Scope)",
              "params.npz or a .safetensors with W_enc and threshold (Gemma Scope)")


def load_any_sae(path: str | Path) -> tuple[SparseAutoencoder, str]:
    """Detect the SAE layout at ``path`` and load it; returns (sae, layout). A SAELens-layout
    SAE says in ``sae.provenance`` whether it is ours, with its ``atoms`` block intact."""
    path = Path(path)
    layout = _detect(path)
    if layout is None:
        raise InputError(f"{path}: no SAE found (looked for {'; '.join(LOOKED_FOR)})")
    loader = {"saelens": load_sae, "sparsify": import_sparsify,
              "llama_scope": import_llama_scope, "gemma_scope": import_gemma_scope}[layout]
    return loader(path), layout
