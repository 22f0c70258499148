"""Faithfulness R² in both geometries: Euclidean and the atomic inner product.

Defined here, beside the geometry it is measured in, so the SAE formats can measure an
approximation with it; ``atoms.evaluate.metrics`` serves it with every other metric.
"""

from __future__ import annotations

import torch

from atoms.aip.metric import AIP
from atoms.core.errors import InputError
from atoms.core.validation import as_rows, check_finite

R2_VARIANTS = ("euclid_centred", "euclid_uncentred", "aip_centred", "aip_uncentred")


class R2Accumulator:
    """Streaming R² in all four variants (float64 sums, mergeable across batches).

    R² = 1 − Σᵢ ‖mᵢ − m̂ᵢ‖² / Σᵢ ‖mᵢ − m̄‖²  (centred)  or  / Σᵢ ‖mᵢ‖²  (uncentred),
    with ‖v‖² = vᵀv (Euclidean) or vᵀ S̃ v (AIP). The centred sum is kept about a shift c (the
    first batch's mean), Σ‖m − m̄‖² = Σ‖m − c‖² − n‖m̄ − c‖², so a large shared offset costs no
    precision. The centred R² of constant activations is NaN (no variance to explain).
    """

    def __init__(self, d: int, aip: AIP | None = None):
        self.d = d
        self.S = (aip or AIP.euclidean(d)).S
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.total = torch.zeros(d, dtype=torch.float64)
        """Σ(m − shift)."""
        self.sq = {"euclid": 0.0, "aip": 0.0}
        self.sq_shifted = {"euclid": 0.0, "aip": 0.0}
        self.res = {"euclid": 0.0, "aip": 0.0}

    def _norms(self, v: torch.Tensor) -> dict[str, float]:
        return {"euclid": float((v * v).sum()), "aip": float(((v @ self.S) * v).sum())}

    def update(self, x, x_hat) -> R2Accumulator:
        x = as_rows(x, "activations", d=self.d).to(torch.float64)
        x_hat = as_rows(x_hat, "reconstructions", d=self.d).to(torch.float64)
        if x.shape != x_hat.shape:
            raise InputError(f"R²: {tuple(x.shape)} activations vs {tuple(x_hat.shape)} recons")
        check_finite(x, "activations")
        check_finite(x_hat, "reconstructions")
        if self.shift is None:
            self.shift = x.mean(0)
        shifted = x - self.shift
        for key, value in self._norms(x).items():
            self.sq[key] += value
        for key, value in self._norms(shifted).items():
            self.sq_shifted[key] += value
        for key, value in self._norms(x - x_hat).items():
            self.res[key] += value
        self.total += shifted.sum(0)
        self.n += x.shape[0]
        return self

    def result(self) -> dict[str, float]:
        """{'euclid_centred': …, 'euclid_uncentred': …, 'aip_centred': …, 'aip_uncentred': …}."""
        if self.n == 0:
            raise InputError("R²: no rows accumulated")
        centre = self._norms((self.total / self.n)[None])  # ‖m̄ − c‖²
        out = {}
        for key in ("euclid", "aip"):
            for centred in (True, False):
                denom = (self.sq_shifted[key] - self.n * centre[key]) if centred else self.sq[key]
                name = f"{key}_{'centred' if centred else 'uncentred'}"
                out[name] = 1.0 - self.res[key] / denom if denom > 0 else float("nan")
        return out


def r2_scores(x, x_hat, aip: AIP | None = None) -> dict[str, float]:
    """All four R² variants of reconstructions ``x_hat`` of ``x`` (see R2Accumulator)."""
    x = as_rows(x, "activations")
    return R2Accumulator(x.shape[1], aip).update(x, x_hat).result()
