"""Sets of units to analyse: neurons, SAE features, atoms or random directions.

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
from safetensors import SafetensorError, safe_open

from atoms.core.errors import InputError
from atoms.sae.formats import (
    LLAMA_HP,
    SPARSIFY_CFG,
    SPARSIFY_WEIGHTS,
    import_gemma_scope,
    import_llama_scope,
    import_sparsify,
)
from atoms.sae.model import SparseAutoencoder
from atoms.sae.saelens import CFG, WEIGHTS, load_sae
from atoms.core.validation import as_rows, check_finite

UnitKind = Literal["neurons", "features", "atoms", "random"]
KINDS = ("neurons", "features", "atoms", "random")


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
        out = cls(name, "random", dirs, None, f"random unit directions (seed {seed})")
        out.encode = lambda x: _rows(x, d) @ out.directions.T
        return out

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


def _detect(path: Path) -> str | None:
    """The layout of ``path``: 'saelens', 'sparsify', 'llama_scope', 'gemma_scope' or None."""
    if path.is_dir():
        if (path / CFG).is_file() and (path / WEIGHTS).is_file():
            return "saelens"
        if (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
            return "sparsify"
        if (path / LLAMA_HP).is_file():
            return "llama_scope"
        if (path / "params.npz").is_file() or (path / "params.safetensors").is_file():
            return "gemma_scope"
        return None
    if path.is_file() and path.suffix == ".npz":
        return "gemma_scope"
    if path.is_file() and path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                keys = {k.replace("w_", "W_", 1) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__})") \
                from None
        return "gemma_scope" if {"W_enc", "threshold"} <= keys else None
    return None


LOOKED_FOR = ("a folder with cfg.json + sae_weights.safetensors (ours/SAELens)",
              "cfg.json + sae.safetensors (sparsify)", "hyperparams.json (Llama Scope)",
              "params.npz or a .safetensors with W_enc and threshold (Gemma Scope)")


def load_any_sae(path: str | Path) -> tuple[SparseAutoencoder, str]:
    """Detect the SAE layout at ``path`` and load it; returns (sae, layout)."""
    path = Path(path)
    layout = _detect(path)
    if layout is None:
        raise InputError(f"{path}: no SAE found (looked for {'; '.join(LOOKED_FOR)})")
    loader = {"saelens": load_sae, "sparsify": import_sparsify,
              "llama_scope": import_llama_scope, "gemma_scope": import_gemma_scope}[layout]
    return loader(path), layout


def load_unit_set(path: str | Path, kind: UnitKind = "features", name: str | None = None
                  ) -> UnitSet:
    """Detect the SAE layout at ``path`` and return its units."""
    path = Path(path)
    sae, layout = load_any_sae(path)
    label = name or (path.stem if path.is_file() else path.name)
    return UnitSet.from_sae(sae, label, kind, f"{layout}:{path}")
