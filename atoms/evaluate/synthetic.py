"""Ground-truth atom sets for testing the theory (paper §9.1 item 8).

Atoms are built as whitened unit vectors w̃ⱼ with coherence maxᵢ≠ⱼ |w̃ᵢᵀw̃ⱼ| = ε, then mapped
into activation space by an ill-conditioned A: dⱼ = A w̃ⱼ. Under S̃ = (A Aᵀ)⁻¹ the atoms have
unit AIP norm and AIP coherence ε, while their Euclidean geometry is distorted. Activations
are m = Σⱼ δⱼ dⱼ with K-sparse non-negative δ in [δ_min, δ_max].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from atoms.aip.metric import AIP
from atoms.core.config import require
from atoms.core.errors import InputError
from atoms.evaluate.matching import abs_cosines, assign


@dataclass
class AtomSetShape:
    """What a planted atom set is made of, shared by a single set and the synthetic study."""

    d: int = 64
    """Activation width H."""
    n_atoms: int = 128
    """Number of atoms N (overcompleteness N/H)."""
    delta_min: float = 1.0
    delta_max: float = 2.0
    """Non-zero coefficients δ lie in [delta_min, delta_max]."""
    seed: int = 0
    """Seed of the atoms, the map A and the codes."""

    def __post_init__(self):
        require(self.d >= 2, "d", f"must be at least 2, got {self.d}")
        require(self.n_atoms >= 2, "n_atoms", f"must be at least 2, got {self.n_atoms}")
        require(0 < self.delta_min <= self.delta_max, "delta_min", "need 0 < δ_min ≤ δ_max")


@dataclass
class SyntheticConfig(AtomSetShape):
    coherence: float = 0.2
    """Target AIP coherence ε of the atoms."""
    k: int = 3
    """Sparsity K: atoms per activation."""
    exact_k: bool = True
    """Every activation uses exactly K atoms (else a uniform count in 1..K)."""
    n_samples: int = 20000
    condition: float = 10.0
    """Condition number of the map A from whitened to activation space."""

    def __post_init__(self):
        super().__post_init__()
        require(self.condition >= 1, "condition", "must be ≥ 1")
        require(0 <= self.coherence < 1, "coherence", f"must be in [0, 1), got {self.coherence}")
        require(1 <= self.k <= self.n_atoms, "k", f"must be in 1..n_atoms, got {self.k}")
        require(self.n_samples >= 1, "n_samples", "must be positive")


@dataclass
class SyntheticAtoms:
    cfg: SyntheticConfig
    atoms: torch.Tensor
    """(N, H) atoms in activation space, unit AIP norm under ``aip``."""
    aip: AIP
    """The ground-truth metric S̃ = (A Aᵀ)⁻¹."""
    coherence: float
    """Achieved AIP coherence μ."""
    codes: torch.Tensor
    """(n, N) non-negative K-sparse coefficients δ."""
    activations: torch.Tensor
    """(n, H) activations m = δ D."""

    @property
    def theorem_holds(self) -> bool:
        """δ_min > ε(2K − 1)δ_max: the closed-form TSAE recovers every support."""
        c = self.cfg
        return c.delta_min > self.coherence * (2 * c.k - 1) * c.delta_max


def welch_bound(d: int, n: int) -> float:
    """Lowest possible coherence of n unit vectors in ℝ^d: √((n − d) / (d(n − 1)))."""
    return math.sqrt(max(n - d, 0) / (d * (n - 1)))


def _max_coherence(w: torch.Tensor) -> float:
    g = (w @ w.T).abs_().fill_diagonal_(0.0)
    return float(g.max())


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True)


def _reduce_coherence(w: torch.Tensor, target: float, iters: int = 400) -> torch.Tensor:
    """Elad-style shrinkage: clip the Gram off-diagonal towards ``target``, project back to
    rank d, renormalise; keeps the best (lowest-coherence) frame seen."""
    n, d = w.shape
    best, best_mu = w, _max_coherence(w)
    for _ in range(iters):
        if best_mu <= target:
            break
        g = w @ w.T
        g = torch.where(g.abs() > target, g.sign() * (0.5 * target + 0.5 * g.abs()), g)
        g.fill_diagonal_(1.0)
        lam, u = torch.linalg.eigh(g)
        w = _unit(u[:, -d:] * lam[-d:].clamp_min(0).sqrt())
        mu = _max_coherence(w)
        if mu < best_mu:
            best, best_mu = w, mu
    return best


def _raise_coherence(w: torch.Tensor, target: float, gen: torch.Generator) -> torch.Tensor:
    """Mix every row with random rows sharing a common direction: w(t) = unit(w + t·R);
    bisect t so that the coherence is ε (R alone has coherence ≈ 0.94)."""
    n, d = w.shape
    common = _unit(torch.randn(1, d, generator=gen, dtype=w.dtype))
    r = torch.randn(w.shape, generator=gen, dtype=w.dtype) + 4 * math.sqrt(d) * common
    lo, hi = 0.0, 1.0
    while _max_coherence(_unit(w + hi * r)) < target:
        hi *= 2
        if hi > 1e6:
            raise InputError(f"coherence: ε={target} is too close to 1 to construct")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _max_coherence(_unit(w + mid * r)) < target else (lo, mid)
    return _unit(w + lo * r)


def whitened_atoms(d: int, n: int, target: float, gen: torch.Generator) -> torch.Tensor:
    """(n, d) unit rows with maximum pairwise |cosine| ≈ ``target`` (within 1e-3).

    n ≤ d starts from an orthonormal frame (coherence 0); n > d from random rows, first
    shrunk below the target. Targets below what can be reached raise an error naming the
    Welch bound.
    """
    if n <= d:
        q, _ = torch.linalg.qr(torch.randn(d, n, generator=gen, dtype=torch.float64))
        w = q.T.contiguous()
    else:
        if target < welch_bound(d, n):
            raise InputError(
                f"coherence: ε={target} is below the Welch bound {welch_bound(d, n):.3f} for "
                f"N={n} atoms in H={d} dimensions"
            )
        w = _reduce_coherence(_unit(torch.randn(n, d, generator=gen, dtype=torch.float64)), target)
        reached = _max_coherence(w)
        if reached > target + 1e-3:
            raise InputError(
                f"coherence: ε={target} is not reachable for N={n} atoms in H={d} dimensions "
                f"(reached {reached:.3f}; Welch bound {welch_bound(d, n):.3f})"
            )
    if target > 0 and _max_coherence(w) < target - 1e-3:
        w = _raise_coherence(w, target, gen)
    return w


def _mixing(d: int, condition: float, gen: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, math.log10(condition), d, dtype=torch.float64)
    return (u * sigma) @ v.T


def sample_codes(cfg: SyntheticConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, N) codes: K (or 1..K) random atoms per row, values uniform in [δ_min, δ_max]."""
    order = torch.rand(n, cfg.n_atoms, generator=gen).argsort(dim=1)
    if cfg.exact_k:
        counts = torch.full((n, 1), cfg.k)
    else:
        counts = torch.randint(1, cfg.k + 1, (n, 1), generator=gen)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cfg.n_atoms).expand(n, -1))
    active = ranks < counts
    values = cfg.delta_min + (cfg.delta_max - cfg.delta_min) * torch.rand(
        n, cfg.n_atoms, generator=gen, dtype=torch.float64
    )
    return values * active


