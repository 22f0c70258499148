"""The monosemanticity harness: top-activating contexts of sampled units, judged per unit.

For each unit set, units are sampled among those with a positive activation in the rows read;
for each, the top_k largest activations are kept with the token they fired on and a decoded
context of ±window tokens from the same document window, the token marked «like this». A judge
(an LLM client wrapped as a callable, or the offline ``heuristic_judge``) scores each unit's
contexts in [0, 1]; ``score_table`` gives the mean and 95% interval over units per unit set.

``python -m analysis.monosemanticity <study folder> [--units N] [--top-k K] [--max-rows R]``
writes <study>/monosemanticity/contexts.jsonl and scores.parquet and prints the score table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.aggregate import ORDER, at_largest, best, interval_table, load_results
from analysis.summary import markdown
from atoms.core.errors import AtomsError, InputError
from atoms.core.io import atomic_path
from atoms.evaluate.units import UnitSet, load_unit_set
from atoms.extract.shards import ShardSet, is_shard_set, read_shard
from atoms.store.results import MONOSEMANTICITY, ResultStore, publish_results, pull_results
from atoms.store.storage import is_remote, locate

log = logging.getLogger(__name__)

MAX_ROWS = 4096
"""Rows read by ``run_harness`` unless told otherwise."""
ROLES = ("explain", "detect")
"""A unit's top contexts alternate by rank: even ranks are shown to the explainer, odd ranks
held out for detection (each matched by a ``negative`` context where the unit is 0)."""
NEGATIVE_POOL = 2048
BATCH = 1024
TOKEN_WEIGHT = 0.75
"""Weight of the marked-token agreement in ``heuristic_judge`` (the rest: lexical overlap)."""
OUT = MONOSEMANTICITY
KIND = {"tsae": "atoms", "relu": "features", "pretrained": "features"}


# ---------------------------------------------------------------------------- contexts


def _decoder(decode) -> Callable[[list[int]], str]:
    """ids ↦ text from a decode callable, a tokenizer, a per-id string table, or None (ids)."""
    if decode is None:
        return lambda ids: "".join(f"⟨{i}⟩" for i in ids)
    if hasattr(decode, "decode") and hasattr(decode, "convert_ids_to_tokens"):
        return lambda ids: decode.decode(list(ids))
    if callable(decode):
        return lambda ids: decode(list(ids))
    return lambda ids: "".join(decode[i] for i in ids)


def _paths(shards) -> list[Path]:
    if isinstance(shards, str | Path):
        folder = Path(shards)
        if not folder.is_dir():
            raise InputError(f"{folder}: shard folder not found")
        if is_shard_set(folder):
            return ShardSet.open(folder, verify=False).paths
        paths = sorted(folder.glob("shard-*.parquet"))
        if not paths:
            raise InputError(f"{folder}: no shard-*.parquet files")
        return paths
    return [Path(p) for p in shards]


def _read(paths: Sequence[Path], max_rows: int | None) -> tuple[list[dict], int]:
    """Whole shards until ``max_rows`` rows are covered; returns (shards, rows to encode).
    Shards of fact prompts (counterfact) also get each row's prompt (``prompt_ids``)."""
    out, have = [], 0
    prompts = _fact_prompts(paths[0].parent) if paths else None
    for path in paths:
        if max_rows is not None and have >= max_rows:
            break
        out.append(read_shard(path))
        if prompts is not None:
            out[-1]["prompt_ids"] = prompts(path, len(out[-1]["token_id"]))
        have += len(out[-1]["token_id"])
    return out, have if max_rows is None else min(have, max_rows)


