"""CounterFact as a corpus: records, subject spans, subject-last-token rows against a direct
forward on every tiny layout, the skip counts and the one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atoms.core.errors import ConfigError, InputError
from atoms.extract.counterfact import fact_prompts, prompt_windows, subject_last_token
from atoms.extract.extraction import ExtractConfig, ShardExtractor, build_windows
from atoms.extract.models import TINY_LAYOUTS, load_model
from atoms.extract.shards import layer_folder, read_shard, shard_name

RELATIONS = {"P103": "The mother tongue of {} is", "P176": "{} is produced by",
             "P19": "{} was born in", "P37": "In {}, an official language is"}
SUBJECTS = ["Danielle Darrieux", "Toyota Corolla", "Zoë Kravitz", "Paris", "Pyt",
            "The mo", "operat", "Edwin of Northumbria", "pydoc", "Naïve Café"]


def record(i: int) -> dict:
    relation = sorted(RELATIONS)[i % len(RELATIONS)]
    subject = SUBJECTS[i % len(SUBJECTS)]
    suffix = {"Pyt": "hon", "The mo": "dule", "operat": "ors"}.get(subject, "")
    template = RELATIONS[relation].replace("{}", "{}" + suffix)
    return {"case_id": 1000 + i,
            "requested_rewrite": {"prompt": template, "subject": subject,
                                  "relation_id": relation,
                                  "target_true": {"str": "French", "id": "Q150"},
                                  "target_new": {"str": "English", "id": "Q1860"}},
            "paraphrase_prompts": [f"{subject}, {subject} again: {subject}{suffix} is",
                                   f"Something else. {subject}'s home is"],
            "neighborhood_prompts": ["The native language of Léon Blum is"]}


@pytest.fixture
def counterfact(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([record(i) for i in range(36)]))
    return path


def test_records_and_subject_spans(counterfact):
    prompts = list(fact_prompts(str(counterfact), ["rewrite", "paraphrase", "neighborhood"]))
    assert len(prompts) == 36 * 4
    assert {p.record_id for p in prompts} == set(range(1000, 1036))
    for p in prompts:
        if p.field == "neighborhood":
            assert p.subject is None
            continue
        subject = record(p.record_id - 1000)["requested_rewrite"]["subject"]
        assert p.text[slice(*p.subject)] == subject
        if p.field == "paraphrase":  # the last of repeated occurrences
            assert p.text.find(subject, p.subject[0] + 1) < 0
    starts = [p for p in prompts if p.field == "rewrite" and p.subject[0] == 0]
    assert starts  # subjects that start the prompt


def test_jsonl_and_hub_free_local_names(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(record(i)) for i in range(3)) + "\n")
    assert [p.text for p in fact_prompts(str(path))][0] == "The mother tongue of Danielle " \
        "Darrieux is"
    with pytest.raises(InputError, match="no such file"):
        list(fact_prompts(str(tmp_path / "missing.json")))


@pytest.mark.parametrize("layout", sorted(TINY_LAYOUTS))
def test_subject_last_rows_equal_a_direct_forward(counterfact, tmp_path, layout):
    cfg = ExtractConfig(model=layout, corpus=str(counterfact), corpus_format="counterfact",
                        counterfact_prompts=["rewrite", "paraphrase", "neighborhood"],
                        positions="subject_last", sites=["resid_post"], layers=[1],
                        context_len=64, max_tokens=10**6, windows_per_shard=200,
                        batch_windows=7, out=str(tmp_path / "acts"))
    extractor = ShardExtractor(cfg)
    tok, model = extractor.loaded.tokenizer, extractor.loaded.model
    windows = build_windows(cfg, tok)
    assert windows.selection == {"prompts": 36 * 3, "no_subject": 36}
    extractor.write(0, **windows.shard(0, cfg.windows_per_shard))
    folder = layer_folder(cfg.out, "resid_post", 1)
    shard = read_shard(folder / shard_name(0))
    assert len(shard["activation"]) == 36 * 3
    assert set(shard["doc_id"]) == set(range(1000, 1036))
    prompts = [p for p in fact_prompts(str(counterfact), cfg.counterfact_prompts)
               if p.subject is not None]
    extends = 0
    for row, p in enumerate(prompts):
        ids = [tok.bos_token_id, *tok(p.text, add_special_tokens=False)["input_ids"]]
        at = int(shard["position"][row])
        # the tokens up to `at` spell the text through the subject's end; one fewer do not
        upto = p.text[:p.subject[1]]
        assert tok.decode(ids[1:at + 1]).startswith(upto)
        assert not tok.decode(ids[1:at]).startswith(upto)
        extends += len(tok.decode(ids[1:at + 1])) > p.subject[1]
        assert shard["token_id"][row] == ids[at]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        direct = hidden.hidden_states[2][0, at].numpy()
        np.testing.assert_allclose(shard["activation"][row], direct, rtol=1e-4, atol=1e-5)
    assert extends  # some subject ends inside a token merged with the next characters


def test_positions_last_all_and_no_bos_skip_the_padding(counterfact):
    tok = load_model("tiny-random").tokenizer
    prompts = list(fact_prompts(str(counterfact)))
    lengths = [1 + len(tok(p.text, add_special_tokens=False)["input_ids"]) for p in prompts]
    last = prompt_windows(prompts, tok, "last", 64)
    assert [int(np.flatnonzero(k)[0]) for k in last.keep] == [n - 1 for n in lengths]
    assert prompt_windows(prompts, tok, "all", 64).keep.sum() == sum(lengths)
    assert prompt_windows(prompts, tok, "no_bos", 64).keep.sum() == sum(lengths) - len(prompts)
    short = prompt_windows(prompts, tok, "all", 12)
    assert short.counts["too_long"] == sum(n > 12 for n in lengths) > 0
    assert short.counts["prompts"] == sum(n <= 12 for n in lengths)
    capped = prompt_windows(prompts, tok, "all", 64, max_tokens=50)
    assert capped.lengths.sum() >= 50 > capped.lengths[:-1].sum()


def test_subject_last_token_offsets():
    offsets = [(0, 1), (1, 3), (3, 3), (3, 5), (5, 9)]
    assert subject_last_token(offsets, (0, 2)) == 1  # 'a' ends inside the token (1, 3)
    assert subject_last_token(offsets, (0, 5)) == 3
    assert subject_last_token([(0, 2), (2, 3), (2, 3)], (0, 3)) == 2  # bytes of one character
    assert subject_last_token([(0, 2), (3, 5)], (0, 3)) is None


def test_bad_records_are_one_line_each(tmp_path):
    def bad(rec, match):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps([record(0), rec]))
        with pytest.raises(InputError, match=match) as e:
            list(fact_prompts(str(path)))
        assert "\n" not in str(e.value) and "record 1" in str(e.value)

    no_subject = record(1)
    del no_subject["requested_rewrite"]["subject"]
    bad(no_subject, "requested_rewrite has no 'subject'")
    absent = record(2)
    absent["requested_rewrite"]["prompt"] = "Nothing to fill in"
    bad(absent, "is not in its prompt")
    bad({"prompt": "x"}, "no 'requested_rewrite'")
    with pytest.raises(ConfigError, match="subject_last needs corpus_format"):
        ExtractConfig(positions="subject_last")
    with pytest.raises(InputError, match="not a prompt field"):
        ExtractConfig(corpus_format="counterfact", counterfact_prompts=["questions"])


def test_a_bad_record_leaves_nothing_behind(tmp_path):
    from atoms.extract.ray_extract import run_extraction

    path = tmp_path / "cf.json"
    broken = record(3)
    broken["requested_rewrite"]["prompt"] = "Nobody is named here"
    path.write_text(json.dumps([record(0), broken]))
    cfg = ExtractConfig(model="tiny-random", corpus=str(path), corpus_format="counterfact",
                        positions="subject_last", layers=[1], out=str(tmp_path / "acts"))
    with pytest.raises(InputError, match="record 1: subject 'Paris' is not in"):
        run_extraction(cfg, progress=False)
    assert not (tmp_path / "acts").exists()


def test_paper_configs_load():
    from atoms.core.config import load_yaml
    from atoms.study.config import StudyConfig

    root = Path(__file__).parents[1] / "experiments" / "configs" / "scaling"
    paper = load_yaml(StudyConfig, root / "paper-gemma2-2b.yaml")
    ex, aip = paper.data.extract, paper.data.aip
    assert (ex.corpus, ex.corpus_format, ex.positions) == ("azhx/counterfact", "counterfact",
                                                           "subject_last")
    assert (aip.source.model, aip.source.layers, aip.source.max_documents) == (
        "google/gemma-2-2b", [12], 100_000)
    assert aip.exclude == ["bos", "sinks"] and 4 in paper.grid.d_sae_over_h
    twin = load_yaml(StudyConfig, root / "paper-smollm2-135m.yaml")
    assert twin.data.extract.corpus == "counterfact-sample"
    assert twin.monosemanticity.judge == "hf:smollm2-135m"
    from atoms.extract.models import load_tokenizer

    ex = twin.data.extract  # the twin's rows fit its grid and held-out sizes
    n = len(build_windows(ex, load_tokenizer(ex.model)).input_ids)
    held = n - (-(-n // ex.windows_per_shard) - twin.data.holdout_shards) * ex.windows_per_shard
    assert n == 600 and max(twin.grid.train_rows) <= n - held
    assert twin.data.validation_rows + twin.data.test_rows <= held


def test_ray_extraction_records_the_selection(counterfact, tmp_path, ray_session):
    from atoms.extract.ray_extract import run_extraction
    from atoms.extract.shards import ShardSet

    cfg = ExtractConfig(model="tiny-random-gpt2", corpus=str(counterfact),
                        corpus_format="counterfact",
                        counterfact_prompts=["rewrite", "neighborhood"], positions="subject_last",
                        sites=["resid_post"], layers=[2], context_len=64, max_tokens=10**6,
                        windows_per_shard=20, out=str(tmp_path / "acts"))
    run_extraction(cfg, progress=False)
    shards = ShardSet.open(layer_folder(cfg.out, "resid_post", 2))
    assert shards.manifest.selection == {"prompts": 36, "no_subject": 36}
    assert shards.manifest.rows == 36 and len(shards.paths) == 2  # 36 windows, 20 a shard
    extractor = ShardExtractor(cfg)
    windows = build_windows(cfg, extractor.loaded.tokenizer)
    direct = ExtractConfig(**{**cfg.__dict__, "out": str(tmp_path / "direct")})
    extractor = ShardExtractor(direct)
    for i in range(2):
        extractor.write(i, **windows.shard(i, cfg.windows_per_shard))
    got = shards.read_all()
    want = np.concatenate([read_shard(layer_folder(direct.out, "resid_post", 2) / shard_name(i))
                           ["activation"] for i in range(2)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # the harness shows a fact row in its prompt, the subject's last token marked
    from analysis.monosemanticity import top_contexts
    from atoms.evaluate.units import UnitSet

    tok = extractor.loaded.tokenizer
    texts = {p.text for p in fact_prompts(str(counterfact))}
    records = top_contexts(UnitSet.neurons(64), layer_folder(cfg.out, "resid_post", 2), tok,
                           n_units=3, top_k=4)
    assert records
    for r in records:
        assert r["context"].replace("«", "").replace("»", "") in texts
        assert r["context"].count("«") == 1
