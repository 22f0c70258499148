"""The critical capacity |D|*(|M|), the law |D|* = e^a · |M|^α, and Gao et al.'s L(N) fits.

Per row |M| of the |M| × |D| grid (best λ per cell), ȳ(D) is the seed mean of the metric at
|D| = D latents. A *transition* is a step between neighbouring grid points with
  ȳ(D_{i+1}) − ȳ(D_i) ≥ JUMP  and, where both points have ≥ 2 seeds,
  ȳ(D_{i+1}) − ȳ(D_i) > t_{1−0.05/k, n_i+n_{i+1}−2} · √(s_i²/n_i + s_{i+1}²/n_{i+1}),
(s: seed standard deviation; k: steps in the row), a one-sided t-test at family-wise level 5%.
|D|* is where ȳ crosses ``level`` upward, linear in log D between the bracketing grid points:
  log D* = log D_i + (level − ȳ_i)/(ȳ_{i+1} − ȳ_i) · (log D_{i+1} − log D_i),
taking the crossing segment with the largest rise; ``level`` defaults to (min ȳ + max ȳ)/2.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from analysis.aggregate import PRIMARY_R2, best
from analysis.summary import JUMP
from atoms.core.errors import InputError

FAMILY_LEVEL = 0.05
"""Family-wise false-transition rate per |M| row when seeds allow a noise test."""
BOOTSTRAP = 1000
"""Bootstrap resamples over seeds for the |D|* interval."""
MAX_ALPHA_WIDTH = 1.0
"""A fitted exponent whose 95% interval is wider than this is reported as unsupported."""
KEYS = ["model", "site", "layer"]


def _curves(table: pd.DataFrame, metric: str, family: str) -> pd.DataFrame:
    b = best(table)
    for c in ("d_sae", metric):
        if c not in b:
            raise InputError(f"results table: missing required column {c!r}")
    b = b[(b["family"] == family) & b[metric].notna() & b["d_sae"].notna()]
    if "h" not in b:
        b = b.assign(h=b["d_sae"] / b["d_sae_over_h"])
    return b


def _crossings(curves: np.ndarray, level: np.ndarray, logd: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(log D*, segment index) per curve (rows of ``curves``); NaN/-1 where none crosses up."""
    y0, y1 = curves[:, :-1], curves[:, 1:]
    lev = level[:, None]
    up = (y0 < lev) & (y1 >= lev)
    j = np.where(up, y1 - y0, -np.inf).argmax(1)
    rows = np.arange(len(curves))
    a, b = y0[rows, j], y1[rows, j]
    frac = (level - a) / np.where(b > a, b - a, 1.0)
    out = logd[j] + frac * (logd[j + 1] - logd[j])
    found = up.any(1)
    return np.where(found, out, np.nan), np.where(found, j, -1)


def _levels(curves: np.ndarray, level: float | None) -> np.ndarray:
    if level is None:
        return (curves.min(1) + curves.max(1)) / 2
    return np.full(len(curves), float(level))


def _row(seeds: list[np.ndarray], ds: np.ndarray, level: float | None, rng) -> dict:
    """Transition, |D|* and its interval for one |M| row from the seed values per |D|."""
    mean = np.array([v.mean() for v in seeds])
    sd = np.array([v.std(ddof=1) if len(v) > 1 else np.nan for v in seeds])
    n = np.array([len(v) for v in seeds])
    rise = np.diff(mean)
    se = np.sqrt(sd[:-1] ** 2 / n[:-1] + sd[1:] ** 2 / n[1:])
    noisy = (n[:-1] > 1) & (n[1:] > 1)
    bar = stats.t.ppf(1 - FAMILY_LEVEL / len(rise), np.maximum(n[:-1] + n[1:] - 2, 1)) * se
    ok = (rise >= JUMP) & (~noisy | (rise > bar))
    k = int(rise.argmax())
    out = {"status": "transition" if ok.any() else "no transition", "largest_rise": rise[k],
           "at_d": ds[k + 1], "noise": bar[k] if noisy[k] else np.nan,
           "n_seeds": int(n.min())}
    lev = _levels(mean[None], level)
    logd = np.log(ds)
    x, j = _crossings(mean[None], lev, logd)
    out.update(level=float(lev[0]), d_star=np.nan, d_star_lo=np.nan, d_star_hi=np.nan)
    if not ok.any() or j[0] < 0:
        return out
    lo, hi = logd[j[0]], logd[j[0] + 1]
    if n.min() > 1:
        boot = np.stack([v[rng.integers(0, len(v), (BOOTSTRAP, len(v)))].mean(1) for v in seeds],
                        axis=1)
        bx = _crossings(boot, _levels(boot, level), logd)[0]
        bx = bx[np.isfinite(bx)]
        if len(bx):
            lo, hi = min(lo, np.percentile(bx, 2.5)), max(hi, np.percentile(bx, 97.5))
    out.update(d_star=math.exp(x[0]), d_star_lo=math.exp(lo), d_star_hi=math.exp(hi))
    return out


