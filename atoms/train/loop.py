"""Executor-agnostic SAE training: a step, an epoch loop, and the state that resumes them.

``Trainer`` owns the SAE, its Adam optimiser and a ``TrainState`` (step, data position,
dead-latent tracking, RNG, history). ``train_epochs`` feeds it batches from any source
(``atoms.train.batches``) and takes its evaluator, its checkpointer and its step hooks as
arguments, so the plain loop, a Ray Train worker and the tests inject their own. A worker passes
its DDP-wrapped objective and a ``Sync`` over torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from atoms.aip.metric import AIP, Whitening
from atoms.core.config import require
from atoms.core.errors import InputError, TrainingDiverged
from atoms.core.validation import as_rows, check_finite
from atoms.evaluate.metrics import duplicates
from atoms.sae.model import SparseAutoencoder
from atoms.train.batches import TensorBatches, in_geometry
from atoms.train.fast_step import FastThresholdStep, StepMode, fast_step_applies

STEP_MODES = (*get_args(StepMode), "reference")
L0_PROBE_ROWS = 1024
"""Held-out rows the L0 controller reads (an encoder pass over them every ``l0_every`` steps);
the final threshold calibration (``l0_calibrate``) reads every probe row, once."""



@dataclass
class TrainConfig:
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 1024
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up from 0."""
    lr_decay_fraction: float = 0.0
    """Final fraction of steps over which the learning rate decays linearly to 0. The defaults
    (β1 0.9, a constant rate) learn the true features of SAELens's synthetic benchmark better
    than β1 0, a warm-up and a decay (``benchmarks/synthetic_peers.py --ablation``)."""
    sparsity_coeff: float = 1e-3
    """λ in loss = ‖x − x̂‖² + λ·sparsity (normalised units)."""
    sparsity_warmup_steps: int = 500
    """Linear warm-up of λ from 0."""
    target_l0: float = 0.0
    """Hit this mean L0 (0: off). After the λ warm-up, every ``l0_every`` steps until
    ``l0_until`` of the run, with e = ln(L̄0 / target): I ← I + kᵢ·e and λ = exp(I + kₚ·e),
    I starting at ln ``sparsity_coeff``; the rest of the run trains at the λ reached. L̄0 is the
    mean L0 on held-out probe rows when the run has them (a training run: its validation rows),
    else over the window's training batches. Start λ below the target's: thresholds rise with
    λ at once but fall back slowly."""
    l0_gain: float = 0.2
    """The controller's integral gain kᵢ (see ``target_l0``)."""
    l0_proportional: float = 1.0
    """The controller's proportional gain kₚ."""
    l0_every: int = 10
    """Steps between controller updates."""
    l0_until: float = 0.95
    """Fraction of the steps after which λ stays fixed."""
    l0_calibrate: bool = True
    """With ``target_l0`` and held-out probe rows, a threshold SAE ends with its thresholds
    scaled by one common factor c (θ ← c·θ, bisection in log c) so that the probe rows' mean L0
    is the target: the last mile λ leaves (a JumpReLU's thresholds follow λ down slowly).
    Recorded as ``threshold_scale``."""
    converge: bool = False
    """Train until converged, ``steps`` being the cap: once both warm-ups are over, the mean
    MSE of the last ``converge_window`` steps is within ``converge_tol`` (relative) of the
    window before, and (steered) the L0 is within ±10% of ``target_l0``. Then λ and resampling
    stop and a final ``converge_window`` steps decay the learning rate to 0. The MSE, not the
    total loss, because a steered λ moves the sparsity term."""
    converge_window: int = 200
    converge_tol: float = 0.01
    resample_every: int = 0
    """Every this many steps, re-initialise latents that did not fire in the window (0: off)."""
    resample_until: float = 0.6
    """Stop resampling after this fraction of the steps."""
    resample_duplicates: bool = True
    """Resampling also re-initialises the later latent of every pair whose decoder rows are
    near-parallel in the SAE's metric (|cos| > 0.99, ``atoms.evaluate.metrics.duplicates``);
    once resampling has stopped, such a latent is switched off instead (merged into its twin)."""
    dead_window: int = 1000
    """A latent that has not fired for this many steps counts as dead."""
    pre_act_coeff: float = 1e-3
    """c of the pre-activation loss on dead latents (Anthropic's; SAELens's pre_act_loss),
    c·(1/B) Σᵢ Σⱼ∈dead ReLU(θⱼ − zᵢⱼ)·‖dⱼ‖, dead: no firing in the last
    ``pre_act_window_rows`` training rows. It lifts a dead latent's pre-activations and lowers
    its threshold until it fires again (threshold SAEs; 0: off). Under Adam a dead latent's own
    parameters move at the learning rate whatever c is; c only sets how much the shared b_dec
    feels it. Not counted in the reported loss."""
    pre_act_window_rows: int = 25_600
    """The pre-activation loss's dead window in training rows, ⌈rows / ``batch_size``⌉ steps
    (25 steps of 1,024 rows): a latent silent that long is lifted until it fires once, so a
    latent of firing rate p is touched about once in exp(p·rows) windows. Short windows keep
    SAELens's synthetic benchmark free of latents that fire a few times in 10⁵ rows and not
    once on its evaluation samples; 250 steps left 1–4 of them (``benchmarks/synthetic_peers.py
    --ablation``). With resampling on the window is at least ``resample_every`` steps: a
    shorter one lifts every silent latent before resampling can see it dead, and on a planted
    set with more latents than atoms that cost a sixth of the atoms (``tests/test_training``)."""
    log_every: int = 50
    """Steps between history rows (each the mean over its window) and divergence checks."""
    seed: int = 0
    step: str = "auto"
    """Threshold SAE (L0 loss) step: 'auto' (fast; sparse once L0/N is small), 'dense',
    'sparse', or 'reference' (autograd through the module; also used for other SAEs)."""

    def __post_init__(self):
        require(self.steps >= 1, "steps", f"must be positive, got {self.steps}")
        require(self.batch_size >= 1, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(self.sparsity_coeff >= 0, "sparsity_coeff", "must be non-negative")
        require(0 <= self.lr_decay_fraction <= 1, "lr_decay_fraction", "must be in [0, 1]")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be non-negative")
        require(self.sparsity_warmup_steps >= 0, "sparsity_warmup_steps", "must be non-negative")
        require(self.target_l0 >= 0, "target_l0", f"must be ≥ 0, got {self.target_l0}")
        require(not self.target_l0 or self.sparsity_coeff > 0, "sparsity_coeff",
                "must be positive with target_l0 (it is the controller's starting λ)")
        require(self.l0_gain > 0, "l0_gain", "must be positive")
        require(self.l0_proportional >= 0, "l0_proportional", "must be ≥ 0")
        require(self.l0_every >= 1, "l0_every", "must be positive")
        require(0 <= self.l0_until <= 1, "l0_until", "must be in [0, 1]")
        require(self.converge_window >= self.log_every, "converge_window",
                f"must be ≥ log_every ({self.log_every})")
        require(self.converge_tol > 0, "converge_tol", "must be positive")
        require(self.resample_every >= 0, "resample_every", "must be non-negative")
        require(self.dead_window >= 1, "dead_window", "must be positive")
        require(self.pre_act_coeff >= 0, "pre_act_coeff", "must be ≥ 0")
        require(self.pre_act_window_rows >= 1, "pre_act_window_rows", "must be positive")
        require(self.log_every >= 1, "log_every", "must be positive")
        require(self.step in STEP_MODES, "step", f"must be one of {STEP_MODES}, got {self.step!r}")


L0_TOLERANCE = 0.1
"""A steered run converges only with its L0 within this fraction of ``target_l0``."""


def schedule(step: int, cfg: TrainConfig, sparsity_coeff: float | None = None,
             final: tuple[int, int] | None = None) -> tuple[float, float]:
    """(learning rate, sparsity coefficient) at ``step`` (0-based); ``sparsity_coeff`` is the
    controlled λ when ``target_l0`` is on (default ``cfg.sparsity_coeff``). The learning rate
    decays linearly to 0 over the last ``lr_decay_fraction`` of the steps, or over ``final``
    = (start, end) once a converging run has fixed its end."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    decay_start, end = final or (cfg.steps * (1 - cfg.lr_decay_fraction), cfg.steps)
    decay = 1.0
    if (final or cfg.lr_decay_fraction > 0) and step >= decay_start:
        decay = max(0.0, (end - step) / max(end - decay_start, 1))
    coeff_warm = (
        min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
    )
    base = cfg.sparsity_coeff if sparsity_coeff is None else sparsity_coeff
    return cfg.lr * warm * decay, base * coeff_warm


def uses_fast_step(sae: SparseAutoencoder, cfg: TrainConfig) -> bool:
    """Whether a Trainer without an injected objective takes the hand-written step."""
    return cfg.step != "reference" and fast_step_applies(sae)


def make_optimizer(sae: SparseAutoencoder, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam; on CUDA its fused kernel (one launch for every parameter)."""
    params = [p for p in sae.parameters() if p.requires_grad]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            fused=fused or None)