def _fact_prompts(folder: Path):
    """For a shard folder of fact prompts: (shard path, rows) ↦ each row's unpadded prompt ids
    and how many lead ids (a BOS) the context leaves out, from the windows the extraction built
    (the corpus tokenised again, as it was); else None. Rows are their windows' kept positions
    in order, which is how the extraction wrote them."""
    if not (folder / "manifest.json").is_file():
        return None
    config = ShardSet.open(folder, verify=False).manifest.config
    if config.get("corpus_format") != "counterfact":
        return None
    from atoms.core.config import from_dict
    from atoms.extract.extraction import ExtractConfig, build_windows
    from atoms.extract.models import load_tokenizer

    cfg = from_dict(ExtractConfig, config)
    windows = build_windows(cfg, load_tokenizer(cfg.model, cfg.revision))

    def rows_of(path: Path, n: int) -> np.ndarray:
        part = windows.shard(int(path.stem.split("-")[1]), cfg.windows_per_shard)
        at = np.nonzero(part["keep"])[0]
        if len(at) != n:
            raise InputError(f"{path}: {n} rows but its windows keep {len(at)}; the corpus "
                             "changed since the extraction")
        out, bos = np.empty(n, dtype=object), int(cfg.prepend_bos)
        for i, w in enumerate(at):
            out[i] = (part["input_ids"][w, :part["lengths"][w]].tolist(), bos)
        return out

    return rows_of


def _top(unit_set: UnitSet, shards: list[dict], rows: int, k: int) -> tuple[torch.Tensor, ...]:
    """(values, global row indices), each (N, k): every unit's k largest codes in ``rows``."""
    if unit_set.encode is None:
        raise InputError(f"{unit_set.name}: the unit set has no encoder")
    n = unit_set.n
    vals, idx = torch.full((n, k), -math.inf), torch.full((n, k), -1, dtype=torch.long)
    offset = 0
    for shard in shards:
        acts = shard["activation"]
        take = min(len(acts), rows - offset)
        for start in range(0, take, BATCH):
            stop = min(start + BATCH, take)
            codes = unit_set.encode(torch.from_numpy(acts[start:stop]).float()).T
            rng = torch.arange(offset + start, offset + stop).expand(n, -1)
            vals, sel = torch.cat([vals, codes], 1).topk(k, dim=1)
            idx = torch.cat([idx, rng], 1).gather(1, sel)
        offset += len(acts)
        if offset >= rows:
            break
    return vals, idx


def _run(doc: np.ndarray, pos: np.ndarray, r: int, step: int, window: int) -> tuple[list, bool]:
    """Rows next to ``r`` (step ±1) in the same document window; and whether more follow."""
    out, j = [], r + step
    while 0 <= j < len(doc) and doc[j] == doc[r] and pos[j] - pos[r] == j - r:
        if len(out) == window:
            return out, True
        out.append(j)
        j += step
    return out, False


def _mark(text: str) -> str:
    lead, core, trail = re.match(r"(\s*)(.*?)(\s*)$", text, re.S).groups()
    return f"{lead}«{core or text}»{trail}"


def _context(cols: dict, r: int, window: int, dec) -> str:
    if "prompt_ids" in cols:  # a fact prompt: the prompt itself, the row's token marked
        ids, lead = cols["prompt_ids"][r]
        at = int(cols["position"][r])
        lead = start = min(lead, at)  # a BOS row shows its BOS
        for start in range(at, lead - 1, -1):  # the token's whole characters (byte pieces)
            if not dec(ids[lead:start]).endswith("\ufffd"):
                break
        text = dec(ids[lead:start]) + _mark(dec(ids[start:at + 1])) + dec(ids[at + 1:])
        return text.replace("\n", "⏎")
    left, more_left = _run(cols["doc_id"], cols["position"], r, -1, window)
    right, more_right = _run(cols["doc_id"], cols["position"], r, 1, window)
    tok = cols["token_id"]
    before, after = dec([int(tok[j]) for j in reversed(left)]), dec([int(tok[j]) for j in right])
    if more_left:
        before = ("…" if before[:1].isspace() else "… ") + before
    if more_right:
        after += "…" if after[-1:].isspace() else " …"
    return (before + _mark(dec([int(tok[r])])) + after).replace("\n", "⏎")


