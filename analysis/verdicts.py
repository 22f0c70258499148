"""The paper's two claims, each answered in one sentence with its numbers and 95% intervals.

**Claim 1** — atoms have higher stability q* than features and neurons at comparable R².
Judged at one cell per atoms family: the largest |D| (then |M|) where the atoms and the ReLU
features both exist, else the atoms' largest. Every other unit set there is a comparator:
features (ReLU, TopK, BatchTopK, centred-whitening JumpReLU, imported SAEs) and neurons decide
the claim; random directions and the exemplar control are its controls. Only sets whose mean
L0 is within ±10% of the study's target L0 decide (neurons, dense, always do, marked). A is
*above* B when A's seed interval lies wholly above B's (neurons and imported SAEs are the same
for every seed: their value is a point); with one seed nothing is decisive.

- *supported*: atoms above every deciding set and every control, at R² no more than
  ``R2_COMPARABLE`` below any of them;
- *contradicted*: a deciding set above the atoms;
- *uninformative*: atoms above the deciding sets, but a control not below them (q* then says
  nothing about understanding);
- *inconclusive*: intervals overlap, R² not comparable, or one seed.

**Claim 2** — R² jumps to ≈ 1 once |D| matches |M|. Per |M|, ``critical_capacity`` locates a
transition (a rise ≥ ``JUMP`` beyond seed noise) separately on train R² and on held-out R²; it is
a *jump* when the curve also reaches ``NEAR_ONE``. |D|*/|M| is reported with its interval.

- *identification*: held-out R² jumps at some |M| and the exemplar control stays below it;
- *memorisation*: train R² jumps where held-out does not, or the exemplar control reaches the
  atoms' jumped scores;
- *no jump*: neither jumps;
- *too few points*: no |M| with at least ``MIN_POINTS`` dictionary sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.aggregate import PRIMARY_Q, PRIMARY_R2, aggregate
from analysis.scaling_law import KEYS, critical_capacity
from analysis.summary import best_per_cell
from atoms.train.loop import L0_TOLERANCE

ATOMS = ("tsae", "tsae_aip")
"""Atoms families judged, each on its own: Euclidean-loss atoms and AIP-geometry atoms."""
FEATURES = ("relu", "topk", "batchtopk", "tsae_aip_centred", "pretrained")
CONTROLS = ("random", "exemplar")
L0_MATCH = L0_TOLERANCE
"""Matched sparsity: mean L0 within this fraction of the target (what a steered run aims at)."""
R2_COMPARABLE = 0.05
NEAR_ONE = 0.95
MIN_POINTS = 3
TRAIN_R2 = f"train_{PRIMARY_R2}"


@dataclass
class Verdict:
    claim: int
    family: str
    unit_set: str
    where: str
    verdict: str
    sentence: str


def where(key) -> str:
    """A (model, site, layer) key as text."""
    return f"{key[0]} {key[1]} layer {key[2]}"


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _iv(row: pd.Series, metric: str) -> str:
    m, lo, hi = (_num(row.get(f"{metric}_{s}")) for s in ("mean", "lo", "hi"))
    if not np.isfinite(m):
        return "–"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else f"{m:.3f}"


def target_l0(table: pd.DataFrame) -> float:
    """The study's target L0: the steered rows' ``target_l0`` (NaN when none was steered)."""
    if "target_l0" not in table:
        return math.nan
    values = pd.to_numeric(table["target_l0"], errors="coerce").dropna()
    return float(values.median()) if len(values) else math.nan


def matched(l0: float, target: float) -> bool:
    """Mean L0 within ±``L0_MATCH`` of the target."""
    return bool(np.isfinite(l0) and np.isfinite(target) and abs(l0 / target - 1) <= L0_MATCH)


FIXED = ("neurons", "pretrained")
"""Sets that are the same for every seed: their value is exact, their interval a point."""


def _bound(row: pd.Series, metric: str, side: str) -> float:
    if row.get("family") in FIXED:
        return _num(row.get(f"{metric}_mean"))
    return _num(row.get(f"{metric}_{side}"))


def _above(a: pd.Series, b: pd.Series, metric: str = PRIMARY_Q) -> bool | None:
    """A's interval wholly above B's (None: either has no interval)."""
    a_lo, b_hi = _bound(a, metric, "lo"), _bound(b, metric, "hi")
    if not (np.isfinite(a_lo) and np.isfinite(b_hi)):
        return None
    return a_lo > b_hi


# ---------------------------------------------------------------------------------- claim 1


def _cell(g: pd.DataFrame, family: str) -> tuple[float, float] | None:
    atoms = g[g["family"] == family].dropna(subset=[f"{PRIMARY_Q}_mean"])
    if atoms.empty:
        return None
    relu = g[g["family"] == "relu"]
    both = atoms.merge(relu, on=["d_sae_over_h", "train_rows"])
    pick = both if len(both) else atoms
    d, m = pick.sort_values(["d_sae_over_h", "train_rows"]).iloc[-1][["d_sae_over_h",
                                                                       "train_rows"]]
    return float(d), float(m)


def comparators(g: pd.DataFrame, family: str, d: float, m: float) -> pd.DataFrame:
    """One row per other unit set at the atoms' cell: same |D|/H (random: nearest in log
    scale), the atoms' |M| where the set has it (else its largest there); neurons as they are."""
    out = []
    others = g[(g["family"] != family) & ~g["family"].isin([f for f in ATOMS if f != family])
               & g[f"{PRIMARY_Q}_mean"].notna()]
    for _, rows in others.groupby("unit_set", sort=False):
        fam = rows["family"].iloc[0]
        if fam not in ("neurons", "pretrained"):
            ds = rows["d_sae_over_h"].dropna().unique()
            if not len(ds):
                continue
            near = ds[np.argmin(np.abs(np.log(ds) - math.log(d)))]
            if fam != "random" and near != d:
                continue
            rows = rows[rows["d_sae_over_h"] == near]
            if rows["train_rows"].notna().any():
                at_m = rows[rows["train_rows"] == m]
                rows = at_m if len(at_m) else rows[rows["train_rows"] == rows["train_rows"].max()]
        out.append(rows.iloc[0])
    return pd.DataFrame(out)


