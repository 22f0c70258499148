"""Representation shift (paper §4.3): pairwise angles between activations, Euclidean vs AIP.

θᴱᵢⱼ = arccos(mᵢᵀmⱼ / ‖mᵢ‖‖mⱼ‖) and θᴬᴵᴾᵢⱼ = arccos(cos_S̃(mᵢ, mⱼ)) over pairs i < j. A shared
offset direction pulls the Euclidean angles below 90°; under the AIP they centre on 90°.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atoms.aip.metric import AIP
from atoms.core.config import require
from atoms.core.validation import as_rows, check_finite
from atoms.extract.shards import ShardSet


@dataclass
class ShiftConfig:
    sample: int = 512
    """Activations per layer whose pairwise angles are measured."""
    seed: int = 0

    def __post_init__(self):
        require(self.sample >= 3, "sample", "must be at least 3")


def sample_rows(folder: Path, n: int, seed: int) -> torch.Tensor:
    """``n`` rows drawn without replacement from the first shards holding at least 10·n rows."""
    shards = ShardSet.open(folder)
    parts, have = [], 0
    for batch in shards.iter_batches(65536):
        parts.append(batch)
        have += len(batch)
        if have >= 10 * n:
            break
    rows = torch.cat(parts)
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]
    return rows[pick]


def pairwise_angles(x, aip: AIP | None = None) -> np.ndarray:
    """Angles in degrees between all pairs i < j of the rows of ``x`` (Euclidean if no AIP)."""
    x = as_rows(x, "activations").to(torch.float64)
    check_finite(x, "activations")
    w = (aip or AIP.euclidean(x.shape[1])).whitened_units(x)
    cos = (w @ w.T).clamp_(-1.0, 1.0)
    iu = torch.triu_indices(len(w), len(w), offset=1)
    return torch.rad2deg(torch.arccos(cos[iu[0], iu[1]])).numpy()


def angle_centre(angles: np.ndarray, bin_width: float = 0.5) -> dict[str, float]:
    """Mean, median, mode (peak of a ``bin_width``° histogram) and spread of an angle sample."""
    counts, edges = np.histogram(angles, bins=np.arange(0.0, 180.0 + bin_width, bin_width))
    peak = int(np.argmax(counts))
    return {"mean": float(np.mean(angles)), "median": float(np.median(angles)),
            "mode": float((edges[peak] + edges[peak + 1]) / 2), "std": float(np.std(angles))}


def representation_shift(x, aip: AIP) -> dict[str, float]:
    """Centre statistics of both angle distributions, and the Euclidean shift from 90°."""
    euclid, metric = angle_centre(pairwise_angles(x)), angle_centre(pairwise_angles(x, aip))
    row = {f"euclid_{k}": v for k, v in euclid.items()}
    row.update({f"aip_{k}": v for k, v in metric.items()})
    row["euclid_shift_deg"] = 90.0 - euclid["mean"]
    row["aip_shift_deg"] = 90.0 - metric["mean"]
    return row
