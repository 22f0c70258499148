"""The study report from any results folder: report.html (self-contained, images inlined) and
report.md (+ report_files/*.png).

    python -m analysis.report RESULTS [RESULTS ...] [--out DIR]

RESULTS: a study folder, a results.parquet, or a folder of study folders (one report over all).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import math
import os
import re
import sys
from pathlib import Path

import pandas as pd

from analysis import claim_plots, plots, verdicts
from analysis.aggregate import aggregate, best, headline, load_results
from analysis.monosemanticity import score_table
from analysis.scaling_law import KEYS, critical_capacity, fit_power_law, gao_fit, law_summary
from analysis.verdicts import where as _where
from atoms.aip.shift import pairwise_angles
from atoms.core.errors import AtomsError, InputError
from atoms.core.io import atomic_path
from atoms.store.results import publish_results, pull_results
from atoms.store.storage import is_remote

UNIT_COLUMNS = {"unit_set": "unit set", "family": "family", "d_sae_over_h": "|D|/H",
                "train_rows": "|M|", "k": "k / K", "n_seeds": "seeds",
                "r2_euclid_centred": "R²", "r2_aip_centred": "R² (AIP)",
                "train_r2_euclid_centred": "train R²", "train_r2_aip_centred": "train R² (AIP)",
                "q_star_pairwise": "q* pairwise", "q_star_per_unit": "q* per unit",
                "q_star_per_activation": "q* per activation", "uniqueness_pct": "unique %",
                "l0_mean": "L0", "dead_fraction": "dead", "mono_score": "mono score",
                "stability_matched_fraction": "seed-stable (|cos_S̃| ≥ 0.9)",
                "stability_pw_mcc": "PW-MCC", "converged": "converged", "steps": "steps"}
HEADLINE_COLUMNS = {"model": "model", "layer": "layer", "unit_set": "unit set",
                    "d_sae_over_h": "|D|/H", "train_rows": "|M|", "k": "k / K",
                    "r2": "R² (held out)", "train_r2": "R² (train)",
                    "r2_aip": "AIP R² (held out)",
                    "q_star": "q* (pairwise)",
                    "uniqueness_pct": "unique %", "l0": "L0", "dead_fraction": "dead",
                    "stability_matched": "seed-stable", "stability_pw_mcc": "PW-MCC",
                    "mono_score": "mono score", "n_seeds": "seeds"}
UNIT_SET_NOTES = [
    "**atoms**: threshold SAEs trained with a Euclidean loss; **atoms_aip**: trained in the "
    "AIP geometry (loss ‖m − m̂‖²_S̃, atoms of unit AIP norm, the paper's uncentred S̃); "
    "**jumprelu_centred_whitening**: the same on centred covariance-whitened rows (the peers' "
    "normalisation, a control).",
    "**relu_features** / **topk_features** / **batchtopk_features**: ReLU + L1, TopK and "
    "BatchTopK SAEs (BatchTopK judged as the JumpReLU of its learned threshold). **random**: "
    "random directions, OMP codes. **exemplar_kK**: |D| training rows stored as directions, "
    "K-sparse OMP codes in the AIP geometry: it learns nothing, so a learned set whose score "
    "it matches has shown no more than memorisation.",
    "Stability columns: the share of a set's units found again (Hungarian, |cos_S̃| ≥ 0.9) by "
    "another seed, and the pairwise mean max-cosine, both over seed pairs (– with one seed).",
]
JUMP_COLUMNS = {"train_rows": "|M|", "points": "|D| points", "n_seeds": "seeds",
                "train_status": "train", "train_max": "train R² max",
                "train_d_star_over_m": "train |D|*/|M|", "held_out_status": "held out",
                "held_out_max": "held-out R² max", "held_out_d_star_over_m": "held-out |D|*/|M|",
                "exemplar_train_max": "exemplar train R² max",
                "exemplar_held_out_max": "exemplar held-out R² max"}
DSTAR_COLUMNS = {"train_rows": "|M|", "status": "status", "level": "R² level",
                 "d_star": "|D|*", "d_star_over_h": "|D|*/H", "largest_rise": "largest rise",
                 "at_d_over_h": "at |D|/H", "n_seeds": "seeds"}
GAO_COLUMNS = {"model": "model", "layer": "layer", "train_rows": "|M|", "n_points": "|D| points",
               "beta": "β", "c": "c"}


# -- rendering -----------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None or isinstance(v, float) and math.isnan(v):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float):
        v = float(v)
        if v.is_integer() and abs(v) >= 1:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def tidy(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """The ``columns`` present (key → label) as strings; a value with ``<key>_lo``/``_hi`` (or
    ``<key>_mean``/``_lo``/``_hi``) reads "mean [lo, hi]"."""
    out = {}
    for key, label in columns.items():
        col = key if key in df else f"{key}_mean"
        if col not in df:
            continue
        lo, hi = f"{key}_lo", f"{key}_hi"
        cells = []
        for i in range(len(df)):
            v = df[col].iloc[i]
            text = _fmt(v)
            if lo in df and hi in df and pd.notna(df[lo].iloc[i]) and pd.notna(df[hi].iloc[i]):
                text += f" [{_fmt(df[lo].iloc[i])}, {_fmt(df[hi].iloc[i])}]"
            cells.append(text)
        out[label] = cells
    return pd.DataFrame(out)


def _inline(text: str) -> str:
    """HTML of a line of Markdown text: **bold** and `code` only."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _md(text: str) -> str:
    """Markdown text with lone asterisks (|D|*, q*) escaped."""
    return re.sub(r"(?<!\*)\*(?!\*)", r"\\*", text)


CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
.wide{overflow-x:auto}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:.5em 0}
h2{border-bottom:1px solid #ddd;margin-top:1.8em}pre{background:#f6f6f6;padding:.6em;
overflow:auto;font-size:12px;max-height:30em}.empty{color:#777}"""


class Doc:
    """A report as blocks, rendered once to HTML (images inlined) and once to Markdown."""

    def __init__(self, title: str):
        self.title, self.blocks, self.images = title, [], {}

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", [i.removeprefix("- ") for i in items]))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def image(self, name: str, fig, alt: str) -> None:
        self.images[name] = plots.png(fig)
        self.blocks.append(("img", name, alt))

    def details(self, summary: str, text: str) -> None:
        self.blocks.append(("pre", summary, text))

    def html(self) -> str:
        parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>"
                 f"{html.escape(self.title)}</title><style>{CSS}</style></head><body>",
                 f"<h1>{html.escape(self.title)}</h1>"]
        for kind, *a in self.blocks:
            if kind == "h":
                parts.append(f"<h{a[0]}>{_inline(a[1])}</h{a[0]}>")
            elif kind == "p":
                parts.append(f"<p>{_inline(a[0])}</p>")
            elif kind == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in a[0]) + "</ul>")
            elif kind == "table":
                parts.append(_html_table(a[0]))
            elif kind == "img":
                data = base64.b64encode(self.images[a[0]]).decode()
                parts.append(f"<img id='{a[0]}' alt='{html.escape(a[1])}' "
                             f"src='data:image/png;base64,{data}'>")
            elif kind == "pre":
                parts.append(f"<details><summary>{html.escape(a[0])}</summary><pre>"
                             f"{html.escape(a[1])}</pre></details>")
        return "\n".join([*parts, "</body></html>\n"])

    def markdown(self, files: str) -> str:
        parts = [f"# {self.title}"]
        for kind, *a in self.blocks:
            if kind == "h":
                parts.append(f"{'#' * a[0]} {_md(a[1])}")
            elif kind == "p":
                parts.append(_md(a[0]))
            elif kind == "ul":
                parts.append("\n".join(f"- {_md(i)}" for i in a[0]))
            elif kind == "table":
                parts.append(_md_table(a[0]))
            elif kind == "img":
                parts.append(f"![{a[1]}]({files}/{a[0]}.png)")
            elif kind == "pre":
                parts.append(f"<details><summary>{html.escape(a[0])}</summary>\n\n```json\n"
                             f"{a[1]}\n```\n\n</details>")
        return "\n\n".join(parts) + "\n"

    def write(self, out: Path) -> tuple[Path, Path]:
        """report_files/*.png, then report.md, then report.html, each atomically."""
        out = Path(out)
        for name, data in self.images.items():
            with atomic_path(out / "report_files" / f"{name}.png") as tmp:
                tmp.write_bytes(data)
        with atomic_path(out / "report.md") as tmp:
            tmp.write_text(self.markdown("report_files"))
        with atomic_path(out / "report.html") as tmp:
            tmp.write_text(self.html())
        return out / "report.html", out / "report.md"


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p class='empty'>(no rows)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return (f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no rows)"

    def cell(v) -> str:
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, "|" + "---|" * len(df.columns), *body])