def _inactive(unit_set: UnitSet, shards: list[dict], rows: int, units: np.ndarray,
              rng: np.random.Generator, pool: int = NEGATIVE_POOL) -> dict[int, list[int]]:
    """Per unit, rows (in a seeded random order) of a sample of ``pool`` rows where its code
    is 0: the detection task's negatives."""
    picks = np.sort(rng.choice(rows, min(pool, rows), replace=False))
    acts = np.concatenate([s["activation"] for s in shards])[picks]
    codes = unit_set.encode(torch.from_numpy(acts).float())[:, torch.as_tensor(units)]
    order = rng.permutation(len(picks))
    return {int(u): [int(picks[i]) for i in order if codes[i, j] <= 0]
            for j, u in enumerate(units)}


def _contexts(unit_set: UnitSet, shards: list[dict], rows: int, dec, n_units: int, top_k: int,
              window: int, seed: int) -> list[dict]:
    vals, idx = _top(unit_set, shards, rows, top_k)
    names = ("token_id", "doc_id", "position", *(["prompt_ids"] if "prompt_ids" in shards[0]
                                                 else []))
    cols = {c: np.concatenate([s[c] for s in shards]) for c in names}
    live = torch.nonzero(vals[:, 0] > 0).flatten().numpy()
    rng = np.random.default_rng(seed)
    units = np.sort(rng.choice(live, min(n_units, len(live)), replace=False))
    inactive = _inactive(unit_set, shards, rows, units, rng) if len(units) else {}

    def record(u, rank, v, r, role):
        return {"unit_set": unit_set.name, "unit": int(u), "rank": rank, "role": role,
                "activation": float(v), "doc_id": int(cols["doc_id"][r]),
                "position": int(cols["position"][r]), "token_id": int(cols["token_id"][r]),
                "token": dec([int(cols["token_id"][r])]),
                "context": _context(cols, r, window, dec)}

    records = []
    for u in units:
        detect = 0
        for rank, (v, r) in enumerate(zip(vals[u].tolist(), idx[u].tolist(), strict=True)):
            if v <= 0 or r < 0:
                break
            role = ROLES[rank % 2]
            detect += role == "detect"
            records.append(record(u, rank, v, r, role))
        records += [record(u, -1, 0.0, r, "negative") for r in inactive[int(u)][:detect]]
    return records


def top_contexts(unit_set: UnitSet, shard_folder, decode, n_units: int = 16, top_k: int = 8,
                 window: int = 8, max_rows: int | None = None, seed: int = 0) -> list[dict]:
    """Top-activating contexts of ``n_units`` units of ``unit_set`` sampled (seeded) among those
    with a positive activation in the first ``max_rows`` rows of ``shard_folder`` (a shard folder
    or a list of shard files). Per unit its top_k positive activations, in rank order, as
    {unit_set, unit, rank, activation, doc_id, position, token_id, token, context}; the context
    holds ±window tokens of the same document window, the token marked «…», '…' where cut.
    ``decode``: ids ↦ str (a tokenizer's decode), a per-id string table, or None for ids."""
    shards, rows = _read(_paths(shard_folder), max_rows)
    return _contexts(unit_set, shards, rows, _decoder(decode), n_units, top_k, window, seed)


def export_jsonl(records: list[dict], path) -> Path:
    """One JSON object per line, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------- judging


def _norm(token: str) -> str:
    return " ".join(token.split()).lower()


def heuristic_judge(unit_records: list[dict]) -> float:
    """Offline score in [0, 1]: TOKEN_WEIGHT · s_tok + (1 − TOKEN_WEIGHT) · s_lex, where
    s_tok = (count of the most common marked token)/n, tokens lower-cased and whitespace-
    normalised, and s_lex = mean pairwise Jaccard similarity of the contexts' lower-case word
    sets (0 with one context); over the unit's active contexts (not its negatives)."""
    unit_records = [r for r in unit_records if r.get("role") != "negative"]
    if not unit_records:
        raise InputError("heuristic_judge: no records for this unit")
    n = len(unit_records)
    s_tok = Counter(_norm(r["token"]) for r in unit_records).most_common(1)[0][1] / n
    words = [set(re.findall(r"\w+", r["context"].lower())) for r in unit_records]
    pairs = [len(a & b) / len(a | b) if a | b else 1.0
             for a, b in itertools.combinations(words, 2)]
    s_lex = float(np.mean(pairs)) if pairs else 0.0
    return TOKEN_WEIGHT * s_tok + (1 - TOKEN_WEIGHT) * s_lex


