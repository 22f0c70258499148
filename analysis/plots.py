"""The report's figures (matplotlib, Agg). Each function returns a Figure; ``png`` renders one.

Inputs are plain tables and arrays: the report gathers them (``analysis/report.py``).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from atoms.aip.metric import AIP, load_aip  # noqa: E402
from atoms.core.errors import AtomsError  # noqa: E402
from atoms.evaluate.metrics import l0_per_row, threshold_interval_check  # noqa: E402
from atoms.extract.shards import is_shard_set  # noqa: E402
from atoms.sae.formats import load_any_sae  # noqa: E402
from atoms.sae.model import SparseAutoencoder  # noqa: E402
from atoms.store.storage import locate  # noqa: E402
from atoms.train.batches import DataSplit, held_out_rows  # noqa: E402

COLOURS = {"atoms": "#1b6ca8", "relu_features": "#e07b39", "neurons": "#444444",
           "random": "#9a9a9a"}
ORDER = ["neurons", "relu_features", "atoms", "random"]


def png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _colour(name: str, i: int) -> str:
    return COLOURS.get(name, plt.get_cmap("tab10")(i % 10))


def _order(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in ORDER if n in names] + sorted(n for n in names if n not in ORDER)


def _log_edges(values: np.ndarray) -> np.ndarray:
    """Cell edges around sorted positive ``values`` on a log axis (geometric midpoints)."""
    logs = np.log(values)
    if len(logs) == 1:
        return np.exp([logs[0] - math.log(2), logs[0] + math.log(2)])
    mids = (logs[1:] + logs[:-1]) / 2
    return np.exp(np.concatenate([[2 * logs[0] - mids[0]], mids, [2 * logs[-1] - mids[-1]]]))


def r2_heatmap(grid: pd.DataFrame, dstar: pd.DataFrame | None = None, law: dict | None = None,
               title: str = "") -> Figure:
    """Held-out R² over |M| (rows of ``grid``) × |D|/H (columns), annotated, with the boundary
    |D|*(|M|) of ``critical_capacity`` (points with interval bars) and, when ``law`` (from
    ``fit_power_law``) is supported, the line |D|* = e^a·|M|^α drawn in units of H."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    r2_heatmap_on(fig, ax, grid, dstar, law, title)
    fig.tight_layout()
    return fig


