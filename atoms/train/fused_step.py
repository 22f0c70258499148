"""The dense threshold-SAE step as one pure function, for ``torch.compile`` on GPUs.

The same formulas as ``atoms.train.fast_step`` (see there), written without in-place tricks so that
the compiler fuses every elementwise pass and reduction around the five matmuls into a few
kernels; with ``amp`` the matmuls read bf16 copies while θ, weights and gradients stay fp32.
"""

from __future__ import annotations

import torch


def dense_step(x, w_enc, b_enc, b_dec, w_dec, theta, coeff, eps: float, amp: bool):
    """(l0 total, fired, ∂W_dec, g, Σᵢ g_z, ∂W_enc without its b_dec term, ∂θ, NaN probe)."""
    b = x.shape[0]
    dt = torch.bfloat16 if amp else x.dtype
    xc, w_enc_c, w_dec_c = x.to(dt), w_enc.to(dt), w_dec.to(dt)
    z = (xc @ w_enc_c).float() + (b_enc - b_dec @ w_enc)
    active = z > theta
    window = (z - theta).abs() < eps / 2
    f = torch.where(active, z, 0.0)
    recon = (f.to(dt) @ w_dec_c).float() + b_dec
    g = (recon - x) * (2.0 / b)
    d_w_dec = (f.to(dt).T @ g.to(dt)).float()
    g_f = (g.to(dt) @ w_dec_c.T).float()
    d_theta = torch.where(window, theta * g_f + coeff / b, 0.0).sum(0) / -eps
    g_z = torch.where(active, g_f, 0.0)
    d_w_enc = (xc.T @ g_z.to(dt)).float()
    fires = active.sum(0)
    return fires.sum(), fires > 0, d_w_dec, g, g_z.sum(0), d_w_enc, d_theta, z.sum() * 0.0


_compiled = None


def compiled_dense_step():
    """``dense_step`` under torch.compile (built once per process; shapes are static)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(dense_step, dynamic=False)
    return _compiled