# -- sections ------------------------------------------------------------------------------
def _groups(table: pd.DataFrame):
    return table.groupby(KEYS, dropna=False, sort=True)


def claims(doc: Doc, table: pd.DataFrame) -> None:
    """The two claims first: one sentence each (``analysis.verdicts``), how well the study met
    its design (matched sparsity, convergence), then the figures behind the verdicts."""
    doc.h("The paper's two claims")
    found = verdicts.verdicts(table)
    doc.bullets([v.sentence for v in found] or ["No atoms in these results: no verdict."])
    doc.bullets(verdicts.design_checks(table))
    agg, target = aggregate(table), verdicts.target_l0(table)
    for i, (key, g) in enumerate(_groups(agg)):
        doc.image(f"r2_l0_{i}", claim_plots.r2_l0_frontier(
            g, target, f"R²–L0, {_where(key)}"), f"R² against L0 by unit set, {_where(key)}")
    h = int(table["h"].dropna().iloc[0]) if "h" in table and table["h"].notna().any() else 0
    for family in verdicts.ATOMS:
        rows = agg[agg["family"] == family]
        if rows.empty or not h:
            continue
        name = rows["unit_set"].iloc[0]
        doc.h(f"{name}: train and held-out R² over |D| and |M|", 3)
        doc.image(f"ratio_{family}", claim_plots.r2_against_ratio(agg, name, h),
                  f"{name}: train and held-out R² against |D|/|M|")
        grids = [rows.pivot_table(index="train_rows", columns="d_sae_over_h", values=f"{m}_mean")
                 for m in (verdicts.TRAIN_R2, verdicts.PRIMARY_R2) if f"{m}_mean" in rows]
        found = verdicts.capacities(table, family)
        if len(grids) == 2 and rows["train_rows"].notna().any():
            doc.image(f"heatmaps_{family}", claim_plots.r2_heatmap_pair(
                *grids, found.get("train"), found.get("held_out"), f"{name}: |M| × |D|"),
                f"{name}: train and held-out R² grids")
        jt = verdicts.jump_table(table, family, found)
        if len(jt):
            doc.table(tidy(jt, JUMP_COLUMNS))


def overview(doc: Doc, table: pd.DataFrame) -> None:
    studies = table["study"].unique() if "study" in table else table["source"].unique()
    doc.p(f"{len(table)} result rows from {len(studies)} "
          f"{'study' if len(studies) == 1 else 'studies'}: {', '.join(map(str, studies))}. "
          "Metrics are on held-out test rows, best λ per cell (lowest validation objective), "
          "mean and 95% Student-t interval over seeds (– where fewer than two seeds).")
    doc.h("Headline: neurons, features, atoms, controls")
    heads = headline(table)
    doc.table(tidy(heads, HEADLINE_COLUMNS))
    doc.bullets(UNIT_SET_NOTES + control_verdicts(heads))
    doc.h("Unit sets at every |D| and |M|")
    doc.table(tidy(aggregate(table), UNIT_COLUMNS))


LEARNED = ("tsae", "tsae_aip", "tsae_aip_centred", "relu", "topk", "batchtopk", "pretrained")


def control_verdicts(heads: pd.DataFrame) -> list[str]:
    """One line per learned unit set of the headline: its held-out R² against the best
    exemplar control's (at the L0s shown; the sets are not at matched sparsity unless the
    study made them so)."""
    lines = []
    if heads.empty or not {"r2_mean", "l0", "family"} <= set(heads):
        return lines
    metrics = [(c, name) for c, name in (("r2_mean", "R²"), ("r2_aip", "AIP R²")) if c in heads]
    for key, g in _groups(heads):
        for col, name in metrics:
            ex = g[(g["family"] == "exemplar") & g[col].notna()]
            if ex.empty:
                continue
            top = ex.loc[ex[col].idxmax()]
            for r in g[g["family"].isin(LEARNED) & g[col].notna()].itertuples():
                value = getattr(r, col)
                above = "above" if value > top[col] else "**not above**"
                lines.append(f"{r.unit_set} ({_where(key)}): held-out {name} {value:.3f} at "
                             f"L0 {r.l0:.1f}, {above} the exemplar control {top['unit_set']} "
                             f"({top[col]:.3f} at L0 {top['l0']:.1f}).")
    return lines