def _describe(row: pd.Series, target: float) -> str:
    l0 = _num(row.get("l0_mean_mean"))
    if row["family"] == "neurons":
        tag = "dense"
    else:
        tag = "matched" if matched(l0, target) else "**not matched**"
    r2 = _num(row.get(f"{PRIMARY_R2}_mean"))
    return f"{row['unit_set']} {_iv(row, PRIMARY_Q)} (R² {r2:.3f}, L0 {l0:.1f}, {tag})"


def claim_q_star(table: pd.DataFrame) -> list[Verdict]:
    """Claim 1 for every atoms family of every (model, site, layer) (see the module text)."""
    agg, target, out = aggregate(table), target_l0(table), []
    for key, g in agg.groupby(KEYS, dropna=False, sort=True):
        for family in ATOMS:
            cell = _cell(g, family)
            if cell is None:
                continue
            d, m = cell
            a = g[(g["family"] == family) & (g["d_sae_over_h"] == d)
                  & (g["train_rows"] == m)].iloc[0]
            comp = comparators(g, family, d, m)
            verdict, reason = _q_verdict(a, comp, target)
            place = f"{where(key)}, |D| = {d:g}H, |M| = {m:,.0f}"
            listed = "; ".join(_describe(r, target) for _, r in comp.iterrows()) or "none"
            sentence = (f"**Claim 1, {a['unit_set']}: {verdict}** ({reason}). {place}, target L0 "
                        f"{target:g}: atoms q* {_iv(a, PRIMARY_Q)} (R² "
                        f"{_num(a.get(f'{PRIMARY_R2}_mean')):.3f}, L0 "
                        f"{_num(a.get('l0_mean_mean')):.1f}) against {listed}.")
            out.append(Verdict(1, family, a["unit_set"], place, verdict, sentence))
    return out


def _q_verdict(a: pd.Series, comp: pd.DataFrame, target: float) -> tuple[str, str]:
    if comp.empty:
        return "inconclusive", "no comparator at this cell"
    if np.isfinite(target) and not matched(_num(a.get("l0_mean_mean")), target):
        return "inconclusive", "the atoms are not within ±10% of the target L0"
    decide = comp[comp["family"].isin([*FEATURES, "neurons"]) & comp.apply(
        lambda r: r["family"] == "neurons" or not np.isfinite(target)
        or matched(_num(r.get("l0_mean_mean")), target), axis=1)]
    controls = comp[comp["family"].isin(CONTROLS)]
    if decide.empty:
        return "inconclusive", "no feature set or neurons at matched sparsity"
    over = [_above(r, a) for _, r in decide.iterrows()]
    if any(v is True for v in over):
        names = [r["unit_set"] for (_, r), v in zip(decide.iterrows(), over, strict=True) if v]
        return "contradicted", f"{', '.join(names)} above the atoms"
    under = [_above(a, r) for _, r in decide.iterrows()]
    if any(v is None for v in under):
        return "inconclusive", "fewer than two seeds: no intervals"
    if not all(under):
        return "inconclusive", "intervals overlap"
    r2 = _num(a.get(f"{PRIMARY_R2}_mean"))
    lower = [r["unit_set"] for _, r in decide.iterrows()
             if r2 < _num(r.get(f"{PRIMARY_R2}_mean")) - R2_COMPARABLE]
    if lower:
        return "inconclusive", (f"q* above, but R² more than {R2_COMPARABLE} below "
                                f"{', '.join(lower)}")
    beaten = [_above(a, r) for _, r in controls.iterrows()]
    if not all(v is True for v in beaten):
        names = [r["unit_set"] for (_, r), v in zip(controls.iterrows(), beaten, strict=True)
                 if v is not True]
        return "uninformative", (f"above features and neurons, but the control "
                                 f"{', '.join(names)} is not below the atoms")
    return "supported", "above every feature set, neurons and every control"