class SAEObjective(nn.Module):
    """The training loss as a module of tensors only, the form DDP wraps.

    forward(x, λ) → (loss, mse, mean L0, fired), fired = which latents were active in x (rows
    in the training geometry).
    """

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, sparsity_coeff: float):
        out = self.sae(x, in_geometry=True)
        terms = self.sae.loss(out, sparsity_coeff)
        return terms.total, terms.mse.detach(), terms.l0, (out.codes.detach() != 0).any(0)


def train_step(
    objective: nn.Module, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
    batch: torch.Tensor, sparsity_coeff: float, before_update=None,
) -> tuple[torch.Tensor, ...]:
    """One forward/backward/update, constraints re-applied: (loss, mse, l0, fired) tensors;
    ``before_update()`` may add to the gradients first."""
    loss, mse, l0, fired = objective(batch, sparsity_coeff)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_update is not None:
        before_update()
    optimizer.step()
    sae.constrain_()
    return loss.detach(), mse, l0, fired


class Sync:
    """Collectives across data-parallel workers; this single-process one is the identity."""

    rank, world = 0, 1

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's ``tensors``."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(world, *t.shape): every rank's ``t``."""
        return t[None]


class TorchDistributedSync(Sync):
    """Sync over an initialised torch.distributed process group."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def _reduce(self, t, op):
        self.dist.all_reduce(t, op=op)
        return t

    def max_(self, t):
        return self._reduce(t, self.dist.ReduceOp.MAX)

    def min_(self, t):
        return self._reduce(t, self.dist.ReduceOp.MIN)

    def mean_(self, t):
        return self._reduce(t, self.dist.ReduceOp.SUM).div_(self.world)

    def broadcast_(self, tensors):
        for t in tensors:
            self.dist.broadcast(t, src=0)

    def gather(self, t):
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return torch.stack(out)