def scaling(doc: Doc, table: pd.DataFrame) -> None:
    doc.h("Scaling: held-out R² over |M| × |D| and the critical capacity |D|*")
    agg = aggregate(table)
    dstar = critical_capacity(table)
    for i, (key, rows) in enumerate(_groups(dstar)):
        atoms = agg[(agg["family"] == "tsae") & (agg[KEYS] == list(key)).all(axis=1)]
        grid = atoms.pivot_table(index="train_rows", columns="d_sae_over_h",
                                 values="r2_euclid_centred_mean").sort_index().sort_index(axis=1)
        law = fit_power_law(rows)
        if len(grid):
            doc.image(f"r2_heatmap_{i}",
                      plots.r2_heatmap(grid, rows, law, f"Atoms: held-out R², {_where(key)}"),
                      f"R² heat map with |D|* boundary, {_where(key)}")
        doc.table(tidy(rows, DSTAR_COLUMNS))
        if law["supported"]:
            doc.p(f"**Fitted exponent ({_where(key)}):** |D|* = e^a·|M|^α with α = "
                  f"{law['alpha']:.3f} (95% [{law['alpha_lo']:.3f}, {law['alpha_hi']:.3f}]), "
                  f"a = {law['a']:.3f}, over {law['n_points']} |M| values.")
        else:
            doc.p(f"**No exponent ({_where(key)}):** the data cannot support a fit of |D|* = "
                  f"e^a·|M|^α: {law['reason']}.")
    doc.h("What the scaling law says", 3)
    doc.bullets(law_summary(table))
    doc.h("Gao et al. fit L(N) = c·N^(−β), L = 1 − R²", 3)
    doc.table(tidy(gao_fit(table), GAO_COLUMNS))


def stability(doc: Doc, table: pd.DataFrame) -> None:
    doc.h("Stability q* by unit set")
    agg = aggregate(table)
    if "q_star_pairwise_mean" not in agg:
        doc.p("No q* column in these results.")
        return
    for i, (key, g) in enumerate(agg.groupby(KEYS, dropna=False, sort=True)):
        atoms = g[g["family"] == "tsae"]
        if len(atoms) and atoms["train_rows"].notna().any():
            m = _atoms_m(g)
            has_m = g["unit_set"].isin(g.loc[g["train_rows"] == m, "unit_set"])
            g = g[~has_m | (g["train_rows"] == m)]  # one bar per set and |D|
            where = f"{_where(key)}; atoms at |M| = {m:.0f}"
        else:
            where = _where(key)
        doc.image(f"q_star_{i}", plots.q_star_bars(g, title=f"Stability q* "
                  f"(pairwise), {where}"), f"q* by unit set, {where}")


def _atoms_m(g: pd.DataFrame) -> float:
    """The |M| the atoms are compared at: the ReLU features' |M| when trained, else the largest."""
    relu = g.loc[g["family"] == "relu", "train_rows"].dropna()
    atoms = g.loc[g["family"] == "tsae", "train_rows"].dropna()
    both = sorted(set(relu) & set(atoms))
    return float(both[-1] if both else atoms.max())


