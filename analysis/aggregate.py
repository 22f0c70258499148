"""Results tables from many studies, aggregated over seeds, and the paper's headline table.

Intervals are 95% Student-t intervals over seeds: for the n values x₁…xₙ of one metric in one
group, mean ± t₀.₉₇₅,ₙ₋₁ · s/√n with s the sample standard deviation (ddof 1); NaN when n < 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from analysis.summary import best_per_cell
from atoms.core.errors import InputError

TABLE = "results.parquet"
ROWS = "rows"
REQUIRED = ("unit_set", "family", "status", "r2_euclid_centred")
GROUP = ["model", "site", "layer", "unit_set", "family", "d_sae_over_h", "train_rows", "k"]
R2 = ["r2_euclid_centred", "r2_euclid_uncentred", "r2_aip_centred", "r2_aip_uncentred"]
METRICS: list[str] = [*R2, *(f"train_{m}" for m in R2), "q_star_pairwise", "q_star_per_unit",
                      "q_star_per_activation", "uniqueness_pct", "l0_mean", "dead_fraction",
                      "mono_score", "stability_matched_fraction", "stability_pw_mcc",
                      "converged", "steps"]
"""Metric columns ``aggregate`` summarises (those present in the table)."""
STABILITY = ["stability_matched_fraction", "stability_pw_mcc"]
"""Cross-seed stability: one value per group with its own interval over seed pairs."""
PRIMARY_R2, PRIMARY_Q = "r2_euclid_centred", "q_star_pairwise"
LEVEL = 0.95


# ---------------------------------------------------------------------------- loading


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable Parquet file ({first})") from None


def _read_study(folder: Path) -> pd.DataFrame:
    """A study folder's table: results.parquet, else its rows/*.parquet concatenated."""
    if (folder / TABLE).is_file():
        return _read(folder / TABLE)
    frames = [f for f in (_read(p) for p in sorted((folder / ROWS).glob("*.parquet"))) if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _is_study(folder: Path) -> bool:
    return (folder / TABLE).is_file() or any((folder / ROWS).glob("*.parquet"))


def _studies(path: Path) -> list[tuple[Path, Path | None]]:
    """(study folder, file or None) pairs that ``path`` names."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        return [(path.parent, path)]
    if _is_study(path):
        return [(path, None)]
    found = {p.parent for p in path.rglob(TABLE)}
    found |= {p.parent for p in path.rglob(ROWS) if p.is_dir() and _is_study(p.parent)}
    if not found:
        raise InputError(f"{path}: no results found (no {TABLE} or {ROWS}/*.parquet below it)")
    return [(f, None) for f in sorted(found)]


def load_results(paths) -> pd.DataFrame:
    """Results rows of one or many studies, with a ``source`` column (the study folder).

    Each path is a results.parquet file, a study folder (its results.parquet, else its
    rows/*.parquet), or a folder searched recursively for study folders."""
    paths = [paths] if isinstance(paths, str | Path) or not isinstance(paths, Iterable) \
        else list(paths)
    if not paths:
        raise InputError("load_results: no paths given")
    frames = []
    for path in paths:
        for folder, file in _studies(Path(path)):
            where = file or folder
            table = _read(file) if file is not None else _read_study(folder)
            if not len(table):
                continue
            missing = [c for c in REQUIRED if c not in table]
            if missing:
                raise InputError(f"{where}: missing required column {missing[0]!r}")
            frames.append(table.assign(source=str(folder)))
    if not frames:
        raise InputError(f"{', '.join(str(p) for p in paths)}: no results found (all tables "
                         "are empty)")
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------- intervals


def interval_table(frame: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group of ``by``: ``n_seeds`` (rows) and, per metric, ``<m>_mean``, ``<m>_lo``,
    ``<m>_hi`` (95% Student-t interval over the group's non-NaN values; NaN when fewer than 2)."""
    data = frame[by].copy()
    for m in metrics:
        data[m] = pd.to_numeric(frame[m], errors="coerce")
    g = data.groupby(by, dropna=False, sort=True)
    out = g.size().rename("n_seeds").to_frame()
    if metrics:
        mean, sd, n = g[metrics].mean(), g[metrics].std(ddof=1), g[metrics].count()
        half = stats.t.ppf(0.5 + LEVEL / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
        half = half.where(n >= 2)
        for m in metrics:
            out[f"{m}_mean"] = mean[m].to_numpy()
            out[f"{m}_lo"] = (mean[m] - half[m]).to_numpy()
            out[f"{m}_hi"] = (mean[m] + half[m]).to_numpy()
    return out.reset_index()


def _with_columns(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    missing = [c for c in columns if c not in table]
    return table.assign(**dict.fromkeys(missing, np.nan)) if missing else table


def best(table: pd.DataFrame) -> pd.DataFrame:
    """``best_per_cell`` after checking the columns it needs."""
    for c in ("cell", "unit_set", "status"):
        if c not in table:
            raise InputError(f"results table: missing required column {c!r}")
    return _with_columns(best_per_cell(table), GROUP)


def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """Best λ per cell, then per (model, site, layer, unit_set, family, |D|/H, |M|): each metric's
    mean and 95% interval over seeds, and ``n_seeds``."""
    b = best(table)
    out = interval_table(b, GROUP, [m for m in METRICS if m in b])
    for m in STABILITY:  # a property of the group: its interval is over seed pairs, not seeds
        if f"{m}_lo" in b and f"{m}_mean" in out:
            own = b.groupby(GROUP, dropna=False, sort=True)[[f"{m}_lo", f"{m}_hi"]].first()
            out[f"{m}_lo"] = own[f"{m}_lo"].to_numpy()
            out[f"{m}_hi"] = own[f"{m}_hi"].to_numpy()
    return out


# ---------------------------------------------------------------------------- headline

HEADLINE = {f"{PRIMARY_R2}_mean": "r2_mean", f"{PRIMARY_R2}_lo": "r2_lo",
            f"{PRIMARY_R2}_hi": "r2_hi", "r2_aip_centred_mean": "r2_aip",
            "r2_aip_centred_lo": "r2_aip_lo", "r2_aip_centred_hi": "r2_aip_hi",
            f"train_{PRIMARY_R2}_mean": "train_r2", f"train_{PRIMARY_R2}_lo": "train_r2_lo",
            f"train_{PRIMARY_R2}_hi": "train_r2_hi",
            f"{PRIMARY_Q}_mean": "q_star_mean",
            f"{PRIMARY_Q}_lo": "q_star_lo", f"{PRIMARY_Q}_hi": "q_star_hi",
            "uniqueness_pct_mean": "uniqueness_pct", "l0_mean_mean": "l0",
            "dead_fraction_mean": "dead_fraction", "mono_score_mean": "mono_score",
            "stability_matched_fraction_mean": "stability_matched",
            "stability_pw_mcc_mean": "stability_pw_mcc"}
ORDER = {"neurons": 0, "relu": 1, "topk": 2, "batchtopk": 3, "tsae_aip_centred": 4, "tsae": 5,
         "tsae_aip": 6, "exemplar": 7, "random": 8, "pretrained": 9}


def at_largest(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows at the largest |D|/H, then the largest |M| there (NaN counts as smallest)."""
    if rows.empty:
        return rows
    d, m = rows["d_sae_over_h"].fillna(-np.inf), rows["train_rows"].fillna(-np.inf)
    at_d = d == d.max()
    return rows[at_d & (m == m[at_d].max())]


def _at(rows: pd.DataFrame, d: float | None, m: float | None) -> pd.DataFrame:
    if d is None:
        return at_largest(rows)
    at = rows[rows["d_sae_over_h"] == d]
    if m is not None and "train_rows" in at and at["train_rows"].notna().any():
        at = at[at["train_rows"] == m]
    return at if len(at) else pd.DataFrame(columns=rows.columns)


def _nearest_d(rows: pd.DataFrame, d: float | None) -> pd.DataFrame:
    """Rows at the |D|/H nearest ``d`` in log scale (the largest one when ``d`` is None)."""
    if rows.empty or d is None or rows["d_sae_over_h"].isna().all():
        return at_largest(rows)
    ds = rows["d_sae_over_h"].dropna().unique()
    near = ds[np.argmin(np.abs(np.log(ds) - np.log(d)))]
    return at_largest(rows[rows["d_sae_over_h"] == near])


def _pick(group: pd.DataFrame) -> list[pd.DataFrame]:
    atoms, feats = group[group["family"] == "tsae"], group[group["family"] == "relu"]
    common = atoms.merge(feats, on=["d_sae_over_h", "train_rows"])[["d_sae_over_h", "train_rows"]]
    if len(common):
        d, m = common.sort_values(["d_sae_over_h", "train_rows"]).iloc[-1]
        parts = [_at(feats, d, m), _at(atoms, d, m)]
    else:
        parts = [at_largest(feats), at_largest(atoms)]
        d = next((p["d_sae_over_h"].iloc[0] for p in parts if len(p)), None)
    parts.insert(0, group[group["family"] == "neurons"])
    parts.append(_nearest_d(group[group["family"] == "random"], d))
    for fam in [f for f in group["family"].unique() if f not in ("neurons", "relu", "tsae",
                                                                 "random")]:
        fam_rows = group[group["family"] == fam]
        parts += [at_largest(fam_rows[fam_rows["unit_set"] == u]) for u in fam_rows["unit_set"]
                  .unique()]
    return parts


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, site, layer, unit set): neurons, features (relu_features), atoms,
    random and pretrained SAEs. Atoms and features are taken at the largest |D| (then largest
    |M|) where both exist, else each at its own largest; random at the |D| nearest that one.
    Columns: model, site, layer, unit_set, family, d_sae_over_h, train_rows, r2_mean/lo/hi
    (held-out R², euclid centred), train_r2/_lo/_hi, r2_aip/_lo/_hi, q_star_mean/lo/hi
    (pairwise), uniqueness_pct, l0, dead_fraction, [mono_score], n_seeds."""
    agg = aggregate(table)
    keys = ["model", "site", "layer"]
    parts = [p for _, g in agg.groupby(keys, dropna=False, sort=True) for p in _pick(g)]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=[*GROUP, *HEADLINE.values(), "n_seeds"])
    out = pd.concat(parts, ignore_index=True).rename(columns=HEADLINE)
    out["_order"] = out["family"].map(ORDER).fillna(len(ORDER))
    out = out.sort_values([*keys, "_order", "unit_set"], kind="stable")
    cols = [*GROUP, *[c for c in HEADLINE.values() if c in out], "n_seeds"]
    return out[cols].reset_index(drop=True)
