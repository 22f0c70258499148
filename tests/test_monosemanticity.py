import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.monosemanticity import (
    export_jsonl,
    heuristic_judge,
    judge_units,
    run_harness,
    score_table,
    top_contexts,
)
from atoms.core.errors import InputError
from atoms.evaluate.units import UnitSet
from atoms.extract.shards import Manifest, write_manifest, write_shard
from atoms.sae.model import SAEConfig, build_sae
from atoms.sae.saelens import save_sae

D, DOCS, LEN, VOCAB, PLANT = 8, 20, 16, 20, 7
WORDS = [f" w{i}" for i in range(VOCAB)]
PLANTED = [(12, 1), (13, 6), (15, 9), (17, 15), (19, 4)]
"""(doc, position) of the only rows whose token is PLANT; neuron 0 fires strongly only there."""


def shard_folder(path):
    rng = np.random.default_rng(0)
    doc = np.repeat(np.arange(DOCS), LEN)
    pos = np.tile(np.arange(LEN), DOCS)
    tok = rng.choice([t for t in range(VOCAB) if t != PLANT], len(doc))
    acts = rng.normal(0, 1, (len(doc), D)).astype(np.float32)
    acts[:, 0] *= 0.3
    for i, (d, p) in enumerate(PLANTED):
        r = d * LEN + p
        tok[r], acts[r, 0] = PLANT, 5 + i
    path.mkdir(parents=True, exist_ok=True)
    half = len(doc) // 2
    infos = [write_shard(path, i, acts[s], tok[s], doc[s], pos[s])
             for i, s in enumerate([slice(0, half), slice(half, None)])]
    write_manifest(path, Manifest(model="test", revision="0", site="resid_post", layer=0,
                                  positions="all", d=D, dtype="float32", rows=len(doc),
                                  tokens_seen=len(doc), shards=infos, context_len=LEN,
                                  corpus="test", config={}))
    return path, tok


def neuron_zero(folder):
    """(doc_id, position, neuron 0's value) of every row."""
    from atoms.extract.shards import read_shard

    shards = [read_shard(p) for p in sorted(folder.glob("shard-*.parquet"))]
    return tuple(np.concatenate([s[c] for s in shards]) for c in ("doc_id", "position")) + (
        np.concatenate([s["activation"][:, 0] for s in shards]),)


def by_unit(records):
    out = {}
    for r in records:
        out.setdefault(r["unit"], []).append(r)
    return out


