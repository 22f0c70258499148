"""The theory test-bed as a study: sweep AIP coherence ε and sparsity K on synthetic atoms.

For every (ε, K) cell it measures, on held-out activations with known atoms and supports:
  closed_form_tsae   the theorem's TSAE (W_enc = Dᵀ S̃, W_dec = D, τ mid-interval)
  closed_form_relu   the same encoder with τ = 0 (ReLU: cross-talk leaks through)
  trained_tsae       a threshold SAE trained from random initialisation (Euclidean geometry)
  trained_relu       a ReLU + L1 SAE trained the same way
  *_aip              the same two trained in the AIP geometry (loss ‖m − m̂‖²_S̃, unit AIP atoms)
and writes one Parquet row per (cell, unit set) plus a PNG of the four maps. Trained sets also
get the SAELens synthetic benchmark's scores (MCC, uniqueness, F1, shrinkage;
``atoms.evaluate.ground_truth``).

    python experiments/synthetic.py [--config experiments/configs/synthetic.yaml] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from atoms.aip.metric import AIP, SecondMoment
from atoms.core.cli import config_parser, load_config, run
from atoms.core.config import require, to_dict
from atoms.core.io import atomic_path, code_version
from atoms.evaluate.ground_truth import ground_truth_scores
from atoms.evaluate.metrics import coherence, l0_summary, q_star, r2_scores, theorem_interval
from atoms.evaluate.recovery import support_agreement
from atoms.evaluate.synthetic import (
    AtomSetShape,
    SyntheticAtoms,
    SyntheticConfig,
    make_atom_set,
    match_atoms,
)
from atoms.sae.model import SAEConfig, ThresholdSAE, build_sae
from atoms.train.loop import TrainConfig, train_sae

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "synthetic.yaml"
UNIT_SETS = ("closed_form_tsae", "closed_form_relu", "trained_tsae", "trained_relu",
             "trained_tsae_aip", "trained_relu_aip")


@dataclass
class SyntheticStudyConfig(AtomSetShape):
    coherences: list[float] = field(default_factory=lambda: [0.15, 0.25, 0.4])
    """Target AIP coherences ε to sweep."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Sparsities K to sweep (each code has 1..K atoms)."""
    n_samples: int = 20000
    """Training activations per cell."""
    eval_samples: int = 2000
    """Held-out activations per cell."""
    condition: float = 10.0
    """Condition number of the map A that takes the AIP-whitened atoms to activation space (1:
    the Euclidean and AIP geometries agree)."""
    latents_per_atom: int = 2
    """Trained SAE width = latents_per_atom · N."""
    train_saes: bool = True
    """Also train a TSAE and a ReLU SAE per cell (the slow part)."""
    sae: SAEConfig = field(default_factory=lambda: SAEConfig(
        bandwidth=0.1, init_threshold=0.3, bias=False))
    """The trained SAEs (the TSAE's bandwidth and init_threshold; ``bias`` for both: the
    theorem has none, and a b_dec can absorb the mean atom and tilt the learned directions);
    the study sets d_in, d_sae, kind and seed."""
    relu_sparsity_coeff: float = 0.1
    """The ReLU SAE's sparsity coefficient (its L1 weight)."""
    geometries: list[str] = field(default_factory=lambda: ["euclidean", "aip"])
    """Geometries the SAEs are trained in; 'aip' adds trained_tsae_aip and trained_relu_aip."""
    aip_source: Literal["estimated", "true"] = "estimated"
    """The AIP geometry's S̃: E[mmᵀ]⁻¹ of the training activations (what a user has), or the
    planted (A Aᵀ)⁻¹."""
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "results/synthetic"

    def __post_init__(self):
        super().__post_init__()
        require(len(self.coherences) > 0, "coherences", "must list at least one value")
        require(len(self.ks) > 0, "ks", "must list at least one value")
        for c in self.coherences:
            require(0 <= c < 1, "coherences", f"values must be in [0, 1), got {c}")
        for k in self.ks:
            require(1 <= k <= self.n_atoms, "ks", f"values must be in 1..n_atoms, got {k}")
        require(self.eval_samples >= 10, "eval_samples", "must be at least 10")
        require(self.latents_per_atom >= 1, "latents_per_atom", "must be at least 1")
        require(len(self.geometries) > 0 and set(self.geometries) <= {"euclidean", "aip"},
                "geometries", f"must list 'euclidean' and/or 'aip', got {self.geometries}")


def _codes_in_true_order(codes: torch.Tensor, assignment: np.ndarray) -> torch.Tensor:
    """Map learned latents onto the true atoms they were matched to (unmatched: zero)."""
    out = torch.zeros(codes.shape[0], len(assignment), dtype=codes.dtype)
    hit = assignment >= 0
    out[:, torch.as_tensor(np.flatnonzero(hit))] = codes[:, torch.as_tensor(assignment[hit])]
    return out