def make_atom_set(cfg: SyntheticConfig) -> SyntheticAtoms:
    """Atoms with AIP coherence ε, their metric, and K-sparse activations."""
    gen = torch.Generator().manual_seed(cfg.seed)
    w = whitened_atoms(cfg.d, cfg.n_atoms, cfg.coherence, gen)
    a = _mixing(cfg.d, cfg.condition, gen)
    atoms = w @ a.T  # dⱼ = A w̃ⱼ
    aip = AIP.from_moment(a @ a.T)  # S̃ = (A Aᵀ)⁻¹
    codes = sample_codes(cfg, cfg.n_samples, gen)
    return SyntheticAtoms(
        cfg=cfg,
        atoms=atoms,
        aip=aip,
        coherence=_max_coherence(w),
        codes=codes,
        activations=codes @ atoms,
    )


@dataclass
class AtomMatch:
    cosines: np.ndarray
    """|cos| between each true atom and its matched learned direction (0 if unmatched)."""
    assignment: np.ndarray
    """Index of the learned direction matched to each true atom (−1 if unmatched)."""

    def recovery_rate(self, threshold: float = 0.99) -> float:
        """Fraction of true atoms matched at |cos| > ``threshold``."""
        return float((self.cosines > threshold).mean())


def match_atoms(learned, true) -> AtomMatch:
    """Hungarian matching of learned to true directions on |cos| (Euclidean; parallel
    directions are parallel in every metric)."""
    cos = abs_cosines(true, learned, names=("match_atoms: true", "match_atoms: learned"))
    rows, cols, _ = assign(cos)
    cosines = np.zeros(cos.shape[0])
    assignment = np.full(cos.shape[0], -1)
    cosines[rows], assignment[rows] = cos[rows, cols].numpy(), cols
    return AtomMatch(cosines, assignment)
