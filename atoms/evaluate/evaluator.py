"""The one evaluator: an SAE's metrics during and after training (``evaluate_sae``), and one
results-table row for any unit set — neurons, SAE features, atoms, random directions
(``evaluate_unit_set``).

``evaluate_unit_set`` returns one flat row of floats with the same keys for every kind, so a
table of mixed unit sets has one schema. Every metric is the one in ``atoms.evaluate.metrics`` /
``atoms.evaluate.recovery``; this module only decides which codes δ and reconstructions x̂ a
kind has:

- SAE-backed (``sae`` given): the SAE's codes and x̂ = SAE(x), batched under no_grad.
- neurons: δ = x and x̂ = x (R² = 1 by construction); unit j is active when |xᵢⱼ| > tol.
- random, exemplar, or any set without an encoder: K-sparse OMP codes δ of the AIP-unit
  directions (on ≤ ``local_rows`` rows), x̂ = Σⱼ δⱼ dⱼ / ‖dⱼ‖_S̃ in input units; train R² the
  same way on ``train_rows``.
- any other set with an encoder: δ = encode(x), x̂ = δ D (D the unit-norm directions); this
  ignores decoder norms, biases and input scales, so pass ``sae`` for an SAE's own x̂.

Not-applicable values are NaN, never missing keys. OMP (random sets) is numpy BLAS bound: on
shared CPUs run with OPENBLAS_NUM_THREADS=1 (oversubscribed BLAS threads slow it ~40×).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from atoms.aip.metric import AIP
from atoms.core.config import require
from atoms.core.errors import InputError
from atoms.core.validation import as_rows, check_finite
from atoms.evaluate.metrics import (
    R2_VARIANTS,
    R2Accumulator,
    coherence,
    dead_fraction,
    duplicates,
    l0_per_row,
    l0_summary,
    local_coherence,
    q_star,
    r2_scores,
    rip_bound,
    uniqueness_satisfied,
)
from atoms.evaluate.recovery import l1_recovery_agreement, omp
from atoms.evaluate.units import UnitSet
from atoms.sae.model import SparseAutoencoder

NAN = float("nan")
BATCH_ROWS = 1024


@dataclass
class UnitEvalConfig:
    sparsity_rows: int = 4096
    """Held-out rows for R² and the L0 / q* sparsity sample (all rows if fewer)."""
    local_rows: int = 512
    """Rows for the per-activation (local) coherence reading, and for the OMP codes of sets
    without an encoder (random)."""
    recovery_rows: int = 16
    """Rows for the exact ℓ1-recovery agreement sample of an SAE (0 disables)."""
    recovery_method: str = "omp"
    """'omp' or 'basis_pursuit' (an LP per row: ~230 s a row at N=2304, H=576 on 2 cores)."""
    recovery_max_k: int = 256
    """Skip recovery (NaN) when a sampled code has more active latents than this: exact
    recovery needs K < (1 + 1/μ)/2, and OMP/LP cost grows with K."""
    neuron_tol: float = 1e-6
    """A neuron is active when |x| > tol (paper A7); l0_mean_tol0 reports tol = 0 too."""
    random_k: int = 32
    """Sparsity K of the OMP codes of random directions when the caller gives none."""
    coherence_exact_max_n: int = 2048
    """Pairwise coherence is held whole up to this N; above, it streams into a log histogram
    (median, p99) and exact counts at the uniqueness thresholds (q* stays exact)."""

    def __post_init__(self):
        require(self.sparsity_rows >= 1, "sparsity_rows", f"must be ≥ 1, got {self.sparsity_rows}")
        require(self.local_rows >= 1, "local_rows", f"must be ≥ 1, got {self.local_rows}")
        require(self.recovery_rows >= 0, "recovery_rows", f"must be ≥ 0, got {self.recovery_rows}")
        require(self.recovery_method in ("basis_pursuit", "omp"), "recovery_method",
                f"must be 'basis_pursuit' or 'omp', got {self.recovery_method!r}")
        require(self.recovery_max_k >= 1, "recovery_max_k", "must be ≥ 1")
        require(self.neuron_tol >= 0, "neuron_tol", f"must be ≥ 0, got {self.neuron_tol}")
        require(self.random_k >= 1, "random_k", f"must be ≥ 1, got {self.random_k}")
        require(self.coherence_exact_max_n >= 2, "coherence_exact_max_n", "must be ≥ 2")


def _sample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` rows of ``x`` chosen by a seeded permutation (all of them, in order, if fewer)."""
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


