"""Sparse autoencoders behind one small interface: the threshold SAE (TSAE) and ReLU + L1.

Weights use the SAELens layout: W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec, and
for the TSAE a raw fp32 ``threshold`` (d_sae). Inputs are scaled by ``input_scale`` so that
E‖s·x‖² = 1 before encoding, and the reconstruction is scaled back:

    x̂ = (JumpReLU_θ((s·x − b_dec) W_enc + b_enc) W_dec + b_dec) / s,
    JumpReLU_θ(z) = z · 1[z > θ].

The STE bandwidth ε is stated in these normalised units (E‖x‖² = 1).

Geometry ``aip`` trains on whitened rows x̃ = (x − c) P with P = S̃^{1/2} (c = 0 for the
paper's uncentred S̃, the mean for the centred covariance control), so the loss is
‖m − m̂‖²_S̃ and unit decoder rows have unit AIP norm; ``folded()`` gives the same map on raw
rows (W_enc ← P W_enc, W_dec ← W_dec P⁻¹, b_dec ← b_dec P⁻¹ + s·c), which is what is saved.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from atoms.aip.metric import AIP, Whitening
from atoms.core.config import require
from atoms.core.validation import as_rows, check_finite


@dataclass
class SAEConfig:
    d_in: int | None = None
    """Width H of the activations (unset: the shard set's, filled in by the training run)."""
    d_sae: int | None = None
    """Number of latents |D|, the dictionary size (unset: a study sets it from its grid)."""
    kind: Literal["threshold", "relu", "topk", "batchtopk"] = "threshold"
    """'threshold' (JumpReLU TSAE), 'relu' (ReLU + L1, the 'features' baseline), 'topk' or
    'batchtopk' (saved as the JumpReLU of its learned threshold)."""
    sparsity_loss: Literal["l0", "tanh", "l1", "none"] = "l0"
    """TSAE: 'l0' (step STE) or 'tanh' (Σ tanh(c·f·‖d‖)); ReLU: 'l1' (Σ f·‖d‖); TopK: 'none'."""
    bandwidth: float = 0.05
    """Rectangle-kernel STE width ε, in units of the normalised input (E‖x‖² = 1). 0.05 learns
    the true features of SAELens's synthetic benchmark best (``benchmarks/synthetic_peers.py``;
    DeepMind's 0.001 leaves latents dead and directions off)."""
    init_threshold: float = 0.001
    """Initial θ for every latent (normalised units)."""
    tanh_scale: float = 4.0
    """c in the tanh sparsity loss."""
    decoder_norm: Literal["euclidean", "aip", "none"] = "euclidean"
    """Keep decoder rows at unit Euclidean norm, unit AIP norm ‖d‖_S̃ = 1, or free."""
    bias: bool = True
    """Learn b_enc and b_dec (the identifiability theorem has none)."""
    geometry: Literal["euclidean", "aip"] = "euclidean"
    """Train in Euclidean space or in the AIP geometry (whitened rows; loss ‖m − m̂‖²_S̃, decoder
    rows of unit AIP norm); a run's S̃ comes from its layer (``whitening``)."""
    whitening: Literal["uncentred", "centred"] = "uncentred"
    """geometry 'aip': S̃ = E[mmᵀ]⁻¹ (the paper's) or the centred Cov⁻¹ about the mean (the
    peers' covariance whitening, a control)."""
    init: Literal["theorem", "random"] = "theorem"
    """Encoder init W_enc = W_decᵀ in the training geometry (under 'aip' the theorem's
    W_enc = Dᵀ S̃ on raw rows), or an independent random encoder of unit columns."""
    seed: int | None = None
    """Initialisation seed (unset: the training run's seed; 0 outside a run)."""
    k: int = 0
    """TopK: latents kept per row; BatchTopK: on average per row (required ≥ 1 for both)."""

    def __post_init__(self):
        require(self.d_in is None or self.d_in >= 1, "d_in", f"must be positive, got {self.d_in}")
        require(self.d_sae is None or self.d_sae >= 1, "d_sae",
                f"must be positive, got {self.d_sae}")
        allowed = {"threshold": ("l0", "tanh"), "relu": ("l1",), "topk": ("none",),
                   "batchtopk": ("none",)}[self.kind]
        if self.kind != "threshold" and self.sparsity_loss == "l0":
            self.sparsity_loss = allowed[0]
        require(
            self.sparsity_loss in allowed,
            "sparsity_loss",
            f"{self.sparsity_loss!r} does not apply to kind={self.kind!r} (use {allowed})",
        )
        require(self.bandwidth > 0, "bandwidth", f"must be positive, got {self.bandwidth}")
        require(self.init_threshold >= 0, "init_threshold", "must be non-negative")
        require(self.tanh_scale > 0, "tanh_scale", "must be positive")
        require(self.geometry == "euclidean" or self.decoder_norm != "aip", "decoder_norm",
                "'aip' is implied by geometry 'aip' (use 'euclidean': unit rows once whitened)")
        if self.kind in ("topk", "batchtopk") and self.d_sae is not None:
            bound = f"must be in [1, d_sae={self.d_sae}], got {self.k}"
            require(1 <= self.k <= self.d_sae, "k", bound)


@dataclass
class SAEOutput:
    recon: torch.Tensor
    """x̂ in input units."""
    codes: torch.Tensor
    """Latent activations f (B, d_sae)."""
    pre: torch.Tensor
    """Pre-activations z (B, d_sae)."""
    l0: torch.Tensor
    """Active latents per row (B,), float; carries the step STE gradient to θ."""
    x_norm: torch.Tensor
    """The normalised input s·x."""
    recon_norm: torch.Tensor
    """The reconstruction in normalised units."""


@dataclass
class LossTerms:
    mse: torch.Tensor
    """Mean over rows of ‖s·x − s·x̂‖² (normalised units)."""
    sparsity: torch.Tensor
    """Mean over rows of the sparsity penalty (before its coefficient)."""
    total: torch.Tensor
    l0: torch.Tensor
    """Mean active latents per row (detached; a tensor, so no device sync per step)."""


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUWithL0(torch.autograd.Function):
    """codes = z·1[z > θ] and l0 = Σⱼ 1[zⱼ > θⱼ] in one pass, with rectangle-kernel STEs.

    Backward (Rajamanoharan et al. 2024), with K(u) = 1[|u| < ½]:
        ∂codes/∂z = 1[z > θ];  ∂codes/∂θ = −(θ/ε) K((z−θ)/ε);  ∂l0/∂θ = −(1/ε) K((z−θ)/ε).
    """

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        mask = pre > threshold
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        codes = pre * mask
        return codes, mask.sum(-1, dtype=pre.dtype)

    @staticmethod
    def backward(ctx, grad_codes, grad_l0):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_theta = None
        if grad_codes is None:
            grad_codes = torch.zeros_like(pre)
        if ctx.needs_input_grad[0]:
            grad_pre = grad_codes * (pre > threshold)
        if ctx.needs_input_grad[1]:
            kernel = _rectangle((pre - threshold) / eps)
            weight = threshold * grad_codes
            if grad_l0 is not None:
                weight = weight + grad_l0[:, None]
            grad_theta = -(kernel * weight).sum(0) / eps
        return grad_pre, grad_theta, None


def input_scale(sample: torch.Tensor) -> float:
    """s = 1 / √E‖x‖² over the rows of ``sample`` (1 for an all-zero sample)."""
    mean_sq = float(sample.double().pow(2).sum(1).mean())
    return 1.0 / math.sqrt(mean_sq) if mean_sq > 0 else 1.0


class SparseAutoencoder(nn.Module, abc.ABC):
    """Shared interface: encode (codes + pre-activations), decode, forward, loss terms."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        require(cfg.d_in is not None, "sae.d_in", "is not set")
        require(cfg.d_sae is not None, "sae.d_sae", "is not set")
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed or 0)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        if cfg.init == "random":
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=g)
            self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=0, keepdim=True))
        else:
            self.W_enc = nn.Parameter(w_dec.T.contiguous())  # row-major, as its gradients are
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=cfg.bias)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in), requires_grad=cfg.bias)
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("metric", torch.eye(cfg.d_in))
        self.register_buffer("whiten", None)
        """P (H, H): training rows are (x − centre) P (geometry 'aip'); None: Euclidean."""
        self.register_buffer("unwhiten", None)
        """P⁻¹, back to input space."""
        self.register_buffer("centre", None)
        """c (H,): the shift before whitening (zero for the uncentred S̃)."""

    # -- data scale and metric -------------------------------------------------------------
    @torch.no_grad()
    def fit_input_scale(self, sample: torch.Tensor) -> float:
        """Set s so that E‖s·x̃‖² = 1 on ``sample`` (x̃ the training-geometry rows); returns s."""
        x = as_rows(sample, "sample", d=self.cfg.d_in)
        check_finite(x, "sample")
        s = input_scale(self.to_geometry(x.float()))
        self.input_scale.fill_(s)
        return s

    @torch.no_grad()
    def set_metric(self, aip: AIP) -> None:
        """Use S̃ (input units) for AIP decoder normalisation and duplicate detection. Under
        geometry 'aip' the training coordinates are already whitened: the metric stays I."""
        if self.whiten is None:
            self.metric.copy_(aip.S.to(self.metric.dtype))
        self.constrain_()

    @torch.no_grad()
    def set_whitening(self, whitening: Whitening) -> None:
        """Train in the AIP geometry of ``whitening`` (call before ``fit_input_scale``)."""
        require(self.cfg.geometry == "aip", "sae.geometry",
                f"is {self.cfg.geometry!r}; whitening needs 'aip'")
        p, p_inv, c = (t.to(self.W_dec) for t in whitening.tensors())
        self.whiten, self.unwhiten, self.centre = p, p_inv, c

    def to_geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Rows in the training geometry, before scaling: (x − c) P, or x when Euclidean."""
        return x if self.whiten is None else (x - self.centre) @ self.whiten

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's input s·x̃ for raw rows ``x``."""
        return self.to_geometry(x) * self.input_scale

    def to_input_space(self, recon_norm: torch.Tensor) -> torch.Tensor:
        """x̂ in input units from a normalised reconstruction: (x̂_norm / s) P⁻¹ + c."""
        recon = recon_norm / self.input_scale
        return recon if self.whiten is None else recon @ self.unwhiten + self.centre

    def inference_form(self) -> SparseAutoencoder:
        """What is saved and judged: the folded SAE (a BatchTopK SAE also becomes a JumpReLU)."""
        return self.folded()

    @torch.no_grad()
    def folded(self) -> SparseAutoencoder:
        """The same map on raw rows without whitening (self when Euclidean): W_enc ← P W_enc,
        W_dec ← W_dec P⁻¹, b_dec ← b_dec P⁻¹ + s·c, metric ← P P (the training S̃)."""
        if self.whiten is None:
            return self
        s = self.input_scale
        bias = self.cfg.bias or bool(self.centre.any())
        cfg = dataclasses.replace(self.cfg, geometry="euclidean", decoder_norm="none", bias=bias)
        out = build_sae(cfg)
        out.load_state_dict({k: v for k, v in self.state_dict().items()
                             if k not in ("whiten", "unwhiten", "centre")})
        p, p_inv = self.whiten.double(), self.unwhiten.double()
        b_dec = self.b_dec.double() if self.cfg.bias else torch.zeros_like(self.centre.double())
        out.W_enc.copy_(p @ self.W_enc.double())
        out.W_dec.copy_(self.W_dec.double() @ p_inv)
        out.b_dec.copy_(b_dec @ p_inv + s.double() * self.centre.double())
        out.metric.copy_(p @ p)
        out.trained_geometry = {"geometry": "aip", "whitening": self.cfg.whitening}
        return out

    def _metric_normalised(self) -> torch.Tensor:
        # S̃ for normalised inputs s·x is S̃ / s².
        return self.metric / self.input_scale**2

    # -- forward ---------------------------------------------------------------------------
    def pre_activations(self, x_norm: torch.Tensor) -> torch.Tensor:
        # z = (x − b_dec) W_enc + b_enc, with b_dec folded into the bias so that no gradient
        # w.r.t. the (B, d_in) input is ever formed: 10·B·d·N FLOPs a training step, not 12.
        bias = self.b_enc - self.b_dec @ self.W_enc if self.cfg.bias else self.b_enc
        return torch.addmm(bias, x_norm, self.W_enc)

    @abc.abstractmethod
    def activate(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, active count per row) from pre-activations."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, pre-activations) for inputs in input units."""
        pre = self.pre_activations(self.normalise(x))
        return self.activate(pre)[0], pre

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """x̂ in input units."""
        return self.to_input_space(self._decode_norm(codes))

    def _decode_norm(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, codes, self.W_dec) if self.cfg.bias else codes @ self.W_dec

    def forward(self, x: torch.Tensor, in_geometry: bool = False) -> SAEOutput:
        """The SAE on raw rows ``x``, or on rows already in the training geometry, (x − c)P
        (``in_geometry``: what training batches are; identical when Euclidean)."""
        x_norm = x * self.input_scale if in_geometry else self.normalise(x)
        pre = self.pre_activations(x_norm)
        codes, l0 = self.activate(pre)
        recon_norm = self._decode_norm(codes)
        return SAEOutput(self.to_input_space(recon_norm), codes, pre, l0, x_norm, recon_norm)

    def loss(self, out: SAEOutput, sparsity_coeff: float) -> LossTerms:
        mse = (out.recon_norm - out.x_norm).pow(2).sum(-1).mean()
        sparsity = self.sparsity_penalty(out).mean()
        total = mse + sparsity_coeff * sparsity
        return LossTerms(mse, sparsity, total, out.l0.detach().mean())

    @abc.abstractmethod
    def sparsity_penalty(self, out: SAEOutput) -> torch.Tensor:
        """Per-row sparsity penalty (B,)."""

    # -- constraints and views -------------------------------------------------------------
    def decoder_norms(self) -> torch.Tensor:
        """Per-latent decoder norm in the configured geometry (Euclidean unless 'aip')."""
        if self.cfg.decoder_norm == "aip":
            w = self.W_dec
            return ((w @ self._metric_normalised()) * w).sum(1).clamp_min(0).sqrt()
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project onto the constraints after an optimiser step: unit decoder rows, θ ≥ 0."""
        if self.cfg.decoder_norm != "none":
            self.W_dec.div_(self.decoder_norms().clamp_min(1e-12)[:, None])

    @property
    def directions(self) -> torch.Tensor:
        """Unit directions (N, H) in input space: decoder rows (un-whitened under 'aip')."""
        w = self.W_dec.detach()
        if self.unwhiten is not None:
            w = w @ self.unwhiten
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ThresholdSAE(SparseAutoencoder):
    """JumpReLU threshold SAE with a learnable raw fp32 threshold per latent."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.init_threshold)))

    def activate(self, pre):
        return JumpReLUWithL0.apply(pre, self.threshold, self.cfg.bandwidth)

    def sparsity_penalty(self, out):
        if self.cfg.sparsity_loss == "tanh":
            scaled = out.codes * self.W_dec.norm(dim=1)
            return torch.tanh(self.cfg.tanh_scale * scaled).sum(-1)
        return out.l0

    @torch.no_grad()
    def constrain_(self) -> None:
        super().constrain_()
        self.threshold.clamp_(min=0.0)

    @classmethod
    def from_dictionary(
        cls, atoms: torch.Tensor, aip: AIP, threshold: float | torch.Tensor
    ) -> ThresholdSAE:
        """The closed-form TSAE of the identifiability theorem (paper §4.11).

        W_dec = D (rows are the atoms), W_enc = S̃ Dᵀ, no biases, so that the code is
        σ_τ(Dᵀ S̃ m); it recovers every support when εKδ_max < τ < δ_min − ε(K−1)δ_max
        for atoms of unit AIP norm with coherence ε.
        """
        atoms = as_rows(atoms, "atoms", d=aip.d).float()
        check_finite(atoms, "atoms")
        check_finite(torch.as_tensor(threshold, dtype=torch.float32), "threshold")
        n, d = atoms.shape
        cfg = SAEConfig(d_in=d, d_sae=n, bias=False, decoder_norm="none", init_threshold=0.0)
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_dec.copy_(atoms)
            sae.W_enc.copy_(aip.S.float() @ atoms.T)
            sae.threshold.copy_(torch.as_tensor(threshold, dtype=torch.float32).expand(n))
            sae.metric.copy_(aip.S.float())
        return sae


class ReLUSAE(SparseAutoencoder):
    """ReLU + L1 SAE, the 'features' baseline: penalty Σⱼ fⱼ ‖W_dec,ⱼ‖."""

    def activate(self, pre):
        codes = torch.relu(pre)
        return codes, (codes > 0).sum(-1, dtype=pre.dtype)

    def sparsity_penalty(self, out):
        return out.codes @ self.W_dec.norm(dim=1)


class TopKSAE(SparseAutoencoder):
    """TopK SAE: codes = TopK_k(ReLU(z)), the k largest rectified pre-activations per row.

    ReLU-then-TopK equals SAELens's TopK-then-ReLU; no sparsity penalty (k fixes L0 ≤ k).
    """

    def activate(self, pre):
        values, index = torch.relu(pre).topk(self.cfg.k, dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter(-1, index, values)
        return codes, (values > 0).sum(-1, dtype=pre.dtype)

    def sparsity_penalty(self, out):
        return out.codes.new_zeros(out.codes.shape[0])


class BatchTopKSAE(SparseAutoencoder):
    """BatchTopK (Bussmann et al. 2024): in training the k·B largest rectified pre-activations
    of the batch are kept; θ follows them, θ ← θ + ``THRESHOLD_RATE``·(min kept − θ) (the first
    batch sets it), and at
    inference (``inference_form``) the SAE is the JumpReLU z·1[z > θ]."""

    THRESHOLD_RATE = 0.01

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    def activate(self, pre):
        relu = torch.relu(pre)
        flat = relu.reshape(-1)
        keep = min(self.cfg.k * pre.shape[0], flat.numel())
        values, index = flat.topk(keep, sorted=False)
        codes = torch.zeros_like(flat).scatter(0, index, values).view_as(pre)
        with torch.no_grad():
            kept = values[values > 0]
            if kept.numel():  # the first batch sets θ; later ones move it
                rate = self.THRESHOLD_RATE if bool(self.threshold.any()) else 1.0
                self.threshold.add_((kept.min() - self.threshold) * rate)
        return codes, (codes > 0).sum(-1, dtype=pre.dtype)

    def sparsity_penalty(self, out):
        return out.codes.new_zeros(out.codes.shape[0])

    @torch.no_grad()
    def inference_form(self) -> SparseAutoencoder:
        cfg = dataclasses.replace(self.cfg, kind="threshold", sparsity_loss="l0", k=0)
        out = ThresholdSAE(cfg)
        state = {k: v for k, v in self.state_dict().items() if k != "threshold"}
        out.load_state_dict(state, strict=False)
        out.threshold.copy_(self.threshold)
        if self.whiten is not None:
            out.set_whitening(Whitening(self.whiten, self.unwhiten, self.centre))
        return out.folded()


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """The SAE class named by ``cfg.kind``."""
    kinds = {"threshold": ThresholdSAE, "relu": ReLUSAE, "topk": TopKSAE,
             "batchtopk": BatchTopKSAE}
    return kinds[cfg.kind](cfg)