def _judge_name(judge) -> str:
    return getattr(judge, "__name__", type(judge).__name__)


SCORE_COLUMNS = ["unit_set", "unit", "score", "n_contexts", "judge", "attempts",
                 "parse_failures"]


def judge_units(records: list[dict], judge: Callable[[list[dict]], float | dict],
                progress: bool = False) -> pd.DataFrame:
    """One row per (unit_set, unit): score = judge(that unit's records), in [0, 1]; columns
    unit_set, unit, score, n_contexts, judge, attempts, parse_failures. A judge returns a
    number, or a dict {score, attempts, parse_failures} (an LLM judge): its score may then be
    NaN, a unit whose answers all failed to parse or that had nothing to judge."""
    from tqdm.auto import tqdm

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["unit_set"], r["unit"]), []).append(r)
    name, rows = _judge_name(judge), []
    for (unit_set, unit), recs in tqdm(groups.items(), desc=f"judge {name}",
                                       disable=not progress):
        out = judge(recs)
        verdict = out if isinstance(out, dict) else {"score": out, "attempts": 1,
                                                     "parse_failures": 0}
        try:
            score = float(verdict["score"])
        except (TypeError, ValueError):
            score = math.inf
        unparsed = math.isnan(score) and (verdict["parse_failures"] > 0
                                          or verdict["attempts"] == 0)
        if not (0.0 <= score <= 1.0 or unparsed):
            raise InputError(f"judge {name}: unit {unit} of {unit_set}: score "
                             f"{verdict['score']!r} is not a number in [0, 1]")
        rows.append({"unit_set": unit_set, "unit": unit, "score": score,
                     "n_contexts": len(recs), "judge": name,
                     "attempts": int(verdict["attempts"]),
                     "parse_failures": int(verdict["parse_failures"])})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def score_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per unit set (and judge): n_units, score_mean, score_lo, score_hi (95% t over the units
    with a score) and parse_failure_fraction (failed / attempted answers)."""
    by = ["unit_set", "judge"] if "judge" in scores else ["unit_set"]
    table = interval_table(scores, by, ["score"]).rename(columns={"n_seeds": "n_units"})
    if "parse_failures" in scores:
        sums = scores.groupby(by, dropna=False, sort=True)[["parse_failures", "attempts"]].sum()
        fraction = (sums["parse_failures"] / sums["attempts"]).rename("parse_failure_fraction")
        table = table.merge(fraction.reset_index(), on=by, how="left")
    return table


# ---------------------------------------------------------------------------- study harness


def _holdout(study: Path) -> int:
    try:
        cfg = json.loads((study / "study.json").read_text())["config"]
        return int(cfg["data"]["holdout_shards"])
    except (OSError, KeyError, TypeError, ValueError):
        return 1


def _unit_sets(b: pd.DataFrame, study: Path) -> list[tuple[UnitSet, pd.Series]]:
    """Every unit set of the study at its largest |D| (then |M|), the lowest seed of each:
    neurons; random; exemplars from their stored directions (codes: projections); atoms,
    features (ReLU, TopK, centred-whitening JumpReLU) and pretrained SAEs from their
    checkpoints."""
    out = []
    families = sorted(b["family"].dropna().unique(), key=lambda f: (ORDER.get(f, len(ORDER)), f))
    for fam in families:
        rows = b[b["family"] == fam]
        for name in rows["unit_set"].unique():
            pick = at_largest(rows[rows["unit_set"] == name])
            row = pick.sort_values("seed").iloc[0] if "seed" in pick else pick.iloc[0]
            h = int(row["h"])
            if fam == "neurons":
                out.append((UnitSet.neurons(h, name), row))
            elif fam == "random":
                out.append((UnitSet.random(h, int(row["d_sae"]), int(row.get("seed", 0)),
                                           name), row))
            elif fam == "exemplar":
                dirs = ResultStore(study).read_units(row["trial_key"], name)
                out.append((UnitSet.projections(name, "exemplar", dirs, row.get("unit_source")
                                                or ""), row))
            else:
                path = row.get("checkpoint_path")
                if not isinstance(path, str) or not locate(path).exists():
                    log.warning("%s: checkpoint %s not found; skipping it", name, path)
                    continue
                kind = row.get("unit_kind") or KIND.get(fam, "features")
                out.append((load_unit_set(str(locate(path)), kind, name), row))
    return out


def _tokenizer(model):
    from atoms.extract.models import load_tokenizer

    try:
        return load_tokenizer(str(model))
    except Exception as e:  # noqa: BLE001 -- any failure falls back to showing token ids
        log.warning("tokenizer of %s not available (%s); showing token ids", model,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def run_harness(study_folder, n_units: int = 16, top_k: int = 8, judge=None, *,
                window: int = 8, max_rows: int | None = MAX_ROWS, seed: int = 0,
                decode=None, progress: bool = False) -> Path:
    """Contexts and judge scores for a study's unit sets on its held-out shards (the last
    ``data.holdout_shards`` of its data folder, first ``max_rows`` rows). Writes
    <study>/monosemanticity/contexts.jsonl and scores.parquet; returns that folder.
    ``decode`` defaults to the study model's tokenizer (token ids when it cannot be loaded).
    ``judge``: a callable (default ``heuristic_judge``) or an ``analysis.judges`` judge, whose
    prompts and raw answers go to judgements.jsonl."""
    study = Path(study_folder)
    b = best(load_results(study))
    picks = _unit_sets(b, study)
    if not picks:
        raise InputError(f"{study}: no unit sets to inspect")
    if decode is None:
        decode = _tokenizer(b["model"].dropna().iloc[0]) if b["model"].notna().any() else None
    dec, holdout, cache = _decoder(decode), _holdout(study), {}
    records, meta = [], []
    for units, row in picks:
        data = row.get("data_folder")
        if not isinstance(data, str) or not locate(data).is_dir():
            raise InputError(f"{study}: data_folder {data!r} of {units.name} not found")
        if data not in cache:
            paths = _paths(locate(data))
            cache[data] = _read(paths[-min(holdout, len(paths)):], max_rows)
        records += _contexts(units, *cache[data], dec, n_units, top_k, window, seed)
        meta.append({"unit_set": units.name, **{c: row.get(c) for c in
                     ("family", "trial_key", "d_sae", "d_sae_over_h", "train_rows")}})
    out = study / OUT
    judge = judge or heuristic_judge
    scores = judge_units(records, judge, progress).merge(
        pd.DataFrame(meta), on="unit_set", how="left")
    export_jsonl(records, out / "contexts.jsonl")
    log = getattr(judge, "log", None)
    if log is not None:  # prompts, raw answers and parse failures beside the scores
        export_jsonl(log, out / "judgements.jsonl")
    else:
        (out / "judgements.jsonl").unlink(missing_ok=True)
    with atomic_path(out / "scores.parquet") as tmp:
        scores.to_parquet(tmp, index=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study folder (results.parquet or rows/) or its URI")
    parser.add_argument("--units", type=int, default=16, help="units sampled per unit set")
    parser.add_argument("--top-k", type=int, default=8, help="contexts per unit")
    parser.add_argument("--max-rows", type=int, default=MAX_ROWS, help="held-out rows read")
    parser.add_argument("--judge", default="heuristic",
                        help="heuristic (offline), hf:<model> (e.g. hf:smollm2-135m) or "
                             "openai:<model>")
    parser.add_argument("--judge-url", default=None, help="openai: the endpoint's base URL")
    parser.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                        help="openai: the environment variable holding the key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        from analysis.judges import make_judge

        judge = make_judge(args.judge, args.judge_url, args.judge_key_env)
        study = pull_results(args.study) if is_remote(args.study) else Path(args.study)
        out = run_harness(study, args.units, args.top_k, judge, max_rows=args.max_rows,
                          progress=True)
        if is_remote(args.study):
            publish_results(study, args.study, (OUT,))
    except AtomsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(score_table(pd.read_parquet(out / "scores.parquet"))))
    print(f"\nwrote {out / 'contexts.jsonl'} and {out / 'scores.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
