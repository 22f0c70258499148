"""The data plane's config: one YAML per model drives extraction, the S̃ fit and the shift study."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from atoms.aip.fit import AIPFitConfig
from atoms.aip.shift import ShiftConfig
from atoms.extract.extraction import ExtractConfig


@dataclass
class DataConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """Which model, corpus, sites and layers to extract, and where the shards go."""
    aip: AIPFitConfig = field(default_factory=AIPFitConfig)
    """How S̃ is fitted for every extracted (site, layer)."""
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    """The representation-shift sample."""

    @property
    def root(self) -> Path:
        return Path(self.extract.out)