@torch.no_grad()
def _sae_apply(sae: SparseAutoencoder, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, x̂) of ``rows`` through ``sae``, in batches of BATCH_ROWS, on the CPU."""
    device = sae.W_dec.device
    codes, recon = [], []
    for start in range(0, len(rows), BATCH_ROWS):
        out = sae(rows[start:start + BATCH_ROWS].to(device))
        codes.append(out.codes.float().cpu())
        recon.append(out.recon.float().cpu())
    return torch.cat(codes), torch.cat(recon)


def _omp_apply(units: UnitSet, rows: torch.Tensor, aip: AIP | None, k: int):
    """K-sparse OMP codes δ of the AIP-unit atoms and x̂ = Σⱼ δⱼ dⱼ / ‖dⱼ‖_S̃ (input units).

    omp works on whitened unit atoms d̃ⱼ = S̃^{1/2}dⱼ / ‖dⱼ‖_S̃, so un-whitening Σⱼ δⱼ d̃ⱼ gives
    Σⱼ δⱼ dⱼ / ‖dⱼ‖_S̃, i.e. the codes times the AIP-normalised directions.
    """
    codes = torch.from_numpy(omp(rows, units.directions, aip, k=k))
    unit_atoms = (aip or AIP.euclidean(units.d)).normalise(units.directions.double())
    return codes, codes @ unit_atoms


def evaluate_unit_set(units: UnitSet, holdout: torch.Tensor, aip: AIP | None,
                      cfg: UnitEvalConfig | None = None, sae: SparseAutoencoder | None = None,
                      train_rows: torch.Tensor | None = None, random_k: int | None = None,
                      seed: int = 0) -> dict[str, float]:
    """One results-table row for ``units`` on ``holdout`` (input units, (B, H)).

    Keys: n_units, d, eval_rows (rows behind R² and L0), r2_<variant> and train_r2_<variant>
    (R² = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² or / Σ‖x‖², Euclidean or AIP; train_ when
    ``train_rows`` are given, for an SAE or an OMP-coded set), l0_mean/median/p90/max,
    empty_fraction, l0_mean_tol0, dead_fraction,
    coherence_max/median/p99/exact, q_star_pairwise/per_unit/per_activation,
    uniqueness_pct = 100·mean 1[μ < 1/(2Kᵢ − 1)], duplicate_pairs (pairs with AIP |cos| > 0.99),
    rip_bound = (K_median − 1)μ, rip_holds,
    recovery_support_exact/jaccard (SAE only), omp_k (OMP-coded sets only), eval_seconds.
    ``seed`` picks which rows are sampled when there are more than ``cfg.sparsity_rows``.
    """
    t0 = time.perf_counter()
    cfg = cfg or UnitEvalConfig()
    x = as_rows(holdout, "holdout", d=units.d).float()
    check_finite(x, "holdout")
    x = _sample(x, cfg.sparsity_rows, seed)
    if sae is not None and (sae.cfg.d_in, sae.cfg.d_sae) != (units.d, units.n):
        raise InputError(f"{units.name}: sae has d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae} but "
                         f"the unit set has d={units.d}, n={units.n}")
    nan4 = dict.fromkeys(R2_VARIANTS, NAN)
    train_r2, recovery, tol, k_omp = nan4, {"support_exact": NAN, "support_jaccard": NAN}, 0.0, NAN
    if sae is not None:
        codes, recon = _sae_apply(sae, x)
        if train_rows is not None:
            t = _sample(as_rows(train_rows, "train_rows", d=units.d).float(), len(x), seed)
            train_r2 = r2_scores(t, _sae_apply(sae, t)[1], aip)
        sampled = codes[:cfg.recovery_rows]
        if len(sampled) and int((sampled != 0).sum(1).max()) <= cfg.recovery_max_k:
            recovery = l1_recovery_agreement(sae, x[:cfg.recovery_rows], aip, cfg.recovery_method)
    elif units.kind == "neurons":
        codes, recon, tol = x, x, cfg.neuron_tol
    elif units.kind in ("random", "exemplar") or units.encode is None:
        k = cfg.random_k if random_k is None else random_k
        if not 1 <= k <= units.d:
            raise InputError(f"{units.name}: OMP sparsity K={k} must be in 1..d={units.d}")
        x, k_omp = x[:cfg.local_rows], float(k)
        codes, recon = _omp_apply(units, x, aip, k)
        if train_rows is not None:
            t = _sample(as_rows(train_rows, "train_rows", d=units.d).float(), len(x), seed)
            train_r2 = r2_scores(t, _omp_apply(units, t, aip, k)[1], aip)
    else:
        with torch.no_grad():
            codes = torch.cat([units.encode(x[s:s + BATCH_ROWS]).float().cpu()
                               for s in range(0, len(x), BATCH_ROWS)])
        recon = codes @ units.directions
    if codes.shape != (len(x), units.n):
        raise InputError(f"{units.name}: codes have shape {tuple(codes.shape)}, expected "
                         f"({len(x)}, {units.n})")

    row = {"n_units": float(units.n), "d": float(units.d), "eval_rows": float(len(x))}
    row.update({f"r2_{k}": v for k, v in r2_scores(x, recon, aip).items()})
    row.update({f"train_r2_{k}": v for k, v in train_r2.items()})
    l0 = l0_per_row(codes, tol)
    row.update(l0_summary(l0))
    row["l0_mean_tol0"] = float(l0_per_row(codes, 0.0).double().mean())
    row["dead_fraction"] = dead_fraction((codes.abs() > tol).sum(0))
    coh = coherence(units.directions, aip, cfg.coherence_exact_max_n, l0=l0)
    row.update({k: float(v) for k, v in coh.summary().items()})
    n_local = min(cfg.local_rows, len(x))
    local = local_coherence(codes[:n_local], units.directions, aip, tol)
    row["q_star_pairwise"] = q_star(coh, l0, "pairwise")
    row["q_star_per_unit"] = q_star(coh, l0, "per_unit")
    row["q_star_per_activation"] = q_star(coh, l0[:n_local], "per_activation", local)
    row["uniqueness_pct"] = 100.0 * uniqueness_satisfied(coh.mu, l0)
    row["duplicate_pairs"] = float(duplicates(units.directions, aip.S if aip else None)[0])
    row["rip_bound"] = rip_bound(coh.mu, row["l0_median"])
    row["rip_holds"] = float(row["rip_bound"] < 1.0)
    row["recovery_support_exact"] = float(recovery["support_exact"])
    row["recovery_support_jaccard"] = float(recovery["support_jaccard"])
    row["omp_k"] = k_omp
    row["eval_seconds"] = time.perf_counter() - t0
    return row


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, rows: torch.Tensor, aip: AIP | None = None,
             batch_rows: int = 4096, prefix: str = "eval_",
             threshold_start: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of ``sae`` on ``rows`` (input units), keys prefixed with ``prefix``.

    r2_<variant> (see R2Accumulator), l0_mean/median/p90/max, empty_fraction, dead_fraction
    (latents that never fire on these rows) and, for threshold SAEs, threshold_mean/std/min/max in
    normalised units plus mean |θ − θ₀| when ``threshold_start`` is given.
    """
    device = sae.W_dec.device
    r2 = R2Accumulator(sae.cfg.d_in, aip)
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    l0s = []
    for start in range(0, len(rows), batch_rows):
        x = rows[start:start + batch_rows].to(device)
        out = sae(x)
        r2.update(x.cpu(), out.recon.float().cpu())
        active = out.codes != 0
        counts += active.sum(0)
        l0s.append(active.sum(1).cpu())
    metrics = {f"r2_{k}": v for k, v in r2.result().items()}
    metrics.update(l0_summary(torch.cat(l0s)))
    metrics["dead_fraction"] = dead_fraction(counts.cpu())
    if hasattr(sae, "threshold"):
        theta = sae.threshold.detach().float().cpu()
        metrics.update(threshold_mean=float(theta.mean()), threshold_std=float(theta.std()),
                       threshold_min=float(theta.min()), threshold_max=float(theta.max()))
        if threshold_start is not None:
            metrics["threshold_moved"] = float((theta - threshold_start.float()).abs().mean())
    return {f"{prefix}{k}": v for k, v in metrics.items()}
