"""Exact q* crossings from a stream of pairwise values, without holding the values.

q* = sup{q : μ_q < t(K_q)} needs, at each quantile level q, only whether the q-quantile μ_q of
the pairwise |Gᵢⱼ| lies below t = 1/(2K_q − 1), and the thresholds t are known before the Gram
pass (they come from the L0 sample). With v₍₀₎ ≤ … ≤ v₍ₙ₋₁₎ the sorted values, numpy's linear
quantile is μ_q = lerp(v₍ⱼ₎, v₍ⱼ₊₁₎, γ) with j + γ = q(n − 1). For c = #{v < t}:

    j + 1 < c  ⇒  μ_q < t;      j ≥ c  ⇒  μ_q ≥ t;
    j + 1 = c  ⇒  v₍ⱼ₎ = max{v < t}, v₍ⱼ₊₁₎ = min{v ≥ t}, so μ_q is computed exactly.

So per threshold the stream keeps a count, a max below and a min at-or-above: the crossing is
the one the whole sorted sample gives, in O(#thresholds) memory.
"""

from __future__ import annotations

import numpy as np
import torch


class ThresholdCounts:
    """For ascending thresholds T: #{v < Tₖ}, max{v < Tₖ} and min{v ≥ Tₖ} over added values."""

    def __init__(self, thresholds):
        t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        self.t = torch.from_numpy(np.unique(t[np.isfinite(t)]))
        m = self.t.numel() + 1  # bucket b holds values with exactly b thresholds ≤ v
        self.hist = torch.zeros(m, dtype=torch.int64)
        self.bmax = torch.full((m,), -torch.inf, dtype=torch.float64)
        self.bmin = torch.full((m,), torch.inf, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        v = values.reshape(-1).to(torch.float64)
        bucket = torch.bucketize(v, self.t, right=True)
        self.hist += torch.bincount(bucket, minlength=self.hist.numel())
        self.bmax.scatter_reduce_(0, bucket, v, "amax")
        self.bmin.scatter_reduce_(0, bucket, v, "amin")

    @property
    def n(self) -> int:
        return int(self.hist.sum())

    def at(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(#{v < t}, max{v < t}, min{v ≥ t}) for thresholds ``t`` taken from the constructor's."""
        pos = np.searchsorted(self.t.numpy(), t)
        below = np.cumsum(self.hist.numpy())[pos]
        max_below = np.maximum.accumulate(self.bmax.numpy())[pos]
        min_above = np.minimum.accumulate(self.bmin.numpy()[::-1])[::-1][pos + 1]
        return below, max_below, min_above


def _numpy_lerp(a, b, gamma):
    """numpy's own linear interpolation for quantiles, operation for operation."""
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def below_at_levels(counts: ThresholdCounts, qs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Whether the linear q-quantile of the counted values is < t, level by level."""
    n = counts.n
    ok = np.isinf(t) & (t > 0)
    finite = ~ok
    virtual = (n - 1) * qs[finite]
    j = np.floor(virtual)
    gamma = virtual - j
    j = j.astype(np.int64)
    below, lo, hi = counts.at(t[finite])
    last = j >= n - 1  # μ₁ = v₍ₙ₋₁₎
    hi = np.where(np.isfinite(hi), hi, lo)
    with np.errstate(invalid="ignore"):
        exact = _numpy_lerp(lo, hi, gamma) < t[finite]
    ok[finite] = np.where(last, below >= n, (j + 1 < below) | ((j + 1 == below) & exact))
    return ok