def artefacts(doc: Doc, table: pd.DataFrame) -> None:
    """Angle, L0 and threshold figures, from held-out rows, S̃ and the saved SAEs."""
    chosen = best(table)
    chosen = chosen[chosen["status"] == "finished"]
    angles, l0_figs, theta_figs, notes = {}, [], [], []
    heads = headline(table)
    for key, rows in _groups(chosen):
        where = _where(key)
        try:
            x = plots.held_out_sample(rows.iloc[0])
        except plots.Skipped as e:
            notes.append(f"{where}: angle, L0 and threshold figures skipped: {e}")
            continue
        try:
            aip = plots.study_aip(rows.iloc[0])
            angles[where] = (pairwise_angles(x), pairwise_angles(x, aip))
        except plots.Skipped as e:
            notes.append(f"{where}: angle and threshold figures skipped: {e}")
            aip = None
        head = heads[(heads[KEYS] == list(key)).all(axis=1)]
        picked = _one_seed(rows.merge(head[["unit_set", "d_sae_over_h", "train_rows"]],
                                      on=["unit_set", "d_sae_over_h", "train_rows"]))
        l0, why = plots.l0_samples(picked, x, _neuron_tol(rows.iloc[0]))
        notes += [f"{where}: L0 of {w}" for w in why]
        if l0:
            l0_figs.append((where, plots.l0_histograms(l0)))
        if aip is not None:
            items, why = plots.threshold_items(_thresholds(rows), x, aip)
            notes += [f"{where}: thresholds of {w}" for w in why]
            if items:
                theta_figs.append((where, plots.threshold_histograms(items)))
    doc.h("Representation shift: Euclidean vs AIP angles")
    doc.p(f"Pairwise angles between {plots.SAMPLE_ROWS} held-out test rows per layer: a shared "
          "offset pulls Euclidean angles below 90°; under the AIP ⟨u, v⟩ = uᵀS̃v they centre "
          "on 90°.")
    if angles:
        doc.image("angles", plots.angle_histograms(angles), "pairwise-angle histograms")
    doc.h("Sparsity: L0 per held-out row")
    doc.p("Active units per activation for the unit sets of the headline table (neurons count "
          "|x| > eval.neuron_tol).")
    for i, (where, fig) in enumerate(l0_figs):
        doc.image(f"l0_{i}", fig, f"L0 histograms, {where}")
    doc.h("Learned thresholds against the theorem interval")
    doc.p("Best atoms SAE per |D| at the largest |M|: θⱼ‖dⱼ‖_S̃ (AIP-unit-atom units) against "
          "(εKδ_max, δ_min − ε(K−1)δ_max), with ε the AIP coherence μ of the decoder, K the "
          "largest L0 and δ the rescaled codes on the sample; the interval is empty unless "
          "δ_min > ε(2K−1)δ_max.")
    for i, (where, fig) in enumerate(theta_figs):
        doc.image(f"thresholds_{i}", fig, f"threshold histograms, {where}")
    if notes:
        doc.h("Notes on these figures", 3)
        doc.bullets(notes)


def _one_seed(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.sort_values("seed", kind="stable") if "seed" in rows else rows
    return rows.groupby(["unit_set", "d_sae_over_h", "train_rows"], dropna=False, sort=False
                        ).head(1)


def _thresholds(rows: pd.DataFrame) -> pd.DataFrame:
    atoms = rows[rows["family"] == "tsae"]
    return _one_seed(atoms[atoms["train_rows"] == atoms["train_rows"].max()]
                     ).sort_values("d_sae_over_h")


def _neuron_tol(row: pd.Series) -> float:
    return float(plots.study_config(row).get("eval", {}).get("neuron_tol", 1e-6))


def monosemanticity(doc: Doc, table: pd.DataFrame) -> None:
    frames = []
    for source in table["source"].unique():
        path = Path(source) / "monosemanticity" / "scores.parquet"
        if path.is_file():
            try:
                frames.append(pd.read_parquet(path).assign(source=source))
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__})") \
                    from None
    if not frames:
        return
    scores = pd.concat(frames, ignore_index=True)
    doc.h("Monosemanticity (judged unit explanations)")
    if "judge" not in scores:
        scores["judge"] = "heuristic_judge"
    summary = score_table(scores)
    names = {"unit_set": "unit set", "judge": "judge", "n_units": "units",
             "score": "mean score", "parse_failure_fraction": "parse failures"}
    doc.table(tidy(summary, names))
    judges = sorted(set(map(str, scores["judge"])))
    llm = [j for j in judges if j != "heuristic_judge"]
    if llm:
        doc.p(f"Judged by {', '.join(llm)} as delphi scores explanations: the judge explains "
              "a unit from half its top contexts, then labels the other half and as many "
              "contexts where the unit is 0 as fitting the explanation or not. The score is "
              "balanced accuracy (chance 0.5); an answer that is not yes or no is a parse "
              "failure, counted above, never a score.")
    docs = _context_documents(table["source"].unique())
    if docs is not None and "heuristic_judge" in judges:
        doc.p(f"The top contexts come from {docs} distinct document{'s' * (docs != 1)} of the "
              "held-out rows. "
              "With few documents the contexts of every unit share words, and the offline "
              "heuristic (token agreement + lexical overlap) cannot separate the unit sets; set "
              "monosemanticity.judge (hf:<model> or openai:<model>) for an LLM's reading.")