def r2_heatmap_on(fig: Figure, ax, grid: pd.DataFrame, dstar: pd.DataFrame | None,
                  law: dict | None, title: str, label: str = "held-out R² (centred)") -> None:
    """``r2_heatmap`` drawn on ``ax`` of ``fig``, its colour bar labelled ``label``."""
    cols = np.asarray(grid.columns, dtype=float)
    rows = np.asarray(grid.index, dtype=float)
    values = grid.to_numpy(dtype=float)
    row_edges = _log_edges(rows)
    mesh = ax.pcolormesh(_log_edges(cols), row_edges, np.ma.masked_invalid(values),
                         cmap="viridis", shading="flat")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = np.nanmin(values), np.nanmax(values)
    for i, m in enumerate(rows):
        for j, d in enumerate(cols):
            v = values[i, j]
            if np.isfinite(v):
                dark = (v - lo) / (hi - lo + 1e-12) < 0.6
                ax.text(d, math.sqrt(m * row_edges[i + 1]), f"{v:.3f}", ha="center",
                        va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(cols, [f"{c:g}" for c in cols])
    ax.set_yticks(rows, [f"{int(r):,}" for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("|D| / H (dictionary size)")
    ax.set_ylabel("|M| (training rows)")
    fig.colorbar(mesh, ax=ax, label=label)
    status = _boundary(ax, dstar, law, rows)
    ax.set_title(f"{title}\n{status}" if title else status, fontsize=10)


def _boundary(ax, dstar, law, rows) -> str:
    """Draw |D|*(|M|) on the heat map; return a one-line status for the title."""
    if dstar is None or dstar.empty:
        return "|D|*: not estimated"
    found = dstar[dstar["status"] == "transition"].dropna(subset=["d_star_over_h"])
    if found.empty:
        states = set(dstar["status"])
        if states == {"no transition"}:
            return "no transition at any |M|: no boundary |D|*"
        return f"no transition: |D|* not located at any |M| ({' / '.join(sorted(states))})"
    x = found["d_star_over_h"].to_numpy(float)
    err = np.vstack([x - found["d_star_lo_over_h"].to_numpy(float),
                     found["d_star_hi_over_h"].to_numpy(float) - x])
    ax.errorbar(x, found["train_rows"].to_numpy(float), xerr=np.nan_to_num(err.clip(0)), fmt="o",
                color="#d62728", capsize=4, ms=7, mec="white", label="|D|* (95% interval)")
    line = f"boundary |D|*(|M|) at {len(found)} of {len(dstar)} |M|"
    if law and law.get("supported"):
        m = np.geomspace(rows.min(), rows.max(), 50)
        h = float(found["h"].iloc[0])
        ax.plot(math.exp(law["a"]) * m ** law["alpha"] / h, m, color="#d62728", ls="--",
                label=f"|D|* ∝ |M|^{law['alpha']:.2f}")
        line += f"; |D|* ∝ |M|^{law['alpha']:.2f}"
    else:
        line += "; no power-law fit"
    ax.legend(fontsize=8, loc="lower right")
    return line


def q_star_bars(agg: pd.DataFrame, metric: str = "q_star_pairwise", title: str = "") -> Figure:
    """Grouped bars of ``<metric>_mean`` by |D|/H, one bar per unit set, with ``_lo``/``_hi``
    intervals; neurons (one |D|) drawn as a reference line with its interval shaded."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    mean, lo, hi = f"{metric}_mean", f"{metric}_lo", f"{metric}_hi"
    neurons = agg[agg["unit_set"] == "neurons"]
    bars = agg[agg["unit_set"] != "neurons"].dropna(subset=["d_sae_over_h", mean])
    sets = _order(bars["unit_set"])
    ds = sorted(bars["d_sae_over_h"].unique())
    width = 0.8 / max(len(sets), 1)
    for k, name in enumerate(sets):
        part = bars[bars["unit_set"] == name].set_index("d_sae_over_h")
        pos = [i + (k - (len(sets) - 1) / 2) * width for i, d in enumerate(ds) if d in part.index]
        sel = part.loc[[d for d in ds if d in part.index]]
        y = sel[mean].to_numpy(float)
        err = None
        if lo in sel and hi in sel and sel[lo].notna().any():
            err = np.nan_to_num(np.vstack([y - sel[lo].to_numpy(float),
                                           sel[hi].to_numpy(float) - y]))
        ax.bar(pos, y, width, yerr=err, capsize=3, color=_colour(name, k), label=name,
               hatch="//" if name == "random" else None, edgecolor="white")
    for _, n in neurons.iterrows():
        ax.axhline(n[mean], color=COLOURS["neurons"], ls="--", lw=1.2, label="neurons")
        if lo in n and np.isfinite(n[lo]) and np.isfinite(n[hi]):
            ax.axhspan(n[lo], n[hi], color=COLOURS["neurons"], alpha=0.12)
        break
    ax.set_xticks(range(len(ds)), [f"{d:g}H" for d in ds])
    ax.set_xlabel("|D| (dictionary size)")
    ax.set_ylabel(f"q* ({metric.removeprefix('q_star_').replace('_', ' ')})")
    ax.set_title(title or "Stability q* by unit set (higher is more stable)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def angle_histograms(angles: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """Per layer: histograms of Euclidean and AIP pairwise angles (degrees), 90° marked."""
    n = len(angles)
    cols = min(3, n)
    nrows = -(-n // cols)
    width = 6.4 if n == 1 else 4.2 * cols
    fig, axes = plt.subplots(nrows, cols, figsize=(width, 3.4 * nrows), squeeze=False)
    bins = np.arange(0, 181, 2)
    for ax, (name, (euclid, metric)) in zip(axes.flat, angles.items(), strict=False):
        ax.hist(euclid, bins=bins, alpha=0.6, density=True, label=f"Euclidean (mean "
                f"{np.mean(euclid):.1f}°)")
        ax.hist(metric, bins=bins, alpha=0.6, density=True, label=f"AIP (mean "
                f"{np.mean(metric):.1f}°)")
        ax.axvline(90, color="k", lw=0.8, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("pairwise angle (°)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    if n > 1:
        fig.suptitle("Pairwise angles between held-out activations", fontsize=10)
    fig.tight_layout()
    return fig


def l0_histograms(l0: dict[str, np.ndarray]) -> Figure:
    """One panel per unit set: the per-row L0 (active units per activation), mean marked."""
    n = len(l0)
    fig, axes = plt.subplots(1, n, figsize=(max(3.3 * n, 6.4), 2.9), squeeze=False)
    for i, (ax, (name, k)) in enumerate(zip(axes.flat, l0.items(), strict=True)):
        k = np.asarray(k, dtype=float)
        top = max(k.max(), 1.0)
        width = max(1.0, math.ceil(top / 40))
        ax.hist(k, bins=np.arange(0, top + 2 * width, width), color=_colour(name.split(" ")[0], i))
        ax.set_xlim(0, top * 1.05 + width)
        ax.axvline(k.mean(), color="k", lw=1, ls="--")
        ax.set_title(f"{name}\nmean L0 {k.mean():.1f}", fontsize=9)
        ax.set_xlabel("L0 (active units per row)", fontsize=8)
    axes.flat[0].set_ylabel("rows")
    fig.tight_layout()
    return fig


def threshold_histograms(items: list[dict]) -> Figure:
    """One panel per SAE: θ (AIP-unit-atom units, θⱼ‖dⱼ‖_S̃) with the theorem interval
    (εKδ_max, δ_min − ε(K−1)δ_max) shaded when non-empty, else its two ends marked.
    Each item: name, theta (array), delta_min, delta_max (rescaled non-zero codes, shown as a
    grey band) and the keys of ``threshold_interval_check``."""
    n = len(items)
    cols = min(2, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, it in zip(axes.flat, items, strict=False):
        theta = np.asarray(it["theta"], dtype=float)
        pos = theta[theta > 0]
        lo_i, hi_i = it["interval_low"], it["interval_high"]
        ends = [v for v in (lo_i, hi_i, it["delta_min"], it["delta_max"]) if v > 0]
        lo_x = min([*pos, *ends]) if len(pos) or ends else 1e-6
        hi_x = max([*pos, *ends]) if len(pos) or ends else 1.0
        bins = np.geomspace(lo_x / 1.5, hi_x * 1.5, 40)
        ax.axvspan(it["delta_min"], it["delta_max"], color="#bbbbbb", alpha=0.35,
                   label="codes δ (min–max)")
        ax.hist(pos, bins=bins, color=COLOURS["atoms"], label="θ")
        ax.set_xscale("log")
        if it["interval_feasible"]:
            ax.axvspan(max(lo_i, bins[0]), hi_i, color="#2ca02c", alpha=0.25,
                       label="theorem interval")
        else:
            ax.axvline(lo_i, color="#d62728", ls="--", lw=1, label=f"εKδ_max = {lo_i:.3g}")
            if hi_i > 0:
                ax.axvline(hi_i, color="#2ca02c", ls=":", lw=1,
                           label=f"δ_min − ε(K−1)δ_max = {hi_i:.3g}")
            else:
                ax.plot([], [], " ", label=f"δ_min − ε(K−1)δ_max = {hi_i:.3g}")
        state = "interval" if it["interval_feasible"] else "interval empty"
        zero = int((theta <= 0).sum())
        ax.set_title(f"{it['name']}\n{state}; ε={it['eps']:.2f}, K={it['k']:.0f}; "
                     f"θ inside {100 * it['thresholds_inside']:.0f}%"
                     + (f"; θ=0: {zero}" if zero else ""), fontsize=9)
        ax.set_xlabel("θ·‖d‖_S̃ (AIP-unit-atom units)", fontsize=8)
        ax.set_ylabel("latents", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


# -- figure data from a study's artefacts (shards, S̃, saved SAEs) ------------------------------
SAMPLE_ROWS = 512
"""Held-out rows sampled for the angle, L0 and threshold figures."""


class Skipped(Exception):
    """An artefact a figure needs is not readable here (e.g. a results folder copied from a
    cluster without its shards); the message says which, in one line."""


def study_config(row: pd.Series) -> dict:
    raw = row.get("study_config")
    try:
        return json.loads(raw) if isinstance(raw, str) else {}
    except json.JSONDecodeError:
        return {}


def held_out_sample(row: pd.Series, n: int = SAMPLE_ROWS, seed: int = 0) -> torch.Tensor:
    """``n`` of the study's test rows (the held-out rows after its validation rows), drawn
    without replacement with a seeded generator, from the shards at ``row.data_folder``."""
    raw = row.get("data_folder")
    if not isinstance(raw, str) or not raw:
        raise Skipped("the results record no data_folder")
    folder, data = locate(raw), study_config(row).get("data", {})
    if not is_shard_set(folder):
        raise Skipped(f"activation shards not found at {folder}")
    val, test = int(data.get("validation_rows", 0)), int(data.get("test_rows", n))
    try:
        split = DataSplit.of(folder, int(data.get("holdout_shards", 1)), verify=False)
        held = held_out_rows(split, val + test, val + test)[val:]
    except (AtomsError, OSError) as e:
        raise Skipped(f"activation shards at {folder} not readable: {e}") from None
    if not len(held):
        raise Skipped(f"{folder}: no held-out test rows after {val} validation rows")
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))[:n]
    return held[pick]


def study_aip(row: pd.Series) -> AIP:
    """The study's S̃ (``row.aip_path``)."""
    path = row.get("aip_path")
    if not isinstance(path, str) or not path:
        raise Skipped("the results record no aip_path")
    try:
        return load_aip(locate(path))[0]
    except (AtomsError, OSError) as e:
        raise Skipped(f"S̃ not readable: {e}") from None


def sae_folder(row: pd.Series) -> Path:
    """The trial's saved SAE: ``checkpoint_path``, else ``<source>/trials/<trial_key>/sae``
    (a results folder moved from where it was written)."""
    for p in (row.get("checkpoint_path"), f"{row.get('source')}/trials/{row.get('trial_key')}/sae"):
        if isinstance(p, str) and p and locate(p).exists():
            return locate(p)
    raise Skipped(f"{row.get('trial_key')}: saved SAE not found at {row.get('checkpoint_path')}")


def load_trial_sae(row: pd.Series) -> SparseAutoencoder:
    try:
        return load_any_sae(sae_folder(row))[0].eval()
    except AtomsError as e:
        raise Skipped(str(e)) from None


def codes_of(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(x)[0]


def l0_samples(rows: pd.DataFrame, x: torch.Tensor, neuron_tol: float = 1e-6
               ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per unit set in ``rows`` (one row each): Kᵢ on the sample ``x``; neurons count
    |xᵢⱼ| > ``neuron_tol``. Returns (samples, one-line notes on the sets left out)."""
    out, notes = {}, []
    for _, r in rows.iterrows():
        d = r.get("d_sae_over_h")
        label = r["unit_set"] + ("" if r["unit_set"] == "neurons" or pd.isna(d) else f" {d:g}H")
        if r["unit_set"] == "neurons":
            out[label] = l0_per_row(x, neuron_tol).numpy()
        elif r["family"] in ("random", "exemplar"):
            notes.append(f"{label}: OMP codes with a fixed K (L0 {r.get('l0_mean', 0):.0f} by "
                         "construction)")
        else:
            try:
                out[label] = l0_per_row(codes_of(load_trial_sae(r), x)).numpy()
            except Skipped as e:
                notes.append(f"{label}: {e}")
    return out, notes


def threshold_items(rows: pd.DataFrame, x: torch.Tensor, aip: AIP) -> tuple[list[dict], list[str]]:
    """Per threshold SAE in ``rows``: θⱼ‖dⱼ‖_S̃ and ``threshold_interval_check`` on ``x``, with
    dⱼ the decoder rows in input units (W_dec / s)."""
    items, notes = [], []
    for _, r in rows.iterrows():
        name = f"|D| = {r['d_sae_over_h']:g}H, |M| = {r['train_rows']:.0f}"
        try:
            sae = load_trial_sae(r)
            if not hasattr(sae, "threshold"):
                raise Skipped(f"{r['trial_key']}: not a threshold SAE")
            theta = sae.threshold.detach().double()
            dirs = sae.W_dec.detach().double() / float(sae.input_scale)
            codes = codes_of(sae, x)
            check = threshold_interval_check(theta, codes, dirs, aip)
        except (Skipped, AtomsError) as e:
            notes.append(f"{name}: {e}")
            continue
        scale = aip.norm(dirs)
        delta = (codes.double().abs() * scale)
        delta = delta[delta > 0]
        items.append({"name": name, "theta": (theta * scale).numpy(),
                      "delta_min": float(delta.min()), "delta_max": float(delta.max()), **check})
    return items, notes
