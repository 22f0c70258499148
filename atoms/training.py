"""Executor-agnostic SAE training: one step function, one plain loop around it.

The step is a plain function (batch in, metrics out) so the local loop, a Ray Train worker
and a Ray Tune trial all call the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from atoms.aip import AIP
from atoms.config import require
from atoms.errors import TrainingDiverged
from atoms.sae import SparseAutoencoder
from atoms.validation import as_rows, check_finite


@dataclass
class TrainConfig:
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 1024
    lr: float = 1e-3
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999
    lr_warmup_steps: int = 100
    """Linear learning-rate warm-up from 0."""
    lr_decay_fraction: float = 0.2
    """Final fraction of steps over which the learning rate decays linearly to 0."""
    sparsity_coeff: float = 1e-3
    """λ in loss = ‖x − x̂‖² + λ·sparsity (normalised units)."""
    sparsity_warmup_steps: int = 500
    """Linear warm-up of λ from 0."""
    resample_every: int = 0
    """Every this many steps, re-initialise latents that did not fire in the window (0: off)."""
    resample_until: float = 0.6
    """Stop resampling after this fraction of the steps."""
    seed: int = 0

    def __post_init__(self):
        require(self.steps >= 1, "steps", f"must be positive, got {self.steps}")
        require(self.batch_size >= 1, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(self.sparsity_coeff >= 0, "sparsity_coeff", "must be non-negative")
        require(0 <= self.lr_decay_fraction <= 1, "lr_decay_fraction", "must be in [0, 1]")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be non-negative")
        require(self.sparsity_warmup_steps >= 0, "sparsity_warmup_steps", "must be non-negative")
        require(self.resample_every >= 0, "resample_every", "must be non-negative")


def schedule(step: int, cfg: TrainConfig) -> tuple[float, float]:
    """(learning rate, sparsity coefficient) at ``step`` (0-based)."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    decay_start = cfg.steps * (1 - cfg.lr_decay_fraction)
    decay = 1.0
    if cfg.lr_decay_fraction > 0 and step >= decay_start:
        decay = max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    coeff_warm = (
        min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
    )
    return cfg.lr * warm * decay, cfg.sparsity_coeff * coeff_warm


def make_optimizer(sae: SparseAutoencoder, cfg: TrainConfig) -> torch.optim.Adam:
    params = [p for p in sae.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    coeff: float,
    fired: torch.Tensor | None = None,
) -> dict[str, float]:
    """One forward/backward/update with constraints re-applied; returns the loss terms.

    ``fired`` (bool, d_sae), when given, is OR-ed with the latents active in this batch.
    """
    out = sae(batch)
    if fired is not None:
        fired |= (out.codes.detach() != 0).any(0)
    terms = sae.loss(out, coeff)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    sae.constrain_()
    return {"loss": float(terms.total.detach()), "mse": float(terms.mse.detach()), "l0": terms.l0}


@torch.no_grad()
def resample_dead_(
    sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
    dead: torch.Tensor, gen: torch.Generator,
) -> int:
    """Point dead latents at poorly reconstructed inputs (rows chosen ∝ ‖x − x̂‖²).

    Decoder row = the unit input x − b_dec, encoder column = its transpose, b_enc = 0,
    threshold = the median live threshold; their Adam moments are reset. Returns how many.
    """
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    out = sae(batch)
    residual = out.x_norm - out.recon_norm
    weights = residual.pow(2).sum(1)
    if float(weights.sum()) <= 0:
        return 0
    rows = torch.multinomial(weights, idx.numel(), replacement=True, generator=gen)
    new = out.x_norm[rows] - sae.b_dec
    new /= new.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sae.W_dec[idx] = new
    sae.W_enc[:, idx] = new.T
    sae.b_enc[idx] = 0.0
    if hasattr(sae, "threshold"):
        live = sae.threshold[~dead]
        sae.threshold[idx] = live.median() if live.numel() else sae.cfg.init_threshold
    touched = [(sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)]
    if hasattr(sae, "threshold"):
        touched.append((sae.threshold, 0))
    for p, dim in touched:
        state = optimizer.state.get(p)
        for key in ("exp_avg", "exp_avg_sq") if state else ():
            state[key].index_fill_(dim, idx, 0.0)
    sae.constrain_()
    return idx.numel()


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    """Loss terms every ``log_every`` steps."""
    threshold_start: torch.Tensor | None = None
    threshold_end: torch.Tensor | None = None
    resampled: int = 0
    """Latents re-initialised by dead-latent resampling."""


def train_sae(
    sae: SparseAutoencoder,
    data: torch.Tensor,
    cfg: TrainConfig,
    aip: AIP | None = None,
    progress: bool = True,
    log_every: int = 50,
) -> TrainResult:
    """Train ``sae`` on the rows of ``data`` (shuffled every epoch) with Adam."""
    data = as_rows(data, "activations", d=sae.cfg.d_in).float()
    check_finite(data, "activations")
    gen = torch.Generator().manual_seed(cfg.seed)
    sae.fit_input_scale(data[torch.randperm(len(data), generator=gen)[:16384]])
    if aip is not None:
        sae.set_metric(aip)
    optimizer = make_optimizer(sae, cfg)
    result = TrainResult()
    if hasattr(sae, "threshold"):
        result.threshold_start = sae.threshold.detach().clone()
    batches_per_epoch = max(1, len(data) // cfg.batch_size)
    order = torch.randperm(len(data), generator=gen)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    bar = tqdm(range(cfg.steps), disable=not progress, desc=f"train {sae.cfg.kind} SAE")
    for step in bar:
        b = step % batches_per_epoch
        if b == 0 and step > 0:
            order = torch.randperm(len(data), generator=gen)
        batch = data[order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
        lr, coeff = schedule(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = train_step(sae, optimizer, batch, coeff, fired)
        if cfg.resample_every and (step + 1) % cfg.resample_every == 0:
            if step < cfg.resample_until * cfg.steps:
                result.resampled += resample_dead_(sae, optimizer, batch, ~fired, gen)
            fired.zero_()
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(f"training: non-finite loss at step {step} (lr={lr:g})")
        if step % log_every == 0 or step == cfg.steps - 1:
            result.history.append({"step": step, "lr": lr, "coeff": coeff, **metrics})
            bar.set_postfix(mse=f"{metrics['mse']:.4f}", l0=f"{metrics['l0']:.1f}")
    if hasattr(sae, "threshold"):
        result.threshold_end = sae.threshold.detach().clone()
    return result
