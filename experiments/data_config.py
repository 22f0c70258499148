"""The data-plane config shared by extract.py, fit_aip.py and shift.py (one YAML per model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from atoms.core.config import require
from atoms.extract.extraction import ExtractConfig
from experiments.common import CONFIGS

DEFAULT_MODEL_CONFIG = CONFIGS / "models" / "smollm2-135m.yaml"


@dataclass
class AIPFitConfig:
    centred: bool = False
    """Centred covariance instead of the paper's uncentred E[mmᵀ] (ablation)."""
    floor: float = 1e-6
    """Eigenvalue floor relative to λ_max."""
    allow_floor: bool = False
    """Floor an ill-conditioned moment instead of failing."""

    def __post_init__(self):
        require(0 < self.floor < 1, "floor", f"must be in (0, 1), got {self.floor}")


@dataclass
class ShiftConfig:
    sample: int = 512
    """Activations per layer whose pairwise angles are measured."""
    seed: int = 0

    def __post_init__(self):
        require(self.sample >= 3, "sample", "must be at least 3")


@dataclass
class DataConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    aip: AIPFitConfig = field(default_factory=AIPFitConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)

    @property
    def root(self) -> Path:
        return Path(self.extract.out)
