"""Input checks shared by every module: shapes and finiteness, with one-line errors."""

from __future__ import annotations

import numpy as np
import torch

from atoms.core.errors import InputError


def as_rows(x, name: str, d: int | None = None) -> torch.Tensor:
    """A (rows, d) tensor from a tensor or array; names ``name`` in the error otherwise."""
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise InputError(f"{name}: expected a 2-D (rows, d) array, got shape {tuple(t.shape)}")
    if d is not None and t.shape[1] != d:
        raise InputError(f"{name}: expected width d={d}, got {t.shape[1]}")
    if t.shape[0] == 0:
        raise InputError(f"{name}: no rows")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise InputError(f"{name}: expected a numeric array, got dtype {t.dtype}")
    return t


def as_counts(x, name: str) -> torch.Tensor:
    """A non-empty 1-D float64 sample of counts (an L0 sample): finite and non-negative."""
    t = torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x)).detach().cpu()
    t = t.to(torch.float64).reshape(-1)
    if t.numel() == 0:
        raise InputError(f"{name}: empty sample")
    check_finite(t, name)
    if bool((t < 0).any()):
        first = int((t < 0).nonzero()[0])
        raise InputError(f"{name}: {int((t < 0).sum())} negative values (first at index {first})")
    return t


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise if ``x`` holds NaN or Inf, saying how many and where the first one is."""
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise InputError(f"{name}: {int(bad.sum())} NaN/Inf values (first at index {first})")