def _share_new_latents(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                       idx: torch.Tensor, sync: Sync) -> int:
    """Give every rank rank 0's new weights of latents ``idx``, reset their Adam moments and
    re-apply the constraints; returns how many latents changed."""
    touched = [(sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)]
    if hasattr(sae, "threshold"):
        touched.append((sae.threshold, 0))
    sync.broadcast_([p.data for p, _ in touched])
    for p, dim in touched:
        state = optimizer.state.get(p)
        for key in ("exp_avg", "exp_avg_sq") if state else ():
            state[key].index_fill_(dim, idx, 0.0)
    sae.constrain_()
    return idx.numel()


@torch.no_grad()
def resample_dead_(
    sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
    dead: torch.Tensor, gen: torch.Generator, sync: Sync | None = None,
) -> int:
    """Point dead latents at poorly reconstructed inputs (rows chosen ∝ ‖x − x̂‖²).

    Decoder row = the unit input x − b_dec, encoder column = its transpose, b_enc = 0,
    threshold = the median live threshold; their Adam moments are reset. Rank 0 draws the
    rows and broadcasts the new weights. Returns how many latents were resampled.
    """
    sync = sync or Sync()
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    if sync.rank == 0:
        out = sae(batch, in_geometry=True)
        weights = (out.x_norm - out.recon_norm).pow(2).sum(1)
        if float(weights.sum()) > 0:
            rows = torch.multinomial(weights.cpu(), idx.numel(), replacement=True, generator=gen)
            new = out.x_norm[rows.to(batch.device)] - sae.b_dec
            new /= new.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sae.W_dec[idx] = new
            sae.W_enc[:, idx] = new.T
            sae.b_enc[idx] = 0.0
            if hasattr(sae, "threshold"):
                live = sae.threshold[~dead]
                sae.threshold[idx] = live.median() if live.numel() else sae.cfg.init_threshold
    return _share_new_latents(sae, optimizer, idx, sync)