def _evaluate(sae, ev: SyntheticAtoms, assignment: np.ndarray | None = None) -> dict:
    with torch.no_grad():
        out = sae(ev.activations.float())
    codes = out.codes.double()
    if assignment is not None:
        codes = _codes_in_true_order(codes, assignment)
    row = {f"r2_{k}": v for k, v in r2_scores(ev.activations, out.recon.double(), ev.aip).items()}
    row.update(support_agreement(codes, ev.codes))
    row.update(l0_summary(out.l0))
    row["l0_excess"] = row["l0_mean"] - float((ev.codes > 0).sum(1).double().mean())
    residual = ev.activations - out.recon.double()
    row["recon_error_aip_max"] = float(ev.aip.norm(residual).max())
    coh = coherence(sae.directions, ev.aip)  # under the ground-truth metric
    row["q_star_pairwise"] = q_star(coh, out.l0)
    row["coherence_max"] = coh.mu
    return row


def _closed_form(atoms: SyntheticAtoms, ev: SyntheticAtoms) -> list[dict]:
    c, eps = atoms.cfg, atoms.coherence
    lo, hi = theorem_interval(eps, c.k, c.delta_min, c.delta_max)
    tau = max((lo + hi) / 2, 0.0)  # mid-interval; outside the condition no τ is safe
    # §11.1: ‖m − m̂‖_S̃ ≤ √(1 + (K−1)ε)·(K−1)ε·√K·δ_max when supports are exact.
    bound = math.sqrt(1 + (c.k - 1) * eps) * (c.k - 1) * eps * math.sqrt(c.k) * c.delta_max
    rows = []
    for name, threshold in (("closed_form_tsae", tau), ("closed_form_relu", 0.0)):
        row = _evaluate(ThresholdSAE.from_dictionary(atoms.atoms, atoms.aip, threshold), ev)
        rows.append({"unit_set": name, "threshold": threshold, "recon_bound_aip": bound,
                     "atom_recovery_099": 1.0, **row})
    return rows


def _variants(cfg: SyntheticStudyConfig) -> dict[str, tuple[SAEConfig, TrainConfig]]:
    d_sae = cfg.latents_per_atom * cfg.n_atoms
    base = {
        "trained_tsae": (dataclasses.replace(cfg.sae, d_in=cfg.d, d_sae=d_sae, seed=cfg.seed),
                         cfg.train),
        "trained_relu": (SAEConfig(d_in=cfg.d, d_sae=d_sae, kind="relu", bias=cfg.sae.bias,
                                   seed=cfg.seed),
                         dataclasses.replace(cfg.train, sparsity_coeff=cfg.relu_sparsity_coeff)),
    }
    out = {}
    for geometry in cfg.geometries:
        suffix = "" if geometry == "euclidean" else f"_{geometry}"
        for name, (sae_cfg, train_cfg) in base.items():
            out[name + suffix] = (dataclasses.replace(sae_cfg, geometry=geometry), train_cfg)
    return out


def _training_aip(cfg: SyntheticStudyConfig, atoms: SyntheticAtoms) -> AIP:
    if cfg.aip_source == "true":
        return atoms.aip
    return AIP.from_moment(SecondMoment(cfg.d).update(atoms.activations), allow_floor=True)


def ground_truth_row(sae, ev: SyntheticAtoms) -> dict:
    """The SAELens synthetic benchmark's scores of ``sae`` on held-out planted activations."""
    with torch.no_grad():
        out = sae(ev.activations.float())
        eye = torch.eye(sae.cfg.d_sae)
        vectors = sae.decode(eye) - sae.decode(torch.zeros(1, sae.cfg.d_sae))
    scores = ground_truth_scores(sae.directions, ev.atoms, out.codes, ev.codes, vectors,
                                 out.recon, ev.activations, ev.aip)
    return {k if k == "matching" else f"gt_{k}": v for k, v in scores.items()}


def _trained(cfg: SyntheticStudyConfig, atoms: SyntheticAtoms, ev: SyntheticAtoms, progress):
    rows = []
    aip = _training_aip(cfg, atoms) if "aip" in cfg.geometries else None
    for name, (sae_cfg, train_cfg) in _variants(cfg).items():
        sae = build_sae(sae_cfg)
        t0 = time.perf_counter()
        result = train_sae(sae, atoms.activations.float(), train_cfg, progress=progress,
                           aip=aip if sae_cfg.geometry == "aip" else None)
        match = match_atoms(sae.directions, atoms.atoms)
        row = {"unit_set": name, "geometry": sae_cfg.geometry,
               "aip_source": cfg.aip_source if sae_cfg.geometry == "aip" else None,
               "train_seconds": time.perf_counter() - t0,
               "atom_recovery_099": match.recovery_rate(0.99),
               "atom_recovery_090": match.recovery_rate(0.90),
               "resampled": result.resampled,
               **_evaluate(sae, ev, match.assignment), **ground_truth_row(sae, ev)}
        if result.threshold_start is not None:
            row["threshold_mean_start"] = float(result.threshold_start.mean())
            row["threshold_mean_end"] = float(result.threshold_end.mean())
        rows.append(row)
    return rows