def critical_capacity(table: pd.DataFrame, metric: str = PRIMARY_R2, level: float | None = None,
                      family: str = "tsae") -> pd.DataFrame:
    """Per (model, site, layer, |M|): status ('transition' | 'no transition' | 'one |D| only'),
    the level used, |D|* with its interval (latents and /H), the largest rise and the |D| it
    reaches. Interval: the bracketing grid interval, widened to the 2.5–97.5 percentiles of
    |D|* over a seeded bootstrap over seeds (resampled per |D|) where every |D| has ≥ 2 seeds."""
    b = _curves(table, metric, family)
    rng = np.random.default_rng(0)
    rows = []
    for key, g in b.groupby([*KEYS, "train_rows"], dropna=False, sort=True):
        ds = np.sort(g["d_sae"].unique().astype(float))
        seeds = [g.loc[g["d_sae"] == d, metric].to_numpy(float) for d in ds]
        base = dict(zip([*KEYS, "train_rows"], key, strict=True))
        h = float(g["h"].iloc[0])
        if len(ds) < 2:
            rows.append({**base, "status": "one |D| only", "level": np.nan, "d_star": np.nan,
                         "d_star_lo": np.nan, "d_star_hi": np.nan, "largest_rise": np.nan,
                         "at_d": np.nan, "noise": np.nan, "n_seeds": len(seeds[0]), "h": h})
            continue
        rows.append({**base, **_row(seeds, ds, level, rng), "h": h})
    cols = [*KEYS, "train_rows", "status", "level", "d_star", "d_star_lo", "d_star_hi",
            "d_star_over_h", "d_star_lo_over_h", "d_star_hi_over_h", "largest_rise", "at_d",
            "at_d_over_h", "noise", "n_seeds", "h"]
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=cols)
    for c in ("d_star", "d_star_lo", "d_star_hi", "at_d"):
        out[f"{c}_over_h"] = out[c] / out["h"]
    return out[cols]


def _unsupported(reason: str, n: int) -> dict:
    return {"supported": False, "reason": reason, "alpha": np.nan, "alpha_lo": np.nan,
            "alpha_hi": np.nan, "a": np.nan, "n_points": n}


def fit_power_law(dstar: pd.DataFrame) -> dict:
    """Weighted least squares log D* = a + α log M over the 'transition' rows with a located D*.

    Weights w = 1/σ² with σ = (log D*_hi − log D*_lo)/(2·1.96); the covariance (XᵀWX)⁻¹ is scaled
    by max(1, χ²/(n−2)) and α's interval is α ± t₀.₉₇₅,ₙ₋₂ · se(α). Unsupported (α NaN, a reason)
    with fewer than 3 such rows, fewer than 3 distinct |M|, rows from several (model, site,
    layer), or an interval wider than MAX_ALPHA_WIDTH."""
    rows = dstar[(dstar["status"] == "transition") & np.isfinite(dstar["d_star"])]
    n = len(rows)
    if n < 3:
        return _unsupported(f"only {n} |M| rows with a located transition (need ≥ 3)", n)
    groups = rows[KEYS].drop_duplicates()
    if len(groups) > 1:
        return _unsupported(f"rows from {len(groups)} (model, site, layer) groups; fit each "
                            "group separately", n)
    if rows["train_rows"].nunique() < 3:
        return _unsupported(f"only {rows['train_rows'].nunique()} distinct |M| (need ≥ 3)", n)
    x, y = np.log(rows["train_rows"].to_numpy(float)), np.log(rows["d_star"].to_numpy(float))
    width = np.log(rows["d_star_hi"].to_numpy(float)) - np.log(rows["d_star_lo"].to_numpy(float))
    sigma = np.maximum(width, 1e-9) / (2 * 1.96)
    w = 1 / sigma**2
    X = np.stack([np.ones(n), x], axis=1)
    cov = np.linalg.inv(X.T @ (X * w[:, None]))
    a, alpha = cov @ (X.T @ (w * y))
    chi2 = float((w * (y - a - alpha * x) ** 2).sum())
    se = math.sqrt(cov[1, 1] * max(1.0, chi2 / (n - 2)))
    half = stats.t.ppf(0.975, n - 2) * se
    if 2 * half > MAX_ALPHA_WIDTH:
        return _unsupported(f"α = {alpha:.2f} ± {half:.2f} (95%): the interval is wider than "
                            f"{MAX_ALPHA_WIDTH}", n)
    return {"supported": True, "reason": f"weighted fit over {n} |M| values",
            "alpha": float(alpha), "alpha_lo": float(alpha - half),
            "alpha_hi": float(alpha + half), "a": float(a), "n_points": n}


