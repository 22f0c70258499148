"""Exact sparse recovery on AIP-normalised atoms (paper §4.7).

Signals and atoms are whitened (x̃ = S̃^{1/2} x) and the atoms scaled to unit length, so the
coefficients found are those of atoms with ‖dⱼ‖_S̃ = 1. When μ < 1/(2K − 1) both orthogonal
matching pursuit and basis pursuit min ‖δ‖₁ s.t. D̃δ = m̃ return the unique K-sparse code.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog

from atoms.aip.metric import AIP
from atoms.core.errors import InputError
from atoms.core.validation import as_rows, check_finite


def _whitened(signals, atoms, aip: AIP | None) -> tuple[np.ndarray, np.ndarray]:
    atoms = as_rows(atoms, "atoms")
    signals = as_rows(signals, "signals", d=atoms.shape[1])
    check_finite(signals, "signals")
    aip = aip or AIP.euclidean(atoms.shape[1])
    dict_cols = aip.whitened_units(atoms).numpy().T  # (H, N), unit columns
    sig = aip.whiten(signals.to(torch.float64)).numpy()  # (B, H)
    return sig, dict_cols


def omp(signals, atoms, aip: AIP | None = None, k: int | None = None, tol: float = 1e-9):
    """Orthogonal matching pursuit per signal; returns (B, N) coefficients of unit-AIP atoms.

    Stops after ``k`` atoms, or when ‖r‖ ≤ tol·‖m̃‖ (k defaults to H).
    """
    sig, dict_cols = _whitened(signals, atoms, aip)
    h, n = dict_cols.shape
    k = h if k is None else k
    out = np.zeros((sig.shape[0], n))
    for i, y in enumerate(sig):
        support: list[int] = []
        residual = y.copy()
        stop = tol * max(np.linalg.norm(y), 1e-300)
        coef = np.zeros(0)
        while len(support) < k and np.linalg.norm(residual) > stop:
            scores = np.abs(dict_cols.T @ residual)
            scores[support] = -1.0
            support.append(int(np.argmax(scores)))
            coef, *_ = np.linalg.lstsq(dict_cols[:, support], y, rcond=None)
            residual = y - dict_cols[:, support] @ coef
        out[i, support] = coef
    return out


def basis_pursuit(signals, atoms, aip: AIP | None = None, nonnegative: bool = False):
    """min ‖δ‖₁ s.t. D̃δ = m̃ as a linear program (HiGHS); (B, N) coefficients.

    ``nonnegative`` adds δ ≥ 0 (the TSAE's codes are non-negative). Infeasible signals (not in
    the span) are an error naming the row.
    """
    sig, dict_cols = _whitened(signals, atoms, aip)
    h, n = dict_cols.shape
    if nonnegative:
        a_eq, cost, bounds = dict_cols, np.ones(n), [(0, None)] * n
    else:  # δ = u − v with u, v ≥ 0
        a_eq, cost, bounds = np.hstack([dict_cols, -dict_cols]), np.ones(2 * n), [(0, None)] * 2 * n
    out = np.zeros((sig.shape[0], n))
    for i, y in enumerate(sig):
        res = linprog(cost, A_eq=a_eq, b_eq=y, bounds=bounds, method="highs")
        if res.status != 0:
            raise InputError(f"basis pursuit: row {i} has no solution ({res.message})")
        out[i] = res.x if nonnegative else res.x[:n] - res.x[n:]
    return out


def supports(codes, tol: float = 1e-6) -> np.ndarray:
    """Boolean (B, N) support of codes, relative tolerance ``tol`` of each row's max |δ|."""
    c = np.abs(np.asarray(torch.as_tensor(codes).cpu(), dtype=np.float64))
    if c.ndim != 2:
        raise InputError(f"codes: expected 2-D, got shape {c.shape}")
    return c > tol * np.maximum(c.max(1, keepdims=True), 1e-300)


def support_agreement(codes_a, codes_b, tol: float = 1e-6) -> dict[str, float]:
    """Exact-support match rate and mean Jaccard index between two code matrices."""
    a, b = supports(codes_a, tol), supports(codes_b, tol)
    if a.shape != b.shape:
        raise InputError(f"support agreement: shapes {a.shape} and {b.shape} differ")
    inter, union = (a & b).sum(1), (a | b).sum(1)
    jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    exact = float((a == b).all(1).mean())
    return {"support_exact": exact, "support_jaccard": float(jaccard.mean())}


def l1_recovery_agreement(sae, x, aip: AIP | None = None, method: str = "basis_pursuit"):
    """Does ℓ1 recovery on the SAE's own decoder rows find the SAE's code supports?

    The target is the bias-free reconstruction Σⱼ aⱼ dⱼ of each row of ``x``, which is exactly
    representable on the decoder, so exact ℓ1 recoverability is well defined.
    """
    with torch.no_grad():
        codes, _ = sae.encode(torch.as_tensor(x, dtype=torch.float32))
        target = (codes @ sae.W_dec) / sae.input_scale
    atoms = sae.W_dec.detach().to(torch.float64)
    if method == "omp":
        k = int((codes != 0).sum(1).max())
        found = omp(target, atoms, aip, k=max(k, 1))
    else:
        found = basis_pursuit(target, atoms, aip, nonnegative=False)
    return support_agreement(found, codes)
