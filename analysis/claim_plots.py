"""The figures a researcher looks at first: the R²–L0 frontier of every unit set, train and
held-out R² against |D|/|M| for every |M| on one axis, and the |M| × |D| heat maps of train and
held-out R² side by side. Error bars are 95% intervals over seeds (``aggregate``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import PRIMARY_R2
from analysis.plots import _colour, _order, plt, r2_heatmap_on

TRAIN_R2 = f"train_{PRIMARY_R2}"


def _err(rows: pd.DataFrame, metric: str) -> np.ndarray | None:
    mean, lo, hi = (rows.get(f"{metric}_{s}") for s in ("mean", "lo", "hi"))
    if lo is None or hi is None or not lo.notna().any():
        return None
    y = mean.to_numpy(float)
    return np.nan_to_num(np.vstack([y - lo.to_numpy(float), hi.to_numpy(float) - y]).clip(0))


def r2_l0_frontier(agg: pd.DataFrame, target: float | None = None, title: str = "") -> Figure:
    """Held-out R² against mean L0, one marker per unit set (its largest |D|, then |M|; several
    points joined when the set was run at several k or target L0), the target L0 marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = agg.dropna(subset=[f"{PRIMARY_R2}_mean", "l0_mean_mean"])
    for i, name in enumerate(_order(rows["unit_set"])):
        part = rows[rows["unit_set"] == name]
        d, m = part["d_sae_over_h"].fillna(-1), part["train_rows"].fillna(-1)
        part = part[(d == d.max()) & (m == m[d == d.max()].max())].sort_values("l0_mean_mean")
        ax.errorbar(part["l0_mean_mean"], part[f"{PRIMARY_R2}_mean"],
                    yerr=_err(part, PRIMARY_R2), xerr=_err(part, "l0_mean"), fmt="o-",
                    capsize=3, color=_colour(name, i), label=name, ms=6)
    if target:
        ax.axvspan(target * 0.9, target * 1.1, color="#2ca02c", alpha=0.12,
                   label=f"target L0 {target:g} ± 10%")
    ax.set_xscale("log")
    ax.set_xlabel("mean L0 (held-out rows)")
    ax.set_ylabel("held-out R² (centred)")
    ax.set_title(title or "R²–L0: every unit set at its largest |D|", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def r2_against_ratio(agg: pd.DataFrame, unit_set: str, h: int, title: str = "") -> Figure:
    """Train (left) and held-out (right) R² of ``unit_set`` against |D|/|M|, one line per |M|;
    the exemplar controls at the same cells dashed. Curves that collapse on |D|/|M| in the train
    panel but not the held-out one are the signature of memorisation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    rows = agg[agg["unit_set"] == unit_set].dropna(subset=["train_rows", "d_sae_over_h"])
    exemplars = agg[agg["family"] == "exemplar"].dropna(subset=["train_rows"])
    cmap = plt.get_cmap("viridis")
    ms = sorted(rows["train_rows"].unique())
    for ax, metric, label in ((axes[0], TRAIN_R2, "train R²"), (axes[1], PRIMARY_R2,
                                                                   "held-out R²")):
        for j, m in enumerate(ms):
            colour = cmap(j / max(len(ms) - 1, 1))
            part = rows[rows["train_rows"] == m].sort_values("d_sae_over_h")
            if f"{metric}_mean" in part and part[f"{metric}_mean"].notna().any():
                ax.errorbar(part["d_sae_over_h"] * h / m, part[f"{metric}_mean"],
                            yerr=_err(part, metric), fmt="o-", capsize=3, color=colour,
                            label=f"|M| = {m:,.0f}")
            for name in exemplars["unit_set"].unique():
                ex = exemplars[(exemplars["unit_set"] == name) & (exemplars["train_rows"] == m)]
                if f"{metric}_mean" in ex and ex[f"{metric}_mean"].notna().any():
                    ex = ex.sort_values("d_sae_over_h")
                    ax.plot(ex["d_sae_over_h"] * h / m, ex[f"{metric}_mean"], ls="--", lw=1,
                            color=colour, alpha=0.7,
                            label=f"{name}, |M| = {m:,.0f}" if j == 0 else None)
        ax.axvline(1.0, color="#888", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("|D| / |M| (dictionary size over training rows)")
        ax.set_title(label, fontsize=10)
    axes[0].set_ylabel("R² (centred)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title or f"{unit_set}: R² against |D|/|M|", fontsize=10)
    fig.tight_layout()
    return fig


def r2_heatmap_pair(train: pd.DataFrame, held: pd.DataFrame, train_dstar=None,
                    held_dstar=None, title: str = "") -> Figure:
    """The |M| × |D|/H grids of train and of held-out R², side by side, each with its |D|*."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, grid, dstar, label in ((axes[0], train, train_dstar, "train R² (centred)"),
                                   (axes[1], held, held_dstar, "held-out R² (centred)")):
        if grid is None or grid.empty:
            ax.set_axis_off()
            ax.set_title(f"{label}: not measured", fontsize=10)
            continue
        r2_heatmap_on(fig, ax, grid, dstar, None, label, label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
