"""One-to-one matching of two direction sets on |cos| (Euclidean or AIP), the basis of MCC,
recovery and cross-seed stability.

cos_S̃(a, b) = aᵀ S̃ b / (‖a‖_S̃ ‖b‖_S̃); the Hungarian assignment maximises Σ |cos| over pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from atoms.aip.metric import AIP
from atoms.core.errors import InputError
from atoms.core.validation import as_rows, check_finite

HUNGARIAN_MAX_N = 8192
"""Above this many rows on either side the assignment is greedy (each pair taken in order of
|cos|, each row and column once): O(N² log N) instead of the Hungarian O(N³)."""


def unit_rows(x, name: str, aip: AIP | None = None) -> torch.Tensor:
    """Rows of ``x`` (float64) whitened by S̃^{1/2} when ``aip`` is given, at unit norm; NaN/Inf
    or zero rows are an InputError naming them."""
    w = as_rows(x, name).detach().to(torch.float64).cpu()
    check_finite(w, name)
    if aip is not None:
        w = aip.whiten(w)
    norms = w.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise InputError(f"{name}: row {int((norms[:, 0] == 0).nonzero()[0])} is zero")
    return w / norms


def abs_cosines(a, b, aip: AIP | None = None, names=("directions a", "directions b")
                ) -> torch.Tensor:
    """(Na, Nb) |cos| between the rows of ``a`` and ``b`` (AIP cosines when ``aip`` is given);
    errors name the sets by ``names``."""
    ua, ub = unit_rows(a, names[0], aip), unit_rows(b, names[1], aip)
    if ua.shape[1] != ub.shape[1]:
        raise InputError(f"matching: widths {ua.shape[1]} and {ub.shape[1]} differ")
    return (ua @ ub.T).abs_()


def assign(cos: torch.Tensor) -> tuple[np.ndarray, np.ndarray, str]:
    """(rows, cols, method): a one-to-one matching of min(Na, Nb) pairs maximising Σ |cos|
    (Hungarian), or a greedy one above ``HUNGARIAN_MAX_N``."""
    c = cos.numpy()
    if max(c.shape) <= HUNGARIAN_MAX_N:
        rows, cols = linear_sum_assignment(c, maximize=True)
        return rows, cols, "hungarian"
    order = np.argsort(-c, axis=None, kind="stable")
    used_r, used_c = np.zeros(c.shape[0], bool), np.zeros(c.shape[1], bool)
    rows, cols = [], []
    for flat in order:
        r, k = divmod(int(flat), c.shape[1])
        if not (used_r[r] or used_c[k]):
            used_r[r] = used_c[k] = True
            rows.append(r)
            cols.append(k)
            if len(rows) == min(c.shape):
                break
    rows, cols = np.asarray(rows), np.asarray(cols)
    keep = np.argsort(rows)
    return rows[keep], cols[keep], "greedy"
