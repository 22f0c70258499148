"""Sets of units to analyse: neurons, SAE features, atoms, random directions or exemplars.

A ``UnitSet`` holds N unit directions D (N, H) in activation space and, optionally, an encoder
x ↦ codes (B, N): the identity for neurons, x Dᵀ for random directions, the SAE's codes for
features and atoms. ``load_unit_set`` reads any SAE layout that ``atoms.sae.formats`` imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from atoms.core.errors import InputError
from atoms.core.validation import as_rows, check_finite
from atoms.sae.formats import load_any_sae
from atoms.sae.model import SparseAutoencoder

UnitKind = Literal["neurons", "features", "atoms", "random", "exemplar"]
KINDS = ("neurons", "features", "atoms", "random", "exemplar")


@dataclass
class UnitSet:
    name: str
    kind: UnitKind
    directions: torch.Tensor
    """(N, H) float32 rows of unit Euclidean norm."""
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    """x (B, H) ↦ codes (B, N), or None when the set has no encoder."""
    source: str = ""
    """Path or description of where the units came from."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"{self.name}: kind={self.kind!r} is not one of {list(KINDS)}")
        d = as_rows(self.directions, f"{self.name}: directions").detach().float()
        check_finite(d, f"{self.name}: directions")
        norms = d.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            first = int((norms[:, 0] == 0).nonzero()[0])
            raise InputError(f"{self.name}: directions row {first} is zero")
        self.directions = (d / norms).contiguous()

    @property
    def n(self) -> int:
        return self.directions.shape[0]

    @property
    def d(self) -> int:
        return self.directions.shape[1]

    @classmethod
    def neurons(cls, d: int, name: str = "neurons") -> UnitSet:
        """The standard basis of R^d; codes are the activations themselves."""
        return cls(name, "neurons", torch.eye(d), lambda x: _rows(x, d), f"identity basis of R^{d}")

    @classmethod
    def random(cls, d: int, n: int, seed: int = 0, name: str = "random") -> UnitSet:
        """n directions uniform on the sphere S^{d−1}; codes are projections x Dᵀ."""
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n, d, generator=g)
        return cls.projections(name, "random", dirs, f"random unit directions (seed {seed})")

    @classmethod
    def projections(cls, name: str, kind: UnitKind, directions: torch.Tensor, source: str = ""
                    ) -> UnitSet:
        """Any directions with codes x Dᵀ (D at unit norm): how random and stored sets rank
        top-activating contexts."""
        out = cls(name, kind, directions, None, source)
        out.encode = lambda x: _rows(x, out.d) @ out.directions.T
        return out

    @classmethod
    def exemplar(cls, rows: torch.Tensor, n: int, seed: int = 0, name: str = "exemplar"
                 ) -> UnitSet:
        """The memorisation control: ``n`` of the training ``rows`` (all of them if fewer),
        drawn by a seeded permutation, as directions; no encoder (codes are K-sparse OMP)."""
        x = as_rows(rows, f"{name}: rows").float()
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return cls(name, "exemplar", x[pick], None,
                   f"{len(pick)} of {len(x)} training rows (seed {seed})")

    @classmethod
    def from_sae(cls, sae: SparseAutoencoder, name: str, kind: UnitKind = "features",
                 source: str = "") -> UnitSet:
        """Decoder rows of ``sae`` (normalised); codes are ``sae.encode(x)[0]``."""

        def encode(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return sae.encode(_rows(x, sae.cfg.d_in))[0]

        return cls(name, kind, sae.directions, encode, source)


def _rows(x, d: int) -> torch.Tensor:
    return as_rows(x, "x", d=d).float()


def load_unit_set(path: str | Path, kind: UnitKind = "features", name: str | None = None
                  ) -> UnitSet:
    """Detect the SAE layout at ``path`` and return its units."""
    path = Path(path)
    sae, layout = load_any_sae(path)
    label = name or (path.stem if path.is_file() else path.name)
    return UnitSet.from_sae(sae, label, kind, f"{layout}:{path}")