@torch.no_grad()
def silence_(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, which: torch.Tensor,
             gen: torch.Generator, sync: Sync | None = None) -> int:
    """Latents ``which`` never fire again: encoder column and b_enc zero (so z = 0 ≤ θ), θ the
    largest live threshold (off the STE window), decoder row a random unit direction; their
    Adam moments are reset. Rank 0 draws the directions and broadcasts. Returns the count."""
    sync = sync or Sync()
    idx = which.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    if sync.rank == 0:
        new = torch.randn(idx.numel(), sae.cfg.d_in, generator=gen).to(sae.W_dec)
        sae.W_dec[idx] = new / new.norm(dim=1, keepdim=True)
    sae.W_enc[:, idx] = 0.0
    sae.b_enc[idx] = 0.0
    if hasattr(sae, "threshold"):
        live = sae.threshold[~which]
        sae.threshold[idx] = live.max() if live.numel() else sae.cfg.init_threshold
    return _share_new_latents(sae, optimizer, idx, sync)


@dataclass
class TrainState:
    """Everything besides weights and optimiser that a resumed run needs."""

    step: int = 0
    """Optimiser steps taken."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Data position: batches of ``epoch`` already consumed (this rank)."""
    last_fired: torch.Tensor | None = None
    """Per latent, the last step at which it fired (−1: never)."""
    resampled: int = 0
    duplicates_resampled: int = 0
    """Of ``resampled``, the latents that duplicated an earlier one (not dead)."""
    duplicates_silenced: int = 0
    """Duplicating latents switched off after resampling stopped (``resample_until``)."""
    history: list[dict] = field(default_factory=list)
    """One row per ``log_every`` steps: means over the window."""
    evals: list[dict] = field(default_factory=list)
    threshold_start: torch.Tensor | None = None
    rng: torch.Tensor | None = None
    resumed_from: list[int] = field(default_factory=list)
    """Steps at which this run was resumed from a checkpoint."""
    sparsity_coeff: float | None = None
    """The controlled λ (``target_l0``); None: the configured one."""
    l0_integral: float | None = None
    """The controller's integral term, ln λ before the proportional one."""
    probe_l0: float | None = None
    """The L0 the controller saw last."""
    converged_at: int | None = None
    """The step at which a converging run (``converge``) met its criterion."""
    stop_at: int | None = None
    """Where a converged run ends: ``converged_at`` + ``converge_window`` (at most ``steps``)."""
    threshold_scale: float | None = None
    """The common factor ``l0_calibrate`` applied to the thresholds at the end (None: not)."""

    @property
    def final(self) -> tuple[int, int] | None:
        """The converged run's final phase (start, end), for ``schedule``."""
        return None if self.stop_at is None else (self.converged_at, self.stop_at)


def threshold_scale_for(pre: torch.Tensor, threshold: torch.Tensor, target: float,
                        iterations: int = 60) -> float:
    """The c in [1e-4, 1e4] (bisection in log c) whose mean L0 = mean_rows Σⱼ 1[preⱼ > c·θⱼ]
    is nearest ``target``; L0 falls as c grows."""
    def l0(c: float) -> float:
        return float((pre > c * threshold).sum(1, dtype=torch.float64).mean())

    lo, hi = math.log(1e-4), math.log(1e4)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l0(math.exp(mid)) > target else (lo, mid)
    return min((math.exp(lo), math.exp(hi)), key=lambda c: abs(l0(c) - target))


