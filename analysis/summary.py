"""A study's results table in a few tables: the unit-set comparison, the |M| × |D| R² grid, and
the evidence on the paper's two claims (higher q* for atoms at comparable R²; an R² jump once |D|
passes a point that moves with |M|). Written to <out>/summary.md."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from atoms.core.io import atomic_path

JUMP = 0.1
"""An R² rise between neighbouring |D| at least this large counts as a jump."""


def best_per_cell(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (study, cell, unit set): the finished sample with the lowest objective (the λ the
    study picked on validation rows); untrained unit sets pass through."""
    ok = table[table["status"] == "finished"].copy()
    if "objective" not in ok:
        ok["objective"] = float("nan")
    ok["_rank"] = ok["objective"].fillna(0.0)
    keys = [c for c in ("source", "study", "model", "site", "layer") if c in ok] + ["cell",
                                                                                  "unit_set"]
    ok = ok.sort_values([*keys, "_rank"], kind="stable")
    return ok.groupby(keys, sort=False, dropna=False).head(1).drop(columns="_rank")


def r2_grid(best: pd.DataFrame, value: str = "r2_euclid_centred") -> pd.DataFrame:
    """|M| (rows) × |D|/H (columns) of the atoms' ``value``, mean over seeds."""
    atoms = best[best["family"] == "tsae"]
    if atoms.empty:
        return pd.DataFrame()
    return atoms.pivot_table(index="train_rows", columns="d_sae_over_h", values=value,
                             aggfunc="mean").sort_index().sort_index(axis=1)


def transitions(grid: pd.DataFrame) -> pd.DataFrame:
    """Per |M|: the largest R² rise between neighbouring |D| and the |D|/H it reaches."""
    rows = []
    for m, r2 in grid.iterrows():
        r2 = r2.dropna()
        steps = r2.diff().iloc[1:]
        if steps.empty:
            rows.append({"train_rows": m, "largest_rise": float("nan"), "at_d_over_h": None,
                         "r2_min": r2.min(), "r2_max": r2.max(), "jump": False})
            continue
        at = steps.idxmax()
        rows.append({"train_rows": m, "largest_rise": steps.max(), "at_d_over_h": at,
                     "r2_min": r2.min(), "r2_max": r2.max(), "jump": steps.max() >= JUMP})
    return pd.DataFrame(rows)


def comparison(best: pd.DataFrame) -> pd.DataFrame:
    """Unit sets side by side at each |D|: atoms (at the ReLU features' |M|), features,
    random, plus neurons and imported SAEs."""
    cols = ["unit_set", "d_sae_over_h", "train_rows", "r2_euclid_centred",
            "train_r2_euclid_centred", "l0_mean", "q_star_pairwise", "q_star_per_unit",
            "q_star_per_activation", "uniqueness_pct", "dead_fraction"]
    relu_m = set(best.loc[best["family"] == "relu", "train_rows"].dropna())
    keep = (best["family"] != "tsae") | best["train_rows"].isin(relu_m or
                                                                {best["train_rows"].max()})
    part = best[keep]
    part = part[[c for c in cols if c in part]]
    return (part.groupby(["unit_set", "d_sae_over_h", "train_rows"], dropna=False)
            .mean(numeric_only=True).reset_index().sort_values(["d_sae_over_h", "unit_set"]))


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown(df: pd.DataFrame, index: bool = False) -> str:
    if index:
        df = df.reset_index()
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def claims(best: pd.DataFrame, steps: pd.DataFrame) -> list[str]:
    lines = []
    cmp = comparison(best)
    atoms = cmp[cmp["unit_set"] == "atoms"]
    for _, a in atoms.iterrows():
        others = cmp[(cmp["d_sae_over_h"] == a["d_sae_over_h"]) & (cmp["unit_set"] != "atoms")
                     | cmp["unit_set"].isin(["neurons"])]
        for _, o in others.iterrows():
            lines.append(f"- |D| = {a['d_sae_over_h']:g}H: atoms q* {a['q_star_pairwise']:.3f} "
                         f"(R² {a['r2_euclid_centred']:.3f}, L0 {a['l0_mean']:.0f}) vs "
                         f"{o['unit_set']} q* {o['q_star_pairwise']:.3f} (R² "
                         f"{o['r2_euclid_centred']:.3f}, L0 {o['l0_mean']:.0f})")
    for _, s in steps.iterrows():
        verdict = "a jump" if s["jump"] else "no jump"
        if s["at_d_over_h"] is None:  # a single |D|: no neighbours to compare
            lines.append(f"- |M| = {int(s['train_rows'])}: one |D| only, R² "
                         f"{_fmt(s['r2_max'])}")
            continue
        lines.append(f"- |M| = {int(s['train_rows'])}: {verdict} (largest rise "
                     f"{_fmt(s['largest_rise'])} reaching |D| = {_fmt(s['at_d_over_h'])}H; R² "
                     f"{_fmt(s['r2_min'])}–{_fmt(s['r2_max'])})")
    return lines


def summarise(table: pd.DataFrame, out: Path) -> Path:
    """Write ``out/summary.md`` from a results table; returns its path."""
    from analysis.verdicts import design_checks, verdicts

    parts = [f"# Study summary ({len(table)} rows)"]
    if len(table):
        found = verdicts(table)
        parts += ["## The paper's two claims",
                  "\n".join(f"- {v.sentence}" for v in found) or "No atoms: no verdict.",
                  "\n".join(f"- {line}" for line in design_checks(table))]
        best = best_per_cell(table)
        grid, train_grid = r2_grid(best), r2_grid(best, "train_r2_euclid_centred")
        steps = transitions(grid) if len(grid) else pd.DataFrame()
        parts += ["## Unit sets (held-out test rows; best λ per cell)",
                  markdown(comparison(best)),
                  "## Atoms: held-out R² (centred), |M| rows × |D|/H columns",
                  markdown(grid, index=True) if len(grid) else "(no atoms trials)",
                  "## Atoms: train R² (centred)",
                  markdown(train_grid, index=True) if len(train_grid) else "(none)",
                  "## Evidence on the paper's claims", *claims(best, steps)]
        diverged = int((table["status"] != "finished").sum())
        if diverged:
            parts.append(f"\n{diverged} trials diverged (rows with status 'diverged').")
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n\n".join(parts) + "\n")
    return out / "summary.md"
