"""The atomic inner product (AIP): ⟨u, v⟩_S̃ = uᵀ S̃ v with S̃ = E[m mᵀ]⁻¹ (paper §4.2).

Directions and activations are rows: a set of N directions in ℝ^H is an (N, H) tensor.
Whitening is x̃ = S̃^{1/2} x (S̃^{1/2} symmetric), so ⟨u, v⟩_S̃ = ũᵀ ṽ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atoms.core.errors import InputError, SingularMomentError
from atoms.core.io import atomic_path
from atoms.core.validation import as_rows, check_finite

SYRK_BLOCK = 512
"""Column block of the symmetric rank-k update (widths up to this use one plain product)."""


def syrk_upper_(c: torch.Tensor, x: torch.Tensor, block: int = SYRK_BLOCK) -> torch.Tensor:
    """C += xᵀx on the upper block triangle only: (k+1)/2k of the FLOPs of xᵀx for k blocks.

    Diagonal blocks are added whole, blocks below them not at all; read the result through
    its upper triangle (entries (a, b) with a ≤ b are all exact).
    """
    d = x.shape[1]
    if d <= block:
        return c.addmm_(x.T, x)
    for i0 in range(0, d, block):
        i1 = min(i0 + block, d)
        c[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:])
    return c


class SecondMoment:
    """Streaming, mergeable second moment in float64.

    Uncentred (the paper's estimator): E[m mᵀ] = (1/n) Σ mᵢ mᵢᵀ.
    Centred (ablation): E[(m − m̄)(m − m̄)ᵀ]. Its sums are kept about a shift c (the first
    batch's mean), Σ(m − c) and Σ(m − c)(m − c)ᵀ, so that
        cov = Σ(m − c)(m − c)ᵀ / n − (m̄ − c)(m̄ − c)ᵀ
    loses no precision to a large shared offset. ``merge`` moves the other's sums to this shift
    exactly (Chan et al.): with y = m − c₂ and δ = c₂ − c₁,
        Σ(y + δ)(y + δ)ᵀ = Σyyᵀ + (Σy)δᵀ + δ(Σy)ᵀ + n δδᵀ.
    Uncentred sums use c = 0.
    """

    def __init__(self, d: int, centred: bool = False):
        if d < 1:
            raise InputError(f"SecondMoment: d must be positive, got {d}")
        self.d = d
        self.centred = centred
        self.n = 0
        self.shift = torch.zeros(d, dtype=torch.float64)
        self.total = torch.zeros(d, dtype=torch.float64)
        """Σ(m − shift)."""
        self.outer = torch.zeros(d, d, dtype=torch.float64)
        """Σ(m − shift)(m − shift)ᵀ, upper triangle."""

    def update(self, batch) -> SecondMoment:
        """Add a (B, d) batch of activations; rejects NaN/Inf and wrong widths."""
        x = as_rows(batch, "batch", d=self.d).to(torch.float64)
        check_finite(x, "batch")
        if self.centred:
            if self.n == 0:
                self.shift = x.mean(0)
            x = x - self.shift
        syrk_upper_(self.outer, x)
        self.total += x.sum(0)
        self.n += x.shape[0]
        return self

    def merge(self, other: SecondMoment) -> SecondMoment:
        """Add another accumulator's partial sums (shards accumulated elsewhere)."""
        if other.d != self.d or other.centred != self.centred:
            raise InputError(
                f"SecondMoment.merge: cannot merge d={other.d}, centred={other.centred} "
                f"into d={self.d}, centred={self.centred}"
            )
        if other.n == 0:
            return self
        if self.n == 0:
            self.shift = other.shift.clone()
        delta = other.shift - self.shift
        self.outer += other.outer
        if bool(delta.any()):
            cross = torch.outer(other.total, delta)
            self.outer += cross + cross.T + other.n * torch.outer(delta, delta)
        self.total += other.total + other.n * delta
        self.n += other.n
        return self

    @property
    def mean(self) -> torch.Tensor:
        self._require_rows()
        return self.shift + self.total / self.n

    def matrix(self) -> torch.Tensor:
        """The (d, d) float64 second moment (or covariance when centred)."""
        self._require_rows()
        m2 = self.outer / self.n
        m2 = m2.triu() + m2.triu(1).T  # the update keeps the upper triangle only
        if self.centred:
            about_shift = self.total / self.n
            m2 = m2 - torch.outer(about_shift, about_shift)
        return (m2 + m2.T) / 2

    def _require_rows(self):
        if self.n == 0:
            raise InputError("SecondMoment: no rows accumulated yet")


@dataclass
class AIP:
    """S̃ = E[mmᵀ]⁻¹ and S̃^{1/2}, built by eigendecomposition E[mmᵀ] = U Λ Uᵀ.

    S̃ = U Λ⁻¹ Uᵀ and S̃^{1/2} = U Λ^{-1/2} Uᵀ, with Λ floored at ``floor · λ_max``.
    """

    S: torch.Tensor
    S_half: torch.Tensor
    eigenvalues: torch.Tensor
    condition_number: float
    n_floored: int
    floor: float
    mean: torch.Tensor | None = None
    """The centre of a centred moment (S̃ = Cov⁻¹ about it); None for the uncentred E[mmᵀ]."""

    @property
    def d(self) -> int:
        return self.S.shape[0]

    @classmethod
    def from_moment(
        cls, moment, floor: float = 1e-6, allow_floor: bool = False, rows: int | None = None
    ) -> AIP:
        """Invert a second moment (a SecondMoment or a symmetric (d, d) matrix).

        Eigenvalues below ``floor · λ_max`` mark a singular or ill-conditioned moment: an error
        unless ``allow_floor``, in which case they are raised to the floor and counted.
        """
        mean = None
        if isinstance(moment, SecondMoment):
            rows, mean = moment.n, (moment.mean if moment.centred else None)
            moment = moment.matrix()
        m = torch.as_tensor(np.asarray(moment) if not torch.is_tensor(moment) else moment)
        m = m.to(torch.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise InputError(f"AIP: second moment must be a square matrix, got {tuple(m.shape)}")
        check_finite(m, "second moment")
        if not torch.allclose(m, m.T, rtol=1e-8, atol=1e-12 * float(m.abs().max())):
            raise InputError("AIP: second moment is not symmetric")
        if not 0 < floor < 1:
            raise InputError(f"AIP: floor must be in (0, 1), got {floor}")
        lam, U = torch.linalg.eigh(m)
        lam_max = float(lam[-1])
        if lam_max <= 0:
            raise SingularMomentError("AIP: second moment is zero or negative definite")
        lam_min = float(lam[0])
        condition = lam_max / lam_min if lam_min > 0 else float("inf")
        cutoff = floor * lam_max
        n_floored = int((lam < cutoff).sum())
        if n_floored and not allow_floor:
            hint = f" from only {rows} rows for d={m.shape[0]}" if rows is not None else ""
            raise SingularMomentError(
                f"AIP: second moment is singular or ill-conditioned{hint}: {n_floored} of "
                f"{m.shape[0]} eigenvalues below {floor:g}·λ_max (condition number "
                f"{condition:.3g}); collect more rows or pass allow_floor=True"
            )
        lam = lam.clamp_min(cutoff)
        S = (U / lam) @ U.T
        S_half = (U / lam.sqrt()) @ U.T
        return cls(
            S=(S + S.T) / 2,
            S_half=(S_half + S_half.T) / 2,
            eigenvalues=lam,
            condition_number=condition,
            n_floored=n_floored,
            floor=floor,
            mean=mean,
        )

    @classmethod
    def euclidean(cls, d: int) -> AIP:
        """The identity metric: AIP quantities reduce to Euclidean ones."""
        eye = torch.eye(d, dtype=torch.float64)
        return cls(eye, eye.clone(), torch.ones(d, dtype=torch.float64), 1.0, 0, 1e-6)

    def _cast(self, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        dtype = ref.dtype if ref.is_floating_point() else torch.float64
        return t.to(dtype=dtype, device=ref.device)

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ = S̃^{1/2} x for each row of x."""
        x = torch.as_tensor(x)
        return x @ self._cast(self.S_half, x)

    def inner(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """⟨u, v⟩_S̃ = uᵀ S̃ v, row by row (broadcasting)."""
        u, v = torch.as_tensor(u), torch.as_tensor(v)
        if u.shape[-1:] != (self.d,) or v.shape[-1:] != (self.d,):
            raise InputError(f"AIP.inner: rows of width d={self.d} expected, got shapes "
                             f"{tuple(u.shape)} and {tuple(v.shape)}")
        try:
            torch.broadcast_shapes(u.shape, v.shape)
        except RuntimeError:
            raise InputError(f"AIP.inner: shapes {tuple(u.shape)} and {tuple(v.shape)} do not "
                             "broadcast") from None
        return ((u @ self._cast(self.S, u)) * v).sum(-1)

    def norm(self, u: torch.Tensor) -> torch.Tensor:
        """‖u‖_S̃ = √(uᵀ S̃ u)."""
        return self.inner(u, u).clamp_min(0).sqrt()

    def cosine(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Normalised AIP: uᵀ S̃ v / (‖u‖_S̃ ‖v‖_S̃)."""
        return self.inner(u, v) / (self.norm(u) * self.norm(v))

    def normalise(self, directions: torch.Tensor) -> torch.Tensor:
        """Scale each row to unit AIP norm; zero rows are an error."""
        directions = torch.as_tensor(directions)
        check_finite(directions, "AIP.normalise: directions")
        norms = self.norm(directions)
        if bool((norms <= 0).any()):
            raise InputError(f"AIP.normalise: {int((norms <= 0).sum())} zero-norm directions")
        return directions / norms[:, None]

    def whitened_units(self, directions: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """d̃ⱼ = S̃^{1/2} dⱼ / ‖S̃^{1/2} dⱼ‖: whitened unit rows, in float64.

        Whitened ``chunk`` rows at a time into one float64 result (no full-size temporaries).
        """
        d = as_rows(directions, "directions", d=self.d)
        check_finite(d, "directions")
        w = torch.empty(d.shape, dtype=torch.float64, device=d.device)
        for r0 in range(0, len(d), chunk):
            w[r0:r0 + chunk] = self.whiten(d[r0:r0 + chunk].to(torch.float64))
        norms = w.norm(dim=1, keepdim=True)
        if bool((norms <= 0).any()):
            raise InputError(f"AIP: {int((norms <= 0).sum())} zero-norm directions")
        return w.div_(norms)

    def gram(self, directions: torch.Tensor) -> torch.Tensor:
        """The whitened normalised Gram matrix Gᵢⱼ = cos_S̃(dᵢ, dⱼ), (N, N) float64."""
        w = self.whitened_units(directions)
        return w @ w.T


@dataclass
class Whitening:
    """The map to the AIP geometry, x ↦ (x − c) P with P = S̃^{1/2}, and back, y ↦ y P⁻¹ + c.

    ⟨u, v⟩_S̃ = (uP)·(vP), so Euclidean geometry after the map is the AIP geometry before it.
    """

    whiten: torch.Tensor
    unwhiten: torch.Tensor
    centre: torch.Tensor

    @classmethod
    def of(cls, aip: AIP) -> Whitening:
        """From S̃ (and its centre, when centred): P⁻¹ = U Λ^{1/2} Uᵀ by inverting P in float64."""
        p = aip.S_half.to(torch.float64)
        centre = aip.mean if aip.mean is not None else torch.zeros(aip.d, dtype=torch.float64)
        p_inv = torch.linalg.inv(p)
        return cls(p, (p_inv + p_inv.T) / 2, centre.to(torch.float64))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.whiten, self.unwhiten, self.centre

    def to(self, ref: torch.Tensor) -> Whitening:
        """This map in the dtype and on the device of ``ref``."""
        return Whitening(*(t.to(ref) for t in self.tensors()))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(x − c) P, in this map's dtype (``to`` casts it first)."""
        return (x - self.centre) @ self.whiten


def save_aip(aip: AIP, path: str | Path, metadata: dict | None = None) -> Path:
    """Write S̃, S̃^{1/2} and the eigenvalues as safetensors, with JSON metadata (atomic)."""
    meta = {"condition_number": aip.condition_number, "n_floored": aip.n_floored,
            "floor": aip.floor, **(metadata or {})}
    tensors = {"S": aip.S.contiguous(), "S_half": aip.S_half.contiguous(),
               "eigenvalues": aip.eigenvalues.contiguous()}
    if aip.mean is not None:
        tensors["mean"] = aip.mean.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"atoms": json.dumps(meta)})
    return Path(path)


def load_aip(path: str | Path) -> tuple[AIP, dict]:
    """Read a file written by ``save_aip``: (AIP, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: AIP file not found (run experiments/fit_aip.py first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("atoms", "{}"))
            t = {k: f.get_tensor(k) for k in f.keys()}  # S, S_half, eigenvalues (, mean)
    except Exception as e:  # safetensors raises several types for damaged files
        raise InputError(f"{path}: not a readable AIP file ({type(e).__name__})") from None
    missing = {"S", "S_half", "eigenvalues"} - set(t)
    if missing:
        raise InputError(f"{path}: not an AIP file (missing {sorted(missing)})")
    aip = AIP(t["S"], t["S_half"], t["eigenvalues"], float(meta["condition_number"]),
              int(meta["n_floored"]), float(meta["floor"]), t.get("mean"))
    return aip, meta
