"""Cross-seed stability: do two trainings from different seeds find the same units?

For unit sets A and B (N directions each) under the AIP cosine:

- matched_fraction: the share of A's units whose Hungarian partner in B has |cos_S̃| ≥ 0.9;
- pw_mcc: the pairwise mean max-cosine, ½(mean_i max_j |cos(aᵢ, bⱼ)| + mean_j max_i |cos|).

Over the seeds of one (unit set, |D|, |M|) every pair is scored; the interval is a Student-t
95% interval of the pair scores (NaN with a single pair).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy import stats

from atoms.aip.metric import AIP
from atoms.evaluate.matching import abs_cosines, assign

MATCH_COS = 0.9


def pair_stability(a, b, aip: AIP | None = None, threshold: float = MATCH_COS
                   ) -> dict[str, float]:
    """matched_fraction and pw_mcc of unit sets ``a`` and ``b`` (rows are directions)."""
    cos = abs_cosines(a, b, aip)
    rows, cols, _ = assign(cos)
    matched = float((cos[rows, cols] >= threshold).sum()) / cos.shape[0]
    pw = 0.5 * (float(cos.max(1).values.mean()) + float(cos.max(0).values.mean()))
    return {"matched_fraction": matched, "pw_mcc": pw}


def interval(values) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t 95% interval of the mean (NaN bounds for one value)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def seed_stability(sets: dict[int, torch.Tensor], aip: AIP | None = None) -> dict[str, float]:
    """Every seed pair of ``sets`` (seed → directions): mean and interval of both scores, and
    the pair count. Needs two or more seeds."""
    seeds = sorted(sets)
    pairs = [pair_stability(sets[s], sets[t], aip) for s, t in itertools.combinations(seeds, 2)]
    out = {"stability_pairs": float(len(pairs))}
    for key in ("matched_fraction", "pw_mcc"):
        mean, lo, hi = interval([p[key] for p in pairs])
        out.update({f"stability_{key}": mean, f"stability_{key}_lo": lo,
                    f"stability_{key}_hi": hi})
    return out


def random_baseline(n: int, d: int, aip: AIP | None = None, seeds=(10_001, 10_002)
                    ) -> dict[str, float]:
    """The scores of two independent sets of ``n`` directions uniform on the sphere of ℝ^d."""
    a, b = (torch.randn(n, d, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds)
    return pair_stability(a, b, aip)