def run_cell(cfg: SyntheticStudyConfig, eps: float, k: int, progress: bool = False) -> list[dict]:
    """All unit sets for one (ε, K) cell; training and held-out data share the atoms."""
    shape = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(AtomSetShape)}
    syn = SyntheticConfig(**shape, coherence=eps, k=k, exact_k=False, condition=cfg.condition,
                          n_samples=cfg.n_samples + cfg.eval_samples)
    full = make_atom_set(syn)
    n = cfg.n_samples
    train = dataclasses.replace(full, codes=full.codes[:n], activations=full.activations[:n])
    held = dataclasses.replace(full, codes=full.codes[n:], activations=full.activations[n:])
    rows = _closed_form(full, held)
    if cfg.train_saes:
        rows += _trained(cfg, train, held, progress)
    common = {"epsilon_target": eps, "epsilon": full.coherence, "k": k,
              "theorem_holds": full.theorem_holds}
    return [{**common, **row} for row in rows]


def plot(table: pd.DataFrame, cfg: SyntheticStudyConfig, path: Path) -> None:
    """Four maps over (ε, K) with the theorem boundary δ_min = ε(2K − 1)δ_max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("closed_form_tsae", "support_exact", "closed-form TSAE: exact supports"),
              ("closed_form_relu", "support_exact", "closed-form, τ = 0 (ReLU): exact supports"),
              ("trained_tsae", "atom_recovery_099", "trained TSAE: atoms at |cos| > 0.99"),
              ("trained_tsae_aip", "atom_recovery_099",
               "trained TSAE, AIP geometry: atoms at |cos| > 0.99"),
              ("trained_relu", "support_exact", "trained ReLU SAE: exact supports")]
    panels = [p for p in panels if p[0] in set(table.unit_set)]
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    eps_grid = np.linspace(min(cfg.coherences), max(cfg.coherences), 100)
    k_boundary = (cfg.delta_min / (eps_grid * cfg.delta_max) + 1) / 2
    for ax, (unit_set, metric, title) in zip(axes.flat, panels, strict=False):
        sub = table[table.unit_set == unit_set]
        grid = sub.pivot_table(index="k", columns="epsilon", values=metric)
        mesh = ax.pcolormesh(np.arange(grid.shape[1] + 1), np.arange(grid.shape[0] + 1),
                             grid.values, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(grid.values):
            ax.text(j + 0.5, i + 0.5, f"{v:.2f}", ha="center", va="center",
                    color="white" if v < 0.6 else "black", fontsize=9)
        ax.set_xticks(np.arange(grid.shape[1]) + 0.5, [f"{e:.3g}" for e in grid.columns])
        ax.set_yticks(np.arange(grid.shape[0]) + 0.5, [str(k) for k in grid.index])
        # Theorem boundary, in cell coordinates (interpolated along both axes).
        xs = np.interp(eps_grid, grid.columns, np.arange(grid.shape[1]) + 0.5)
        ys = np.interp(k_boundary, grid.index, np.arange(grid.shape[0]) + 0.5)
        ax.plot(xs, ys, "r--", lw=1.5, label="δ_min = ε(2K−1)δ_max\n(theorem holds below)")
        ax.set_ylim(0, grid.shape[0])
        ax.set_xlabel("AIP coherence ε")
        ax.set_ylabel("sparsity K")
        ax.set_title(title, fontsize=10)
        fig.colorbar(mesh, ax=ax, fraction=0.046)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].legend(loc="upper right", fontsize=7)
    fig.suptitle(f"Synthetic atoms: H={cfg.d}, N={cfg.n_atoms}, δ∈[{cfg.delta_min}, "
                 f"{cfg.delta_max}]", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def run_study(cfg: SyntheticStudyConfig, progress: bool = True) -> tuple[pd.DataFrame, Path]:
    out = Path(cfg.out)
    cells = [(e, k) for e in cfg.coherences for k in cfg.ks]
    rows = []
    for eps, k in tqdm(cells, desc="synthetic cells", disable=not progress):
        rows += run_cell(cfg, eps, k, progress=False)
    table = pd.DataFrame(rows)
    table["config"] = json.dumps(to_dict(cfg))
    table["code_version"] = code_version()
    with atomic_path(out / "synthetic.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    plot(table, cfg, out / "synthetic.png")
    return table, out


def summary(table: pd.DataFrame) -> str:
    cols = ["epsilon", "k", "theorem_holds", "unit_set", "support_exact", "atom_recovery_099",
            "gt_mcc", "gt_f1", "gt_shrinkage", "l0_mean", "r2_euclid_centred", "q_star_pairwise"]
    return table[[c for c in cols if c in table]].to_string(index=False, float_format="%.3f")


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__.splitlines()[0], DEFAULT_CONFIG, SyntheticStudyConfig)
    args = parser.parse_args(argv)
    cfg = load_config(SyntheticStudyConfig, args)
    table, out = run_study(cfg, progress=not args.quiet)
    print(summary(table))
    print(f"\nwrote {out / 'synthetic.parquet'} and {out / 'synthetic.png'}")


if __name__ == "__main__":
    sys.exit(run(main))