def _context_documents(sources) -> int | None:
    """Distinct doc_id among the exported top contexts, or None when none were exported."""
    docs, found = set(), False
    for source in sources:
        path = Path(source) / "monosemanticity" / "contexts.jsonl"
        if path.is_file():
            found = True
            with path.open() as f:
                docs.update((source, json.loads(line).get("doc_id")) for line in f if line.strip())
    return len(docs) if found else None


def provenance(doc: Doc, table: pd.DataFrame) -> None:
    doc.h("Which variants produced these numbers")
    rows = []
    for source, g in table.groupby("source", sort=True):
        conf = g["study_config"].dropna().iloc[0] if "study_config" in g and \
            g["study_config"].notna().any() else ""
        rows.append({"study": _join(g, "study"), "rows": len(g),
                     "code version": _join(g, "code_version"),
                     "R² variant": _join(g, "r2_primary"), "q* reading": _join(g, "q_star_primary"),
                     "positions": _join(g, "positions"), "S̃ from": _aip_source(g),
                     "config sha256": hashlib.sha256(conf.encode()).hexdigest()[:12] if conf
                     else "–", "folder": source})
        if conf:
            doc.details(f"study_config of {_join(g, 'study')}",
                        json.dumps(json.loads(conf), indent=1, sort_keys=True))
    doc.table(pd.DataFrame(rows))


def _aip_source(g: pd.DataFrame) -> str:
    """S̃'s corpus, rows and exclusions as every row records them ('–' for older rows)."""
    if "aip_corpus" not in g or g["aip_corpus"].isna().all():
        return "–"
    row = g.dropna(subset=["aip_corpus"]).iloc[0]
    left_out = [f"{int(row[f'aip_dropped_{k}'])} {name}" for k, name in
                (("bos", "BOS"), ("sinks", "sink")) if row.get(f"aip_dropped_{k}", 0) > 0]
    out = f"{row['aip_corpus']}, {int(row['aip_rows']):,} rows"
    return out + (f" ({', '.join(left_out)} rows left out)" if left_out else "")


def _join(g: pd.DataFrame, col: str) -> str:
    return ", ".join(sorted(map(str, g[col].dropna().unique()))) if col in g else "–"


def diverged(doc: Doc, table: pd.DataFrame) -> None:
    doc.h("Diverged or failed trials")
    bad = table[table["status"] != "finished"]
    if bad.empty:
        doc.p("None: every trial finished.")
        return
    cols = [c for c in ("study", "trial_key", "family", "d_sae_over_h", "train_rows", "seed",
                        "sparsity_coeff", "status", "error") if c in bad]
    doc.table(tidy(bad[cols], {c: c for c in cols}))


REPORT_FILES = ("report_files", "report.md", "report.html")
"""What ``Doc.write`` writes, in that order (the HTML, written last, marks it complete)."""

SECTIONS = (claims, overview, scaling, stability, artefacts, monosemanticity, provenance, diverged)


# -- entry points --------------------------------------------------------------------------
def _default_out(paths: list[Path]) -> Path:
    folders = [p.parent if p.is_file() else p for p in paths]
    return folders[0] if len(folders) == 1 else Path(os.path.commonpath(
        [f.resolve() for f in folders]))


def build_report(paths, out=None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (+ ``report_files/``) for the results under
    ``paths`` into ``out`` (default: the folder given); returns (html, md)."""
    paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not paths:
        raise InputError("report: no results folder given")
    table = load_results(paths)
    out = Path(out) if out is not None else _default_out(paths)
    doc = Doc("Atoms study report")
    for section in SECTIONS:
        section(doc, table)
    return doc.write(out)


def report_for(sources: list[str], out=None) -> tuple[Path, Path]:
    """``build_report`` for paths or storage URIs: a stored study is read through this node's
    mirror; its report is written there and, unless ``out`` is given, published beside it."""
    local = [pull_results(s) if is_remote(s) else Path(s) for s in sources]
    html, md = build_report(local, out)
    if out is None and len(sources) == 1 and is_remote(sources[0]):
        publish_results(local[0], sources[0], REPORT_FILES)
    return html, md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+",
                        help="study folder(s), results.parquet or storage URIs (s3://…)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: RESULTS)")
    args = parser.parse_args(argv)
    try:
        html, md = report_for(args.results, args.out)
    except AtomsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {html}\nmarkdown: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