# ---------------------------------------------------------------------------------- claim 2


def _curve_max(agg: pd.DataFrame, unit_set: str, metric: str) -> pd.Series:
    """Per |M|: the highest seed-mean ``metric`` of ``unit_set`` over |D|."""
    rows = agg[agg["unit_set"] == unit_set]
    col = f"{metric}_mean"
    return rows.groupby("train_rows")[col].max() if col in rows else pd.Series(dtype=float)


def capacities(table: pd.DataFrame, family: str) -> dict[str, pd.DataFrame]:
    """``critical_capacity`` of ``family`` on train R² ('train') and held-out R² ('held_out'),
    each where the table has that metric for the family."""
    out = {}
    for part, metric in (("train", TRAIN_R2), ("held_out", PRIMARY_R2)):
        if metric in table and table.loc[table["family"] == family, metric].notna().any():
            out[part] = critical_capacity(table, metric, family=family)
    return out


def jump_table(table: pd.DataFrame, family: str,
               found: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Per (model, site, layer, |M|), on train and on held-out R² of ``family``: the
    transition status, whether it is a jump (reaches ``NEAR_ONE``), |D|*/|M| with its interval,
    the highest R², the points and seeds; and the best exemplar control's highest R².
    ``found``: the family's ``capacities``, when already computed."""
    if not {"d_sae", "train_rows"} <= set(table):
        return pd.DataFrame()
    agg = aggregate(table)
    metrics = {"train": TRAIN_R2, "held_out": PRIMARY_R2}
    parts = {}
    for part, cc in (capacities(table, family) if found is None else found).items():
        cc = cc.assign(**{f"{part}_{c}": cc[c] for c in ("status", "d_star", "d_star_lo",
                                                        "d_star_hi")})
        parts[part] = (cc, metrics[part])
    if "held_out" not in parts:
        return pd.DataFrame()
    base = parts["held_out"][0][[*KEYS, "train_rows", "n_seeds"]].copy()
    rows = table[table["family"] == family]
    base["points"] = [rows.loc[rows["train_rows"] == m, "d_sae"].nunique()
                      for m in base["train_rows"]]
    names = agg.loc[agg["family"] == family, "unit_set"].unique()
    exemplars = agg.loc[agg["family"] == "exemplar", "unit_set"].unique()
    for part, (cc, metric) in parts.items():
        merged = base.merge(cc[[*KEYS, "train_rows", f"{part}_status", f"{part}_d_star",
                                f"{part}_d_star_lo", f"{part}_d_star_hi"]],
                            on=[*KEYS, "train_rows"], how="left")
        top = _curve_max(agg, names[0], metric) if len(names) else pd.Series(dtype=float)
        merged[f"{part}_max"] = merged["train_rows"].map(top)
        for c, tail in (("d_star", ""), ("d_star_lo", "_lo"), ("d_star_hi", "_hi")):
            merged[f"{part}_d_star_over_m{tail}"] = merged[f"{part}_{c}"] / merged["train_rows"]
        merged[f"{part}_jump"] = ((merged[f"{part}_status"] == "transition")
                                  & merged[f"{part}_d_star"].notna()
                                  & (merged[f"{part}_max"] >= NEAR_ONE))
        ex = pd.concat([_curve_max(agg, e, metric) for e in exemplars], axis=1).max(axis=1) \
            if len(exemplars) else pd.Series(dtype=float)
        merged[f"exemplar_{part}_max"] = merged["train_rows"].map(ex)
        base = merged
    return base


def _ratio(r: pd.Series, part: str) -> str:
    v, lo, hi = (_num(r.get(f"{part}_d_star_over_m{s}")) for s in ("", "_lo", "_hi"))
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(v) else "–"


def _m(r: pd.Series) -> str:
    return f"|M| = {r['train_rows']:,.0f}"


def claim_jump(table: pd.DataFrame) -> list[Verdict]:
    """Claim 2 for every atoms family of every (model, site, layer) (see the module text)."""
    out = []
    for family in ATOMS:
        jt = jump_table(table, family)
        if jt.empty:
            continue
        name = table.loc[table["family"] == family, "unit_set"].iloc[0]
        for key, g in jt.groupby(KEYS, dropna=False, sort=True):
            verdict, evidence = _jump_verdict(g)
            seeds = int(g["n_seeds"].min())
            note = "; one seed: no intervals" if seeds < 2 else f"; {seeds} seeds"
            sentence = (f"**Claim 2, {name}: {verdict}** ({where(key)}{note}). "
                        + " ".join(evidence))
            out.append(Verdict(2, family, name, where(key), verdict, sentence))
    return out


def _jump_verdict(g: pd.DataFrame) -> tuple[str, list[str]]:
    if (g["points"] < MIN_POINTS).all():
        return "too few points", [f"No |M| has {MIN_POINTS} or more dictionary sizes "
                                  f"(at most {int(g['points'].max())}); no jump can be located."]
    g = g[g["points"] >= MIN_POINTS]
    train = g.get("train_jump", pd.Series(False, index=g.index)).fillna(False).astype(bool)
    held = g["held_out_jump"].fillna(False).astype(bool)
    lines = []
    for part, jumped, label in (("train", train, "train R²"), ("held_out", held,
                                                                "held-out R²")):
        if f"{part}_max" not in g:
            continue
        hit = g[jumped]
        if len(hit):
            at = ", ".join(f"{_ratio(r, part)} ({_m(r)})" for _, r in hit.iterrows())
            lines.append(f"{label} jumps to ≥ {NEAR_ONE} at |D|*/|M| = {at}.")
        else:
            lines.append(f"{label} does not jump at any |M| (highest "
                         f"{g[f'{part}_max'].max():.3f}; transitions: "
                         f"{', '.join(sorted(set(g[f'{part}_status'].dropna())))}).")
    memorised = _exemplar_matches(g[held], "held_out") if held.any() else []
    if held.any() and not memorised:
        return "identification", lines
    if held.any():
        lines.append(f"The exemplar control reaches the same held-out R² ({', '.join(memorised)}).")
        return "memorisation", lines
    if train.any():
        copied = _exemplar_matches(g[train], "train")
        if copied:
            lines.append(f"The exemplar control, which stores training rows, reaches the same "
                         f"train R² ({', '.join(copied)}).")
        return "memorisation", lines
    return "no jump", lines


def _exemplar_matches(rows: pd.DataFrame, part: str) -> list[str]:
    """The |M| where the best exemplar control's highest R² reaches the atoms' (within 0.01)."""
    col = f"exemplar_{part}_max"
    if col not in rows:
        return []
    hit = rows[rows[col].notna() & (rows[col] >= rows[f"{part}_max"] - 0.01)]
    return [f"{r[col]:.3f} vs {r[f'{part}_max']:.3f} at {_m(r)}" for _, r in hit.iterrows()]


def design_checks(table: pd.DataFrame) -> list[str]:
    """Matched sparsity and convergence, measured: the sets off their target L0 (±10%) and the
    trained trials that stopped at their cap unconverged."""
    lines, target = [], target_l0(table)
    chosen = best_per_cell(table)
    chosen = chosen[chosen["status"] == "finished"]
    if np.isfinite(target) and "l0_mean" in chosen:
        sparse = chosen[chosen["family"] != "neurons"]
        off = sparse[~sparse["l0_mean"].apply(lambda v: matched(v, target))]
        lines.append(f"Matched sparsity: {len(sparse) - len(off)} of {len(sparse)} sparse unit-set "
                     f"rows within ±10% of the target L0 {target:g}" + (
                         "." if off.empty else "; off target: " + ", ".join(
                             f"{r.trial_key} (L0 {r.l0_mean:.1f})" for r in off.head(12)
                             .itertuples()) + ("…" if len(off) > 12 else "") + "."))
    if "converged" in chosen and chosen["converged"].notna().any():
        trained = chosen[chosen["converged"].notna()]
        stuck = trained[~trained["converged"].astype(bool)]
        lines.append(f"Convergence: {len(trained) - len(stuck)} of {len(trained)} trained trials "
                     "converged" + ("." if stuck.empty else "; **unconverged** (stopped at the "
                                    "step cap): " + ", ".join(stuck["trial_key"].head(12)) +
                                    ("…" if len(stuck) > 12 else "") + "."))
    return lines


def verdicts(table: pd.DataFrame) -> list[Verdict]:
    """Both claims for every atoms family: Claim 1 verdicts, then Claim 2."""
    return [*claim_q_star(table), *claim_jump(table)]
