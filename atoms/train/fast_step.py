"""A hand-written forward and backward for the threshold SAE with the L0 sparsity loss.

Same loss and gradients as autograd through ``ThresholdSAE`` (normalised units, x = s·x_in;
batches are rows in the SAE's training geometry, already (x − c)P under 'aip'):

    z = x W_enc + b_enc − b_dec W_enc,   m = 1[z > θ],   f = z ⊙ m,   x̂ = f W_dec + b_dec
    L = (1/B) Σᵢ ‖x̂ᵢ − xᵢ‖² + λ (1/B) Σᵢⱼ mᵢⱼ
    g = 2(x̂ − x)/B,   g_f = g W_decᵀ,   g_z = g_f ⊙ m,   K = 1[|z − θ| < ε/2]
    ∂W_dec = fᵀ g,   ∂W_enc = xᵀ g_z − b_dec ⊗ Σᵢ g_z,   ∂b_enc = Σᵢ g_z
    ∂b_dec = Σᵢ g − W_enc Σᵢ g_z,   ∂θⱼ = −(1/ε) Σᵢ Kᵢⱼ (θⱼ g_fᵢⱼ + λ/B)

Dense, that is 10·B·d·N FLOPs in five matmuls, no gradient w.r.t. the input. Sparse (L0 ≪ N),
only the encoder matmul stays dense: f, g_f and g_z are needed only on the active latents and the
STE window, so x̂, ∂W_dec, g_f and ∂W_enc cost O(nnz·d) through CSR products and a sampled
matmul. ``mode="auto"`` switches to sparse once the measured density L0/N falls below
``sparse_below``. On CUDA the matmuls run in bf16 (``amp``), θ, weights and gradients stay
fp32, and the dense step is one compiled function (``atoms.train.fused_step``).
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch

from atoms.core.errors import InputError
from atoms.sae.model import SparseAutoencoder, ThresholdSAE
from atoms.train.fused_step import compiled_dense_step

StepMode = Literal["auto", "dense", "sparse"]
SPARSE_BELOW = 0.07
"""Density L0/N below which auto mode goes sparse on CPUs (the measured crossover, 2 threads:
about 0.15 at d=576, N=2304 and 0.08 at d=2304, N=9216)."""

RECHECK_EVERY = 10
"""Steps between density reads in auto mode."""


def fast_step_applies(sae: SparseAutoencoder) -> bool:
    """The fast step covers the threshold SAE with the L0 sparsity loss."""
    return isinstance(sae, ThresholdSAE) and sae.cfg.sparsity_loss == "l0"


class FastThresholdStep:
    """``step(x, λ)`` sets ``.grad`` of every trainable parameter and returns the loss terms
    (loss, mse, mean L0, fired) as tensors, like ``SAEObjective`` followed by backward."""

    def __init__(self, sae: ThresholdSAE, mode: StepMode = "auto",
                 sparse_below: float | None = None, amp: bool | None = None,
                 compiled: bool | None = None):
        if not fast_step_applies(sae):
            raise InputError(f"fast step: needs a threshold SAE with sparsity_loss 'l0', got "
                             f"kind={sae.cfg.kind!r}, sparsity_loss={sae.cfg.sparsity_loss!r}")
        if mode not in get_args(StepMode):
            raise InputError(f"fast step: mode must be auto, dense or sparse, got {mode!r}")
        cuda = sae.W_enc.is_cuda
        self.sae, self.mode = sae, mode
        if sparse_below is None:  # on GPUs the fused dense step wins at the sizes measured
            sparse_below = 0.0 if cuda else SPARSE_BELOW
        self.sparse_below = sparse_below
        self.amp = cuda if amp is None else amp
        self.compiled = cuda if compiled is None else compiled
        self.density = 1.0
        """Active fraction L0/N of the last step (auto mode reads it to pick the path)."""
        self.last_path = "dense"
        self.calls = 0

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.amp:
            return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()
        return a @ b

    def sparse_now(self) -> bool:
        if self.mode == "auto":
            return self.density < self.sparse_below
        return self.mode == "sparse"

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, sparsity_coeff: float):
        sae = self.sae
        x = batch * sae.input_scale
        if self.compiled and not self.sparse_now():
            self.last_path = "dense (compiled)"
            return self._count(self._fused(x, sparsity_coeff))
        if self.amp:
            bias = sae.b_enc - sae.b_dec @ sae.W_enc if sae.cfg.bias else sae.b_enc
            z = self._mm(x, sae.W_enc).add_(bias)
        else:  # the module's own product, so the gate sees the very same z as autograd's
            z = sae.pre_activations(x)
        self.last_path = "sparse" if self.sparse_now() else "dense"
        path = self._sparse if self.last_path == "sparse" else self._dense
        return self._count(path(x, z, sparsity_coeff))

    def _count(self, terms):
        self.calls += 1
        if self.mode == "auto" and (self.calls <= 2 or self.calls % RECHECK_EVERY == 0):
            self.density = float(terms[2]) / self.sae.cfg.d_sae  # a device sync: not every step
        return terms

    def _fused(self, x, coeff):
        sae = self.sae
        out = compiled_dense_step()(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec, sae.threshold,
                                    torch.tensor(coeff, device=x.device), sae.cfg.bandwidth,
                                    self.amp)
        terms = self._finish(x, coeff, *out[:7])
        return (terms[0] + out[7], *terms[1:])

    def _finish(self, x, coeff, l0_total, fired, d_w_dec, g, g_z_sum, d_w_enc,
                d_theta):
        """Bias gradients, the encoder's b_dec term, the .grad fields and the loss terms."""
        sae, b = self.sae, x.shape[0]
        if sae.cfg.bias:
            d_w_enc.sub_(torch.outer(sae.b_dec, g_z_sum))
            sae.b_enc.grad = g_z_sum
            sae.b_dec.grad = g.sum(0) - sae.W_enc @ g_z_sum
        sae.W_enc.grad, sae.W_dec.grad, sae.threshold.grad = d_w_enc, d_w_dec, d_theta
        mse = g.pow(2).sum() * (b / 4.0)  # g = 2(x̂ − x)/B
        l0 = l0_total.to(x.dtype) / b
        return (mse + coeff * l0), mse, l0, fired

    def _decode(self, f):
        recon = f @ self.sae.W_dec if f.is_sparse_csr else self._mm(f, self.sae.W_dec)
        return recon.add_(self.sae.b_dec) if self.sae.cfg.bias else recon

    def _dense(self, x, z, coeff):
        sae, b = self.sae, x.shape[0]
        theta, eps = sae.threshold, sae.cfg.bandwidth
        # 0/1 floats written straight by the comparisons: cheaper than bool masks here.
        active = torch.gt(z, theta, out=torch.empty_like(z))
        window = torch.gt(z, theta - eps / 2, out=torch.empty_like(z))  # K = 1[|z − θ| < ε/2]
        window.sub_(torch.ge(z, theta + eps / 2, out=torch.empty_like(z)))
        fires = active.sum(0)
        f = z.mul_(active)  # a NaN in z survives (NaN·0), so the loss shows it as autograd's does
        recon = self._decode(f)
        g = (recon - x).mul_(2.0 / b)
        d_w_dec = self._mm(f.T, g)
        g_f = self._mm(g, sae.W_dec.T)
        in_window = window.sum(0)
        d_theta = (theta * window.mul_(g_f).sum(0)).add_(in_window, alpha=coeff / b).div_(-eps)
        g_z = g_f.mul_(active)
        g_z_sum = g_z.sum(0)
        d_w_enc = self._mm(x.T, g_z)
        return self._finish(x, coeff, fires.sum(), fires > 0, d_w_dec, g, g_z_sum, d_w_enc,
                            d_theta)

    def _sparse(self, x, z, coeff):
        sae, (b, n) = self.sae, z.shape
        theta, eps = sae.threshold, sae.cfg.bandwidth
        z_sum = z.sum()
        # Candidates: every active entry and every entry in the STE window (z > θ − ε ⊇ both).
        flat = (z > theta - eps).view(-1).nonzero().squeeze(1)
        rows, cols = flat // n, flat % n
        zv, tv = z.view(-1)[flat], theta[cols]
        act = zv > tv
        win = _window(zv, tv, eps)
        fv = zv * act
        crow = _row_pointers(rows, b)
        recon = self._decode(_csr(crow, cols, fv, (b, n)))
        g = (recon - x).mul_(2.0 / b)
        pattern = _csr(crow, cols, torch.zeros_like(fv), (b, n))
        gf = torch.sparse.sampled_addmm(pattern, g, sae.W_dec.T, beta=0.0).values()
        gz = gf * act
        d_theta = _theta_grad(gf[win], tv[win], cols[win], coeff / b, eps, n)
        g_z_sum = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, cols, gz)
        # Column-major copies of the pattern: (N, B) CSR for fᵀ g and g_zᵀ x.
        order = torch.argsort(cols, stable=True)
        crow_t, rows_t = _row_pointers(cols[order], n), rows[order]
        d_w_dec = _csr(crow_t, rows_t, fv[order], (n, b)) @ g
        d_w_enc = (_csr(crow_t, rows_t, gz[order], (n, b)) @ x).T.contiguous()
        fired = torch.zeros(n, dtype=torch.bool, device=x.device)
        fired[cols[act]] = True
        terms = self._finish(x, coeff, act.sum(), fired, d_w_dec, g, g_z_sum, d_w_enc, d_theta)
        # A non-finite z never reaches the sparse products; 0·Σz makes the loss show it, as the
        # dense step's z·1[z > θ] does.
        return (terms[0] + 0.0 * z_sum, *terms[1:])


def _window(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """The rectangle kernel K((z − θ)/ε) = 1[|z − θ| < ε/2] of the straight-through estimator."""
    return (z - theta).abs_() < eps / 2


def _theta_grad(g_f, theta, cols, coeff_per_row: float, eps: float, n: int) -> torch.Tensor:
    """∂θⱼ = −(1/ε) Σ over window entries (i, j) of (θⱼ g_fᵢⱼ + λ/B)."""
    out = torch.zeros(n, dtype=g_f.dtype, device=g_f.device)
    return out.index_add_(0, cols, theta * g_f + coeff_per_row).div_(-eps)


def _csr(crow, cols, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta state"
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _row_pointers(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers of entries whose (non-decreasing) row indices are ``sorted_rows``."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=sorted_rows.device)
    crow[1:] = torch.cumsum(torch.bincount(sorted_rows, minlength=n_rows), 0)
    return crow
