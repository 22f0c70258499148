"""One definition per quantity: L0, dead fraction, AIP coherence, q*, uniqueness, RIP, and R²
(defined in ``atoms.aip.r2``, beside the geometry it is measured in).

Every function states its formula; result rows name the variant they used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atoms.aip.metric import AIP
from atoms.aip.r2 import R2_VARIANTS, R2Accumulator, r2_scores  # noqa: F401 (served here too)
from atoms.core.errors import InputError
from atoms.core.validation import as_counts, as_rows, check_finite
from atoms.evaluate.threshold_counts import ThresholdCounts, below_at_levels

Q_STAR_READINGS = ("pairwise", "per_unit", "per_activation")
QUANTILE_METHOD = "linear"


# -- sparsity --------------------------------------------------------------------------------
def l0_per_row(codes, tol: float = 0.0) -> torch.Tensor:
    """Kᵢ = #{j : |δᵢⱼ| > tol}, the number of active units of each row."""
    codes = as_rows(codes, "codes")
    return (codes.abs() > tol).sum(1)


def l0_summary(l0: torch.Tensor) -> dict[str, float]:
    """Mean, median, 90th percentile and max of an L0 sample; fraction of empty codes."""
    k = as_counts(l0, "l0")
    qs = torch.quantile(k, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {
        "l0_mean": float(k.mean()),
        "l0_median": float(qs[0]),
        "l0_p90": float(qs[1]),
        "l0_max": float(k.max()),
        "empty_fraction": float((k == 0).to(torch.float64).mean()),
    }


def dead_fraction(fire_counts) -> float:
    """Fraction of units that never fired: #{j : Σᵢ 1[δᵢⱼ ≠ 0] = 0} / N."""
    counts = torch.as_tensor(fire_counts)
    return float((counts == 0).to(torch.float64).mean())


# -- coherence -------------------------------------------------------------------------------
class LogHistogram:
    """Streaming histogram of values in [0, 1] on log-spaced bins (quantiles to ~0.25%).

    Values below ``low`` fall into bin 0, whose representative value is 0.
    """

    def __init__(self, bins: int = 8192, low: float = 1e-9):
        self.low = low
        self.log_edges = torch.linspace(np.log10(low), 0.0, bins + 1, dtype=torch.float64)
        self.counts = torch.zeros(bins + 2, dtype=torch.float64)  # [<low, bins…, ≥1]

    def add(self, values: torch.Tensor) -> None:
        # Bin index from the log directly (edges are evenly spaced in log10): 0 below ``low``,
        # 1…bins inside, bins + 1 at 1.0.
        bins = self.counts.numel() - 2
        lo, step = float(self.log_edges[0]), float(self.log_edges[1] - self.log_edges[0])
        v = values.reshape(-1).to(torch.float64).clamp_min(self.low * 0.5).log10_()
        idx = v.sub_(lo).div_(step).floor_().add_(1).clamp_(0, bins + 1).to(torch.int64)
        self.counts += torch.bincount(idx, minlength=self.counts.numel()).to(torch.float64)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def quantile(self, qs: np.ndarray) -> np.ndarray:
        """Inverse CDF by geometric interpolation inside the bin holding rank q·(n−1)."""
        counts = self.counts.numpy()
        cum = np.cumsum(counts)
        ranks = np.asarray(qs, dtype=np.float64) * max(self.n - 1, 0)
        b = np.searchsorted(cum, ranks, side="right")
        b = np.minimum(b, counts.size - 1)
        before = np.where(b > 0, cum[np.maximum(b - 1, 0)], 0.0)
        frac = np.where(counts[b] > 0, (ranks - before + 0.5) / np.maximum(counts[b], 1), 0.5)
        edges = self.log_edges.numpy()
        lo = edges[np.clip(b - 1, 0, edges.size - 1)]
        hi = edges[np.clip(b, 0, edges.size - 1)]
        value = 10 ** (lo + np.clip(frac, 0, 1) * (hi - lo))
        return np.where(b == 0, 0.0, np.where(b == counts.size - 1, 1.0, value))


class ExactSample:
    """A sample held whole; quantiles by numpy's ``QUANTILE_METHOD``."""

    def __init__(self, values):
        self.values = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
        if self.values.size == 0:
            raise InputError("empty sample")

    @property
    def n(self) -> int:
        return self.values.size

    def quantile(self, qs: np.ndarray) -> np.ndarray:
        return np.quantile(self.values, qs, method=QUANTILE_METHOD)


@dataclass
class Coherence:
    """AIP coherence of a direction set: |Gᵢⱼ| = |cos_S̃(dᵢ, dⱼ)| over pairs i < j."""

    pairwise: ExactSample | LogHistogram
    """The distribution of |Gᵢⱼ|, i < j (exact, or a histogram for large N)."""
    per_unit: np.ndarray
    """μⱼ = maxᵢ≠ⱼ |Gᵢⱼ| for every unit."""
    mu: float
    """μ = max over all pairs."""
    exact: bool
    counts: ThresholdCounts | None = None
    """For a histogram: exact counts at the uniqueness thresholds of ``counted_l0``."""
    counted_l0: np.ndarray | None = None

    def summary(self) -> dict[str, float]:
        q = self.pairwise.quantile(np.array([0.5, 0.99]))
        return {"coherence_max": self.mu, "coherence_median": float(q[0]),
                "coherence_p99": float(q[1]), "coherence_exact": self.exact}


def coherence(
    directions, aip: AIP | None = None, exact_max_n: int = 2048, block: int = 512, l0=None
) -> Coherence:
    """AIP coherence of the rows of ``directions`` (N, H), computed in row blocks.

    Only a (block, N) slice of the Gram matrix exists at a time; for N > ``exact_max_n`` the
    pairwise values stream into a LogHistogram (median, p99) and, given the L0 sample ``l0``,
    into exact counts at its uniqueness thresholds, so that q* (pairwise) stays exact. Memory
    is O(block·N + N·H).
    """
    d = as_rows(directions, "directions")
    check_finite(d, "directions")
    n = d.shape[0]
    if n < 2:
        raise InputError(f"coherence: need at least two directions, got {n}")
    w = (aip or AIP.euclidean(d.shape[1])).whitened_units(d)
    del d
    exact = n <= exact_max_n
    sinks = [[]] if exact else [LogHistogram()]
    k = None if exact or l0 is None else _l0_sample(l0)
    counts = None if k is None else ThresholdCounts(_uniqueness_thresholds(k))
    if counts is not None:
        sinks.append(counts)
    per_unit = torch.zeros(n, dtype=torch.float64)
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        rows = w[r0:r1]
        square = (rows @ rows.T).abs_()  # this block against itself: keep column > row
        iu = torch.triu_indices(r1 - r0, r1 - r0, offset=1)
        parts = [square[iu[0], iu[1]]]
        per_unit[r0:r1] = torch.maximum(per_unit[r0:r1], square.fill_diagonal_(0).amax(1))
        if r1 < n:  # against every later row: all above the diagonal
            rect = (rows @ w[r1:].T).abs_()
            per_unit[r0:r1] = torch.maximum(per_unit[r0:r1], rect.amax(1))
            per_unit[r1:] = torch.maximum(per_unit[r1:], rect.amax(0))
            parts.append(rect.view(-1))
        for values in parts:
            for sink in sinks:
                sink.append(values.numpy().copy()) if isinstance(sink, list) else sink.add(values)
    pairwise = ExactSample(np.concatenate(sinks[0])) if exact else sinks[0]
    return Coherence(pairwise, per_unit.numpy(), float(per_unit.max()), exact, counts, k)


def local_coherence(codes, directions, aip: AIP | None = None, tol: float = 0.0) -> np.ndarray:
    """μᵢ = max over pairs j ≠ k in supp(δᵢ) of |Gⱼₖ| (0 when |supp| < 2), per activation."""
    codes = as_rows(codes, "codes")
    check_finite(codes, "codes")
    w = (aip or AIP.euclidean(directions.shape[1])).whitened_units(directions)
    if codes.shape[1] != w.shape[0]:
        raise InputError(f"codes have {codes.shape[1]} units but directions {w.shape[0]}")
    full = (w @ w.T).abs_().fill_diagonal_(0.0) if w.shape[0] <= 4096 else None
    out = np.zeros(codes.shape[0])
    for i, row in enumerate(codes.abs() > tol):
        idx = row.nonzero().squeeze(1)
        if idx.numel() < 2:
            continue
        if full is not None:
            sub = full[idx][:, idx]
        else:
            sub = (w[idx] @ w[idx].T).abs_().fill_diagonal_(0.0)
        out[i] = float(sub.max())
    return out


DUPLICATE_COS = 0.99
"""Two units whose directions have |cos_S̃| above this count as one duplicated pair."""


def duplicates(directions, metric: torch.Tensor | None = None, threshold: float = DUPLICATE_COS,
               block: int = 1024) -> tuple[int, torch.Tensor]:
    """Pairs i < j of near-parallel units, |cos_S̃(dᵢ, dⱼ)| = |dᵢᵀ S̃ dⱼ| / (‖dᵢ‖_S̃ ‖dⱼ‖_S̃) >
    ``threshold`` (S̃ = ``metric``, Euclidean when None): (their count, a mask of every unit
    that duplicates an earlier one). Blocks of ``block`` rows, so N² is never held."""
    d = as_rows(directions, "directions").detach().to(torch.float64)
    check_finite(d, "directions")
    s = metric.detach().to(device=d.device, dtype=torch.float64) \
        if metric is not None else None
    sd = d @ s if s is not None else d
    norms = (sd * d).sum(1).clamp_min(1e-300).sqrt()[:, None]
    units, s_units = d / norms, sd / norms
    n, count = len(d), 0
    later = torch.zeros(n, dtype=torch.bool, device=d.device)
    cols = torch.arange(n, device=d.device)
    for r0 in range(0, n, block):
        rows = cols[r0:r0 + block, None]
        hit = ((s_units[r0:r0 + block] @ units.T).abs() > threshold) & (cols[None] > rows)
        count += int(hit.sum())
        later |= hit.any(0)
    return count, later


# -- stability q* and its relatives ----------------------------------------------------------
def uniqueness_threshold(k) -> np.ndarray:
    """t(K) = 1/(2K − 1) for K > ½, +∞ otherwise (an empty code is trivially unique)."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(k > 0.5, 1.0 / (2.0 * k - 1.0), np.inf)


def _l0_sample(l0) -> np.ndarray:
    k = np.asarray(torch.as_tensor(l0).cpu(), dtype=np.float64).reshape(-1)
    if k.size == 0:
        raise InputError("q*: empty sparsity sample")
    return k


def _uniqueness_thresholds(k: np.ndarray, grid: int = 10001) -> np.ndarray:
    """t(K_q) at the ``grid`` quantile levels of the sparsity sample."""
    return uniqueness_threshold(np.quantile(k, np.linspace(0.0, 1.0, grid),
                                            method=QUANTILE_METHOD))


def q_star_crossing(coherence_sample, sparsity_sample, grid: int = 10001) -> float:
    """q* = sup{q ∈ [0, 1] : μ_q < 1/(2K_q − 1)}, on a grid of ``grid`` quantile levels.

    μ_q and K_q are q-quantiles of the coherence and sparsity samples; g(q) = μ_q − t(K_q) is
    non-decreasing, so q* is the last grid level before g turns non-negative (0 if g(0) ≥ 0).
    ``coherence_sample`` is an ExactSample or LogHistogram (μ_q read off it) or ThresholdCounts
    (the comparison made exactly, see ``atoms.evaluate.threshold_counts``).
    """
    qs = np.linspace(0.0, 1.0, grid)
    t = _uniqueness_thresholds(_l0_sample(sparsity_sample), grid)
    if isinstance(coherence_sample, ThresholdCounts):
        ok = below_at_levels(coherence_sample, qs, t)
    else:
        ok = coherence_sample.quantile(qs) < t
    if not ok[0]:
        return 0.0
    fails = np.flatnonzero(~ok)
    return 1.0 if fails.size == 0 else float(qs[fails[0] - 1])


def q_star(
    coh: Coherence,
    l0,
    reading: str = "pairwise",
    local: np.ndarray | None = None,
) -> float:
    """Stability q* under one of the three readings of paper §4.9.

    pairwise (default): crossing of the pairwise |G| quantiles with the L0 quantiles.
    per_unit: the same crossing with the per-unit coherence μⱼ = maxᵢ≠ⱼ |Gᵢⱼ|.
    per_activation: fraction of activations with local μᵢ < 1/(2Kᵢ − 1) (needs ``local``).
    """
    k = as_counts(l0, "l0").numpy()
    if reading == "pairwise":
        counted = coh.counts is not None and np.array_equal(coh.counted_l0, k)
        return q_star_crossing(coh.counts if counted else coh.pairwise, k)
    if reading == "per_unit":
        return q_star_crossing(ExactSample(coh.per_unit), k)
    if reading == "per_activation":
        if local is None or len(local) != len(k):
            raise InputError("q*(per_activation): needs one local coherence per activation")
        return float(np.mean(np.asarray(local) < uniqueness_threshold(k)))
    raise InputError(f"q*: unknown reading {reading!r} (choose from {Q_STAR_READINGS})")


def uniqueness_satisfied(mu: float, l0) -> float:
    """Fraction of activations whose code is provably unique under the global coherence:
    mean over i of 1[μ < 1/(2Kᵢ − 1)] (the classical worst-case condition)."""
    k = np.asarray(torch.as_tensor(l0).cpu(), dtype=np.float64).reshape(-1)
    return float(np.mean(mu < uniqueness_threshold(k)))


def rip_bound(mu: float, k: float) -> float:
    """Gershgorin bound on the RIP constant of order K: δ_K ≤ (K − 1)μ; RIP holds if < 1."""
    return max(k - 1.0, 0.0) * mu


# -- theory checks for learned thresholds ----------------------------------------------------
def theorem_interval(eps: float, k: float, delta_min: float, delta_max: float) -> tuple:
    """The TSAE threshold interval (εKδ_max, δ_min − ε(K−1)δ_max); empty unless
    δ_min > ε(2K−1)δ_max."""
    return eps * k * delta_max, delta_min - eps * (k - 1) * delta_max


def threshold_interval_check(
    thresholds, codes, directions, aip: AIP, k_quantile: float = 1.0
) -> dict[str, float]:
    """Where learned thresholds sit against the theorem interval, in AIP-unit-atom units.

    A code aⱼ on decoder row dⱼ is δⱼ = aⱼ ‖dⱼ‖_S̃ on the AIP-normalised atom; thresholds are
    rescaled the same way. ``directions`` are the decoder rows in input units (for an SAE with
    an input scale s: W_dec / s), so that x̂ = Σⱼ aⱼ dⱼ. ε = μ (AIP coherence), K = the
    ``k_quantile`` of L0, δ_min/δ_max = the smallest/largest non-zero rescaled code.
    """
    scale = aip.norm(torch.as_tensor(directions).to(torch.float64))
    theta = torch.as_tensor(thresholds).to(torch.float64) * scale
    delta = torch.as_tensor(codes).to(torch.float64).abs() * scale
    active = delta[delta > 0]
    if active.numel() == 0:
        raise InputError("threshold check: every code is empty")
    k = float(np.quantile(l0_per_row(codes).numpy(), k_quantile))
    eps = coherence(directions, aip).mu
    lo, hi = theorem_interval(eps, k, float(active.min()), float(active.max()))
    inside = ((theta > lo) & (theta < hi)).to(torch.float64).mean()
    return {"interval_low": lo, "interval_high": hi, "interval_feasible": lo < hi,
            "thresholds_inside": float(inside), "eps": eps, "k": k}