def gao_fit(table: pd.DataFrame, family: str = "tsae") -> pd.DataFrame:
    """Per (model, site, layer, |M|): L = 1 − R² (normalised MSE, seed mean) against latents N,
    fit log L = log c − β log N by least squares; β ± t₀.₉₇₅,ₙ₋₂ · se(β) (NaN below 3 points)."""
    b = _curves(table, PRIMARY_R2, family)
    rows = []
    for key, g in b.groupby([*KEYS, "train_rows"], dropna=False, sort=True):
        pts = g.groupby("d_sae")[PRIMARY_R2].mean()
        loss = 1 - pts
        pts = loss[loss > 0]
        rec = {**dict(zip([*KEYS, "train_rows"], key, strict=True)), "n_points": len(pts),
               "beta": np.nan, "beta_lo": np.nan, "beta_hi": np.nan, "c": np.nan}
        if len(pts) >= 3:
            fit = stats.linregress(np.log(pts.index.to_numpy(float)), np.log(pts.to_numpy()))
            half = stats.t.ppf(0.975, len(pts) - 2) * fit.stderr
            rec.update(beta=-fit.slope, beta_lo=-fit.slope - half, beta_hi=-fit.slope + half,
                       c=math.exp(fit.intercept))
        rows.append(rec)
    return pd.DataFrame(rows, columns=[*KEYS, "train_rows", "n_points", "beta", "beta_lo",
                                       "beta_hi", "c"])


def _g(v: float) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3g}"


def law_summary(table: pd.DataFrame) -> list[str]:
    """Markdown bullets: the transition per |M|, the fitted law (or why none), Gao's β per |M|."""
    dstar, gao = critical_capacity(table), gao_fit(table)
    lines = []
    for key, rows in dstar.groupby(KEYS, dropna=False, sort=True):
        where = f"{key[0]} {key[1]} layer {key[2]}"
        for _, r in rows.iterrows():
            m = f"|M| = {r['train_rows']:.0f}"
            if r["status"] == "one |D| only":
                lines.append(f"- {where}, {m}: one |D| only, no transition can be located")
            elif r["status"] == "no transition":
                why = (f"below {JUMP}" if r["largest_rise"] < JUMP
                       else f"within the seed noise {_g(r['noise'])}")
                lines.append(f"- {where}, {m}: no transition (largest rise "
                             f"{_g(r['largest_rise'])} reaching |D| = {r['at_d']:.0f}, {why})")
            elif np.isfinite(r["d_star"]):
                lines.append(f"- {where}, {m}: transition, |D|* = {r['d_star']:.0f} "
                             f"({_g(r['d_star_over_h'])}H; 95% [{r['d_star_lo']:.0f}, "
                             f"{r['d_star_hi']:.0f}]) at R² level {_g(r['level'])}, largest rise "
                             f"{_g(r['largest_rise'])}")
            else:
                lines.append(f"- {where}, {m}: a rise of {_g(r['largest_rise'])} but the curve "
                             f"never crosses R² {_g(r['level'])} upward; |D|* not located")
        fit = fit_power_law(rows)
        if fit["supported"]:
            lines.append(f"- {where}: |D|* = e^a · |M|^α with α = {fit['alpha']:.3f} (95% "
                         f"[{fit['alpha_lo']:.3f}, {fit['alpha_hi']:.3f}]), a = {fit['a']:.3f}, "
                         f"over {fit['n_points']} |M| values")
        else:
            lines.append(f"- {where}: no scaling law fitted: {fit['reason']}")
    for _, r in gao.iterrows():
        where = f"{r['model']} {r['site']} layer {r['layer']}, |M| = {r['train_rows']:.0f}"
        if np.isfinite(r["beta"]):
            lines.append(f"- Gao et al. form L = c·N^(−β), {where}: β = {r['beta']:.3f} (95% "
                         f"[{r['beta_lo']:.3f}, {r['beta_hi']:.3f}]) over {r['n_points']} |D|")
        else:
            lines.append(f"- Gao et al. form, {where}: {r['n_points']} |D| with L > 0, too few "
                         "to fit (need ≥ 3)")
    return lines