class Trainer:
    """Adam on one SAE with the schedule, dead-latent tracking, resampling and divergence stop.

    Batches are rows in the SAE's training geometry: raw rows when Euclidean, (x − c)P under
    'aip' (``atoms.train.batches.in_geometry`` maps a source once, not every step)."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig, objective: nn.Module | None = None,
                 sync: Sync | None = None):
        self.sae, self.cfg = sae, cfg
        self.sync = sync or Sync()
        self.fast = None
        if objective is None and uses_fast_step(sae, cfg):
            self.fast = FastThresholdStep(sae, cfg.step)
            self.sync.broadcast_([p.data for p in sae.parameters()])
        self.objective = objective if objective is not None else SAEObjective(sae)
        self.optimizer = make_optimizer(sae, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        device = sae.W_dec.device
        self.state = TrainState(last_fired=torch.full((sae.cfg.d_sae,), -1, device=device))
        if hasattr(sae, "threshold"):
            self.state.threshold_start = sae.threshold.detach().cpu().clone()
        self._window: list[tuple] = []
        self.l0_probe, self.l0_rows, self.calibration_rows = False, None, None
        self._pre_act_dead: torch.Tensor | None = None
        self.pre_act_steps = max(math.ceil(cfg.pre_act_window_rows / cfg.batch_size),
                                 cfg.resample_every)
        """``pre_act_window_rows`` in steps, at least ``resample_every``."""

    def set_l0_probe(self, rows: torch.Tensor | None) -> None:
        """Steer λ by the L0 on ``rows`` (raw held-out rows; every rank calls this, rank 0
        with the rows, the others with None, and rank 0's L0 is broadcast)."""
        self.l0_probe = True
        self.l0_rows = None if rows is None else rows[:L0_PROBE_ROWS]
        self.calibration_rows = rows

    # -- one step ----------------------------------------------------------------------------
    def end(self, until: int | None = None) -> int:
        """The step the run stops at: ``until`` (default ``steps``), earlier once converged."""
        until = self.cfg.steps if until is None else until
        return until if self.state.stop_at is None else min(until, self.state.stop_at)

    def step(self, batch: torch.Tensor) -> None:
        s, cfg = self.state, self.cfg
        lr, sparsity_coeff = schedule(s.step, cfg, s.sparsity_coeff, s.final)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.fast is not None:
            loss, mse, l0, fired = self._fast_step(batch, sparsity_coeff)
        else:
            extra = (lambda: self._pre_act_grad(batch)) if self._pre_act_now() else None
            loss, mse, l0, fired = train_step(self.objective, self.sae, self.optimizer, batch,
                                              sparsity_coeff, extra)
        s.last_fired = torch.where(fired, s.step, s.last_fired)
        self._window.append((s.step, lr, sparsity_coeff, loss, mse, l0))
        s.step += 1
        if cfg.target_l0 and s.step % cfg.l0_every == 0:
            self._control_l0()
        if cfg.resample_every and s.step % cfg.resample_every == 0:
            if s.step <= cfg.resample_until * cfg.steps and s.stop_at is None:
                self._resample(batch)
            elif cfg.resample_duplicates:
                self._silence_duplicates()
        if s.step % cfg.log_every == 0 or s.step == self.end():
            self.flush()

    def _control_l0(self) -> None:
        """The PI step of ``target_l0`` in ln λ; L̄0 on the probe rows (``set_l0_probe``) or
        else over the last ``l0_every`` training steps (mean over workers)."""
        s, cfg = self.state, self.cfg
        if (s.step <= cfg.sparsity_warmup_steps or s.step > cfg.l0_until * cfg.steps
                or s.stop_at is not None):
            return
        if self.l0_probe:
            value = torch.zeros(1, device=self.sae.W_dec.device)
            if self.l0_rows is not None:
                with torch.no_grad():
                    value += self.sae(self.l0_rows).l0.mean()
            self.sync.broadcast_([value])
            l0 = float(value)
        else:
            recent = torch.stack([w[5] for w in self._window[-cfg.l0_every:]]).mean()
            l0 = float(self.sync.mean_(recent.reshape(1)))
        s.probe_l0 = l0
        error = math.log(min(max(l0, 1e-3) / cfg.target_l0, 1e3))
        if s.l0_integral is None:
            s.l0_integral = math.log(cfg.sparsity_coeff)
        s.l0_integral += cfg.l0_gain * error
        s.sparsity_coeff = math.exp(s.l0_integral + cfg.l0_proportional * error)

    @torch.no_grad()
    def calibrate_l0(self) -> None:
        """``l0_calibrate``: once, at the end, scale the thresholds so the probe rows' mean L0
        is ``target_l0`` (rank 0 finds c, every rank applies it)."""
        s, cfg = self.state, self.cfg
        if not (cfg.target_l0 and cfg.l0_calibrate and self.l0_probe
                and isinstance(getattr(self.sae, "threshold", None), nn.Parameter)
                and s.threshold_scale is None):
            return
        value = torch.ones(1, device=self.sae.W_dec.device)
        if self.calibration_rows is not None:
            pre = self.sae.pre_activations(self.sae.normalise(self.calibration_rows))
            value[0] = threshold_scale_for(pre, self.sae.threshold, cfg.target_l0)
        self.sync.broadcast_([value])
        self.sae.threshold.mul_(value)
        s.threshold_scale = float(value)

    def _fast_step(self, batch: torch.Tensor, sparsity_coeff: float):
        """The hand-written step; across workers the gradients are averaged in one buffer."""
        terms = self.fast(batch, sparsity_coeff)
        if self._pre_act_now():
            self._pre_act_grad(batch)
        if self.sync.world > 1:
            grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
            flat = self.sync.mean_(torch.cat([g.reshape(-1) for g in grads]))
            for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sae.constrain_()
        return terms

    def _pre_act_now(self) -> bool:
        """Whether this step adds ``pre_act_coeff``'s loss: a threshold SAE, past the window."""
        return bool(self.cfg.pre_act_coeff and self.state.step >= self.pre_act_steps
                    and isinstance(getattr(self.sae, "threshold", None), nn.Parameter))

    @torch.no_grad()
    def _pre_act_grad(self, batch: torch.Tensor) -> None:
        """Add the gradient of ``pre_act_coeff``'s loss on the dead latents to ``.grad``:
        with u = (c/B)·‖dⱼ‖·1[zᵢⱼ < θⱼ], ∂zᵢⱼ = −u, ∂θⱼ = Σᵢ u (z = x W_enc + b_enc − b_dec W_enc,
        x in normalised units). The dead set is read every ``l0_every`` steps; without the
        fast step (which averages every gradient) the addition is averaged over workers here."""
        s = self.state
        if self._pre_act_dead is None or s.step % self.cfg.l0_every == 0:
            self._pre_act_dead = self.dead(self.pre_act_steps).nonzero().squeeze(1)
        idx, sae = self._pre_act_dead, self.sae
        if not len(idx):
            return
        x = batch * sae.input_scale
        w = sae.W_enc[:, idx]
        z = x @ w + sae.b_enc[idx]
        if sae.cfg.bias:
            z -= sae.b_dec @ w
        norms = torch.linalg.vector_norm(sae.W_dec[idx], dim=1)
        u = (z < sae.threshold[idx]).to(x.dtype) * (self.cfg.pre_act_coeff / len(x) * norms)
        u_sum = u.sum(0)
        d_w = torch.outer(sae.b_dec, u_sum) - x.T @ u if sae.cfg.bias else -(x.T @ u)
        parts = [d_w, u_sum, w @ u_sum]
        if self.fast is None and self.sync.world > 1:
            sizes = [p.numel() for p in parts]
            flat = self.sync.mean_(torch.cat([p.reshape(-1) for p in parts]))
            parts = [f.view_as(p) for f, p in zip(flat.split(sizes), parts, strict=True)]
        d_w, u_sum, d_b_dec = parts
        for p in (sae.W_enc, sae.threshold, sae.b_enc, sae.b_dec):
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
        sae.W_enc.grad[:, idx] += d_w
        sae.threshold.grad[idx] += u_sum
        if sae.cfg.bias:
            sae.b_enc.grad[idx] -= u_sum
            sae.b_dec.grad += d_b_dec

    def dead(self, window: int | None = None) -> torch.Tensor:
        """Latents that fired on no worker in the last ``window`` steps (bool, d_sae)."""
        window = window or self.cfg.dead_window
        last = self.sync.max_(self.state.last_fired.clone())
        return last < self.state.step - window

    def _resample(self, batch: torch.Tensor) -> None:
        dead = self.dead(self.cfg.resample_every)
        if self.cfg.resample_duplicates:  # every rank holds the same weights
            twins = duplicates(self.sae.W_dec, self.sae.metric)[1]
            self.state.duplicates_resampled += int((twins & ~dead).sum())
            dead = dead | twins
        n = resample_dead_(self.sae, self.optimizer, batch, dead, self.gen, self.sync)
        self.state.resampled += n
        self.state.last_fired[dead] = self.state.step - 1

    def _silence_duplicates(self) -> None:
        """After resampling has stopped, a latent that duplicates an earlier one is merged into
        it: it stops firing (its twin then takes all of their shared activations) and its
        decoder row points elsewhere, so the final dictionary holds each direction once."""
        twins = duplicates(self.sae.W_dec, self.sae.metric)[1]
        n = silence_(self.sae, self.optimizer, twins, self.gen, self.sync)
        self.state.duplicates_silenced += n

    def flush(self) -> dict | None:
        """Check the window for a non-finite loss (stop with its step), then log its means."""
        if not self._window:
            return None
        window, self._window = self._window, []
        losses = torch.stack([w[3] for w in window])
        bad = (~torch.isfinite(losses)).nonzero()
        first = torch.tensor(window[int(bad[0])][0] if len(bad) else 2**62, device=losses.device)
        first = int(self.sync.min_(first))
        if first < 2**62:
            lr = schedule(first, self.cfg, self.state.sparsity_coeff, self.state.final)[0]
            raise TrainingDiverged(f"training: non-finite loss at step {first} (lr={lr:g})",
                                   step=first)
        means = self.sync.mean_(torch.stack([losses.mean(), torch.stack([w[4] for w in window])
                                             .mean(), torch.stack([w[5] for w in window]).mean()]))
        step, lr, sparsity_coeff = window[-1][:3]
        row = {"step": step, "lr": lr, "sparsity_coeff": sparsity_coeff, "loss": float(means[0]),
               "mse": float(means[1]), "l0": float(means[2])}
        self.state.history.append(row)
        if self.cfg.converge and self.state.stop_at is None and self._converged():
            s, cfg = self.state, self.cfg
            s.converged_at, s.stop_at = s.step, min(cfg.steps, s.step + cfg.converge_window)
        return row

    def _converged(self) -> bool:
        """``converge``'s criterion on the history rows (means over workers, so every rank
        decides alike): the last two windows' mean MSE within ``converge_tol``, both after the
        warm-ups, before the cap's own decay, and a steered L0 within ``L0_TOLERANCE``."""
        s, cfg = self.state, self.cfg
        n = max(1, cfg.converge_window // cfg.log_every)
        rows = s.history[-2 * n:]
        warm = max(cfg.lr_warmup_steps, cfg.sparsity_warmup_steps)
        if len(rows) < 2 * n or rows[0]["step"] < warm:
            return False
        if s.step > cfg.steps * (1 - cfg.lr_decay_fraction) - cfg.converge_window:
            return False  # too late to add a final phase: the cap's own decay ends the run
        prev = sum(r["mse"] for r in rows[:n]) / n
        cur = sum(r["mse"] for r in rows[n:]) / n
        if not abs(prev - cur) <= cfg.converge_tol * prev:
            return False
        if cfg.target_l0:
            l0 = s.probe_l0 if self.l0_probe else sum(r["l0"] for r in rows[n:]) / n
            return l0 is not None and abs(l0 / cfg.target_l0 - 1) <= L0_TOLERANCE
        return True

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimiser, TrainState and the exact normalised-unit small tensors."""
        s = self.state
        exact = {k: v.detach().cpu().clone() for k, v in self.sae.named_parameters()
                 if k in ("b_enc", "b_dec", "threshold")}
        exact["input_scale"] = self.sae.input_scale.detach().cpu().clone()
        fast = {} if self.fast is None else {"fast_step": {"calls": self.fast.calls,
                                                           "density": self.fast.density}}
        return {
            **fast,  # the auto step's dense/sparse choice, so a resumed run makes the same one
            "optimizer": self.optimizer.state_dict(),
            "state": {**s.__dict__, "last_fired": s.last_fired.cpu(), "rng": self.gen.get_state()},
            "exact": exact,
            "positions": self.sync.gather(torch.tensor([s.epoch, s.batch_in_epoch],
                                                       device=s.last_fired.device)).cpu(),
        }

    def load_state_dict(self, payload: dict) -> None:
        """Restore what ``state_dict`` saved; this rank's data position comes from its row."""
        with torch.no_grad():
            params = dict(self.sae.named_parameters())
            for name, value in payload["exact"].items():
                target = self.sae.input_scale if name == "input_scale" else params[name]
                target.copy_(value)
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.fast is not None and "fast_step" in payload:
            self.fast.calls = int(payload["fast_step"]["calls"])
            self.fast.density = float(payload["fast_step"]["density"])
        fields = dict(payload["state"])
        self.gen.set_state(fields.pop("rng"))
        fields["last_fired"] = fields["last_fired"].to(self.sae.W_dec.device)
        self.state = TrainState(**fields)
        positions = payload["positions"]
        if len(positions) != self.sync.world:
            raise InputError(f"checkpoint: saved by {len(positions)} workers, resumed with "
                             f"{self.sync.world}; resume with the same number of workers")
        self.state.epoch, self.state.batch_in_epoch = map(int, positions[self.sync.rank])
        self.state.resumed_from.append(self.state.step)


Hook = Callable[[Trainer], None]
"""Runs after every step (timers, tests' fault injection)."""
Evaluator = Callable[[SparseAutoencoder], "dict | None"]
"""Metrics of the SAE on held-out rows (None on a worker that does not evaluate)."""


@dataclass
class Checkpointer:
    """Saves the trainer every ``every`` steps (and at the last step when ``at_end``)."""

    save: Callable[[Trainer], None]
    every: int
    at_end: bool = True

    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 if step < steps else self.at_end


def train_epochs(trainer: Trainer, source, until: int | None = None, *,
                 evaluator: Evaluator | None = None, eval_every: int = 0,
                 checkpointer: Checkpointer | None = None, hooks: Iterable[Hook] = (),
                 progress: bool = False) -> None:
    """Train from the state's data position until ``until`` steps (default: cfg.steps).

    ``source.epoch(e)`` yields the batches of epoch e; the first ``batch_in_epoch`` of the
    current epoch are skipped on resume. After every step the ``hooks`` run; every
    ``eval_every`` steps before the last the ``evaluator``'s metrics join ``state.evals``;
    then, when due, the window is checked for a non-finite loss and the ``checkpointer`` saves.
    """
    s, hooks = trainer.state, tuple(hooks)
    until = trainer.cfg.steps if until is None else until
    bar = tqdm(total=until, initial=s.step, disable=not progress,
               desc=f"train {trainer.sae.cfg.kind} SAE")
    while s.step < trainer.end(until):
        seen = 0
        for i, batch in enumerate(source.epoch(s.epoch)):
            seen = i + 1
            if i < s.batch_in_epoch:
                continue
            trainer.step(batch)
            s.batch_in_epoch = i + 1
            bar.update(1)
            if s.history and s.step == s.history[-1]["step"] + 1:
                bar.set_postfix(mse=f"{s.history[-1]['mse']:.4f}", l0=f"{s.history[-1]['l0']:.1f}")
            _after_step(trainer, hooks, evaluator, eval_every, checkpointer)
            if s.step >= trainer.end(until):
                break
        else:
            if seen == 0:
                raise InputError("data: an epoch yielded no full batch (batch_size larger than "
                                 "this worker's rows?)")
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
    trainer.flush()
    if s.step >= trainer.end():
        trainer.calibrate_l0()
    bar.close()


def _after_step(trainer: Trainer, hooks: tuple[Hook, ...], evaluator: Evaluator | None,
                eval_every: int, checkpointer: Checkpointer | None) -> None:
    step, steps = trainer.state.step, trainer.end()
    for hook in hooks:
        hook(trainer)
    if evaluator is not None and eval_every and step % eval_every == 0 and step < steps:
        metrics = evaluator(trainer.sae)
        if metrics is not None:
            trainer.state.evals.append({"step": step, **metrics})
    if checkpointer is not None and checkpointer.due(step, steps):
        trainer.flush()  # a non-finite loss stops here, before it can reach a checkpoint
        checkpointer.save(trainer)


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
    whitening: Whitening | None = None,
) -> TrainResult:
    """Train ``sae`` on the rows of ``data`` (a new permutation every epoch) with Adam.

    Geometry 'aip' trains in the geometry of ``whitening`` (default: that of ``aip``)."""
    data = as_rows(data, "activations", d=sae.cfg.d_in).float()
    check_finite(data, "activations")
    gen = torch.Generator().manual_seed(cfg.seed)
    if sae.cfg.geometry == "aip":
        if whitening is None and aip is None:
            raise InputError("sae.geometry: 'aip' needs S̃ (pass aip or whitening)")
        whitening = whitening or Whitening.of(aip)
        sae.set_whitening(whitening)
    sae.fit_input_scale(data[torch.randperm(len(data), generator=gen)[:16384]])
    if aip is not None:
        sae.set_metric(aip)
    trainer = Trainer(sae, cfg)
    source = TensorBatches(data, min(cfg.batch_size, len(data)), cfg.seed)
    train_epochs(trainer, in_geometry(source, whitening if sae.whiten is not None else None),
                 progress=progress)
    s = trainer.state
    end = sae.threshold.detach().clone() if hasattr(sae, "threshold") else None
    return TrainResult(s.history, s.threshold_start, end, s.resampled)