def test_planted_neuron_contexts_and_judge(tmp_path):
    folder, tok = shard_folder(tmp_path / "shards")
    recs = top_contexts(UnitSet.neurons(D), folder, WORDS, n_units=D, top_k=5, window=2)
    units = by_unit(recs)
    assert sorted(units) == list(range(D))
    zero = [r for r in units[0] if r["role"] != "negative"]
    assert {(r["doc_id"], r["position"]) for r in zero} == set(PLANTED)
    assert [r["rank"] for r in zero] == list(range(5))
    assert [r["role"] for r in zero] == ["explain", "detect"] * 2 + ["explain"]
    negatives = [r for r in units[0] if r["role"] == "negative"]
    assert len(negatives) == 2 and all(r["rank"] == -1 for r in negatives)
    acts = {(d, p): a for d, p, a in zip(*neuron_zero(folder), strict=True)}
    assert all(acts[(r["doc_id"], r["position"])] <= 0 for r in negatives)
    assert [r["activation"] for r in zero] == sorted((r["activation"] for r in zero), reverse=True)
    assert all(r["token"] == f" w{PLANT}" and f"«w{PLANT}»" in r["context"] for r in zero)
    ctx = {(r["doc_id"], r["position"]): r["context"] for r in zero}

    def w(d, p):
        return WORDS[tok[d * LEN + p]]

    assert ctx[(13, 6)] == f"…{w(13, 4)}{w(13, 5)} «w7»{w(13, 7)}{w(13, 8)} …"
    assert ctx[(12, 1)] == f"{w(12, 0)} «w7»{w(12, 2)}{w(12, 3)} …"  # document start: no '…'
    assert ctx[(17, 15)] == f"…{w(17, 13)}{w(17, 14)} «w7»"  # document end
    planted = heuristic_judge(zero)
    others = [heuristic_judge(units[u]) for u in range(1, D)]
    assert planted > 0.75
    assert max(others) < planted and planted - np.mean(others) > 0.4
    path = export_jsonl(recs, tmp_path / "out" / "contexts.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs


def test_max_rows_sampling_and_id_fallback(tmp_path):
    folder, _ = shard_folder(tmp_path / "shards")
    early = top_contexts(UnitSet.neurons(D), folder, None, n_units=1, top_k=3, max_rows=100,
                         seed=3)
    assert len({r["unit"] for r in early}) == 1
    assert all(r["doc_id"] < 100 // LEN + 1 for r in early)
    assert all("«⟨" in r["context"] and r["token"].startswith("⟨") for r in early)
    again = top_contexts(UnitSet.neurons(D), folder, None, n_units=1, top_k=3, max_rows=100,
                         seed=3)
    assert again == early
    decode = lambda ids: "".join(WORDS[i] for i in ids)  # noqa: E731
    zero = by_unit(top_contexts(UnitSet.neurons(D), folder, decode, n_units=D, top_k=5,
                                max_rows=100))[0]
    assert all(r["token"] != f" w{PLANT}" for r in zero)  # planted rows lie beyond row 100


def test_judge_interface_and_score_table():
    recs = [{"unit_set": s, "unit": u, "token": " a", "context": "x «a»"}
            for s in ("atoms", "neurons") for u in range(4) for _ in range(3)]
    values = {("atoms", 0): 0.2, ("atoms", 1): 0.4, ("atoms", 2): 0.9, ("atoms", 3): 0.5}

    def judge(unit_recs):
        key = (unit_recs[0]["unit_set"], unit_recs[0]["unit"])
        return values.get(key, 0.1)

    scores = judge_units(recs, judge)
    assert len(scores) == 8 and (scores["n_contexts"] == 3).all()
    assert (scores["judge"] == "judge").all()
    table = score_table(scores).set_index("unit_set")
    v = list(values.values())
    half = stats.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
    assert table.loc["atoms", "n_units"] == 4
    assert table.loc["atoms", "score_mean"] == pytest.approx(np.mean(v))
    assert table.loc["atoms", "score_lo"] == pytest.approx(np.mean(v) - half)
    assert table.loc["neurons", "score_hi"] == pytest.approx(0.1)
    with pytest.raises(InputError, match="not a number in") as e:
        judge_units(recs, lambda r: 1.5)
    assert "\n" not in str(e.value)


def test_run_harness_on_a_small_study(tmp_path):
    data, _ = shard_folder(tmp_path / "shards")
    sae = build_sae(SAEConfig(d_in=D, d_sae=16, kind="threshold"))
    ckpt = save_sae(sae, tmp_path / "study" / "trials" / "t" / "sae")
    base = {"model": "test", "site": "resid_post", "layer": 0, "status": "finished", "h": D,
            "data_folder": str(data), "seed": 0, "checkpoint_path": None, "objective": None}
    rows = [{**base, "family": "neurons", "unit_set": "neurons", "cell": "neurons",
             "d_sae": D, "d_sae_over_h": 1.0, "train_rows": None, "r2_euclid_centred": 1.0},
            {**base, "family": "random", "unit_set": "random", "cell": "random-D16-s0",
             "d_sae": 16, "d_sae_over_h": 2.0, "train_rows": None, "r2_euclid_centred": 0.0},
            {**base, "family": "tsae", "unit_set": "atoms", "cell": "tsae-D16-M64-s0",
             "d_sae": 16, "d_sae_over_h": 2.0, "train_rows": 64.0, "r2_euclid_centred": 0.5,
             "checkpoint_path": str(ckpt), "objective": 0.3}]
    study = tmp_path / "study"
    pd.DataFrame(rows).to_parquet(study / "results.parquet")
    (study / "study.json").write_text(json.dumps({"config": {"data": {"holdout_shards": 1}}}))
    out = run_harness(study, n_units=D, top_k=5, decode=WORDS)
    recs = [json.loads(line) for line in (out / "contexts.jsonl").read_text().splitlines()]
    assert {r["unit_set"] for r in recs} == {"neurons", "random", "atoms"}
    assert all(r["doc_id"] >= DOCS // 2 for r in recs)  # only the held-out (last) shard
    scores = pd.read_parquet(out / "scores.parquet")
    zero = scores[(scores["unit_set"] == "neurons") & (scores["unit"] == 0)]
    assert float(zero["score"].iloc[0]) > 0.75
    assert set(scores["judge"]) == {"heuristic_judge"}
    assert not math.isnan(scores.loc[scores["unit_set"] == "atoms", "train_rows"].iloc[0])
