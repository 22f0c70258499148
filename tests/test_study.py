"""The scaling study without Ray: config checks, the trial plan, trials in-process, resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.summary import best_per_cell, r2_grid, summarise, transitions
from atoms.aip.metric import AIP, SecondMoment, save_aip
from atoms.core.cli import run
from atoms.core.config import from_dict
from atoms.core.errors import ConfigError
from atoms.extract.shards import ShardSet
from atoms.store.results import ResultStore
from atoms.study.config import StudyConfig
from atoms.study.plan import cells, pending_trials, planned_split
from atoms.study.ray_sweep import make_searcher
from atoms.study.setup import context
from atoms.study.trial import execute_trial
from atoms.train.batches import read_rows
from experiments import scaling
from tests.faults import NaNAt
from tests.shardsets import synthetic_shard_set

TINY = Path("experiments/configs/scaling/tiny-random.yaml")


def study_dict(folder: Path, out: Path, **over) -> dict:
    base = {
        "name": "t", "out": str(out),
        "data": {"shards": str(folder), "holdout_shards": 1, "validation_rows": 512,
                 "test_rows": 512},
        "grid": {"d_sae_over_h": [1, 2], "train_rows": [1024, 4096], "seeds": [0]},
        "sparsity": {"search": "grid", "sparsity_coeff": [1e-3]},
        "sae": {"bandwidth": 0.05, "init_threshold": 0.05},
        "train": {"steps": 20, "batch_size": 256, "lr_warmup_steps": 2,
                  "sparsity_warmup_steps": 5},
        "baselines": {"relu_sparsity_coeff": [1e-3]},
        "eval": {"sparsity_rows": 512, "local_rows": 64, "recovery_rows": 2, "random_k": 3},
        "execution": {"cpus_per_trial": 1},
        "checkpoint_every": 10,
    }
    for key, value in over.items():
        section, _, field = key.partition(".")
        if field:
            base[section] = {**base.get(section, {}), field: value}
        else:
            base[section] = value
    return base


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """6 shards × 2048 rows of sparse synthetic codes (d = 32), with S̃ beside them."""
    folder = synthetic_shard_set(tmp_path_factory.mktemp("acts") / "layer", rows=12288)
    s = ShardSet.open(folder)
    x = read_rows(s.paths, s.d, 12288)
    save_aip(AIP.from_moment(SecondMoment(s.d).update(x)), folder / "aip.safetensors")
    return folder


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(path: Path, capsys) -> tuple[int, str]:
    code = run(scaling.main, ["--config", str(path), "--quiet"])
    return code, capsys.readouterr().err.strip()


# -- bad input: one line, before any work --------------------------------------------------
def test_unknown_key_fails_before_work(tmp_path, shards, capsys):
    data = study_dict(shards, tmp_path / "out")
    data["grid"]["capacity"] = [1]
    code, err = run_cli(write_config(tmp_path, data), capsys)
    assert code == 2 and err.count("\n") == 0
    assert "grid.capacity: unknown field" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", [
    "", "data", "data.extract", "grid", "sparsity", "sae", "train", "baselines",
    "baselines.pretrained[0]", "eval", "execution"])
def test_a_misspelt_key_anywhere_fails_before_ray_or_work(tmp_path, shards, capsys, monkeypatch,
                                                          where):
    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(scaling, "ensure_ray", no_ray)
    data = study_dict(shards, tmp_path / "out", **{
        "baselines.pretrained": [{"name": "p", "path": str(shards)}],
        "data.extract": {"model": "tiny-random"}})
    node = data
    for part in filter(None, where.replace("[0]", ".0").split(".")):
        node = node[int(part)] if part.isdigit() else node[part]
    node["nmae"] = 1
    code, err = run_cli(write_config(tmp_path, data), capsys)
    key = f"{where}.nmae" if where else "nmae"
    assert code == 2 and err.count("\n") == 0 and f"{key}: unknown field" in err, err
    assert "study.yaml" in err and not (tmp_path / "out").exists()


def test_help_lists_every_config_field_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as done:
        scaling.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for line in ("  sparsity.sparsity_coeff_range ([1e-05, 0.01]): Optuna: λ log-uniform",
                 "  grid.d_sae_over_h ([0.5, 1.0, 2.0, 4.0]): Dictionary sizes |D| as multiples",
                 "  sae.bandwidth (0.05): Rectangle-kernel STE width",
                 "  baselines.pretrained.path (required): Any layout"):
        assert line in text, line


def test_empty_grid_fails_before_work(tmp_path, shards, capsys):
    code, err = run_cli(write_config(tmp_path, study_dict(shards, tmp_path / "out",
                                                          **{"grid.train_rows": []})), capsys)
    assert code == 2 and "grid.train_rows: is empty" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_too_much_data_fails_before_work(tmp_path, shards, capsys):
    data = study_dict(shards, tmp_path / "out", **{"grid.train_rows": [1024, 20000]})
    code, err = run_cli(write_config(tmp_path, data), capsys)
    assert code == 2 and "\n" not in err
    assert "|M| = 20000" in err and "10240 training rows" in err
    assert not (tmp_path / "out").exists()


def test_too_much_data_for_a_pending_extraction_fails_before_extracting(tmp_path, capsys):
    data = yaml.safe_load(TINY.read_text())
    data["out"] = str(tmp_path / "out")
    data["data"]["extract"]["out"] = str(tmp_path / "acts")
    data["grid"]["train_rows"] = [256, 5000]
    code, err = run_cli(write_config(tmp_path, data), capsys)
    assert code == 2 and "|M| = 5000" in err and "\n" not in err
    assert not (tmp_path / "acts").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"layers": [99]}, "layer 99 out of range: tiny-random has"),
    ({"model": "atoms-test/no-such-model"}, "model 'atoms-test/no-such-model' is not available"),
])
def test_a_bad_model_or_layer_fails_before_ray_or_extraction(tmp_path, capsys, monkeypatch,
                                                             change, message):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(scaling, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    data = yaml.safe_load(TINY.read_text())
    data["out"], data["data"]["extract"]["out"] = str(tmp_path / "out"), str(tmp_path / "acts")
    data["data"]["extract"].update(change)
    code, err = run_cli(write_config(tmp_path, data), capsys)
    assert code == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "acts").exists() and not (tmp_path / "out").exists()


def test_an_empty_grid_names_its_field_once(tmp_path, shards, capsys):
    data = study_dict(shards, tmp_path / "out", **{"grid.d_sae_over_h": []})
    code, err = run_cli(write_config(tmp_path, data), capsys)
    assert code == 2 and "grid.d_sae_over_h: is empty" in err and "grid.grid" not in err


def test_planned_split_of_the_tiny_config():
    cfg = from_dict(StudyConfig, yaml.safe_load(TINY.read_text()))
    # 80 windows of 16 tokens, 15 rows each (BOS dropped), 10 windows per shard, 3 held out
    assert planned_split(cfg) == (50 * 15, 30 * 15)


# -- the plan --------------------------------------------------------------------------------
def test_cells_cover_the_grid_with_unique_keys():
    cfg = from_dict(StudyConfig, {"grid": {"d_sae_over_h": [0.5, 1, 2], "train_rows": [100, 200],
                                           "seeds": [0, 1]},
                                  "sparsity": {"search": "optuna", "samples": 3}})
    plan = cells(cfg, h=64)
    trials = [t for ts in plan.values() for t in ts]
    assert len({t.key for t in trials}) == len(trials)
    tsae = [t for t in trials if t.family == "tsae"]
    assert len(tsae) == 3 * 2 * 2 * 3 and all(t.sparsity_coeff is None for t in tsae)
    assert {t.d_sae for t in tsae} == {32, 64, 128}
    relu = [t for t in trials if t.family == "relu"]
    assert {t.train_rows for t in relu} == {200} and len(relu) == 3 * 2
    assert sum(t.family == "random" for t in trials) == 3 * 2
    assert sum(t.family == "neurons" for t in trials) == 1
    cfg.baselines.relu_search = "optuna"
    relu = [t for ts in cells(cfg, h=64).values() for t in ts if t.family == "relu"]
    assert len(relu) == 3 * 2 * 3 and all(t.sparsity_coeff is None for t in relu)


def test_searcher_hands_out_every_trial_once_then_finishes():
    from ray.tune.search import Searcher

    cfg = from_dict(StudyConfig, {"grid": {"d_sae_over_h": [1, 2], "train_rows": [100, 400]},
                                  "sparsity": {"search": "optuna", "samples": 3,
                                               "sparsity_coeff_range": [1e-4, 1e-2]},
                                  "baselines": {"relu_search": "optuna",
                                                "relu_sparsity_coeff_range": [0.05, 0.5]}})
    plan = cells(cfg, h=8)
    done = {"tsae-D8-M100-s0": [(5e-3, 0.4)]}
    pending = {c: ts[1:] if c in done else ts for c, ts in plan.items()}
    searcher = make_searcher(pending, cfg, done)
    keys, first = [], None
    for i in range(100):
        got = searcher.suggest(f"t{i}")
        if got is Searcher.FINISHED:
            break
        trial = got["trial"]
        keys.append(trial["key"])
        first = first or trial["key"]
        if trial["family"] == "tsae":
            assert 1e-4 <= trial["sparsity_coeff"] <= 1e-2
        if trial["family"] == "relu":
            assert 0.05 <= trial["sparsity_coeff"] <= 0.5
        if trial["family"] in ("tsae", "relu"):
            searcher.on_trial_complete(f"t{i}", {"objective": trial["sparsity_coeff"]})
    assert sorted(keys) == sorted(t.key for ts in pending.values() for t in ts)
    assert first.startswith("tsae-D16-M400")  # costliest cell first


# -- trials in this process ------------------------------------------------------------------
def context_for(tmp_path, shards, **over):
    cfg = from_dict(StudyConfig, study_dict(shards, tmp_path / "out", **over))
    cfg.out = str(Path(cfg.out).resolve())
    return context(cfg, shards, shards / "aip.safetensors")


def test_trials_write_one_row_per_unit_set_and_resume(tmp_path, shards):
    ctx = context_for(tmp_path, shards)
    plan = cells(ctx.cfg, ctx.h)
    store = ResultStore(ctx.out)
    atoms = plan["tsae-D64-M4096-s0"][0]
    result = execute_trial(ctx, atoms)
    assert result["status"] == "finished" and result["rows"] == 1
    row = store.finished()[atoms.key].iloc[0]
    assert row["unit_set"] == "atoms" and row["train_rows_used"] == 4096
    assert row["d_sae_over_h"] == 2 and 0 < row["r2_euclid_centred"] <= 1
    assert row["epochs"] == pytest.approx(20 * 256 / 4096)
    assert Path(row["checkpoint_path"], "cfg.json").exists()
    for key in ("q_star_pairwise", "uniqueness_pct", "rip_bound", "train_r2_euclid_centred",
                "objective", "code_version", "study_config"):
        assert key in row.index and not pd.isna(row[key]), key
    # a rerun of a finished trial reuses the finished run folder
    mtime = (Path(row["checkpoint_path"]) / "cfg.json").stat().st_mtime_ns
    execute_trial(ctx, atoms)
    assert (Path(row["checkpoint_path"]) / "cfg.json").stat().st_mtime_ns == mtime
    # the same key with another λ (an Optuna sample that came back different) starts afresh
    other = dataclasses.replace(atoms, sparsity_coeff=5e-3)
    execute_trial(ctx, other)
    assert (Path(row["checkpoint_path"]) / "cfg.json").stat().st_mtime_ns != mtime
    assert store.finished()[atoms.key]["sparsity_coeff"].iloc[0] == 5e-3
    for trial in (plan["neurons"][0], plan["random-D32-s0"][0]):
        execute_trial(ctx, trial)
    pending, _, total = pending_trials(ctx.cfg, ctx.h, store)
    assert total == sum(len(v) for v in plan.values())
    left = {t.key for ts in pending.values() for t in ts}
    assert atoms.key not in left and "neurons" not in left and len(left) == total - 3
    table = pd.read_parquet(store.write_table()[0])
    assert len(table) == 3 and table["trial_key"].is_unique


def test_an_imported_sae_is_judged_as_features(tmp_path, shards):
    from atoms.sae.model import SAEConfig, ThresholdSAE
    from atoms.sae.saelens import save_sae

    path = save_sae(ThresholdSAE(SAEConfig(d_in=32, d_sae=48)), tmp_path / "imported")
    ctx = context_for(tmp_path, shards, **{"baselines.pretrained": [
        {"name": "imported", "path": str(path)}]})
    trial = cells(ctx.cfg, ctx.h)["pretrained-imported"][0]
    assert execute_trial(ctx, trial)["status"] == "finished"
    row = ResultStore(ctx.out).finished()[trial.key].iloc[0]
    assert (row["unit_set"], row["unit_kind"], row["n_units"]) == ("imported", "features", 48)
    assert row["unit_source"].startswith("saelens:") and pd.notna(row["r2_euclid_centred"])


def test_a_missing_pretrained_sae_fails_before_work(tmp_path, shards, capsys):
    data = study_dict(shards, tmp_path / "out", **{"baselines.pretrained": [
        {"name": "gone", "path": str(tmp_path / "nowhere")}]})
    code, err = run_cli(write_config(tmp_path, data), capsys)
    assert code == 2 and "baselines.pretrained" in err and "nowhere" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_diverging_trial_leaves_a_diverged_row(tmp_path, shards, monkeypatch):
    import atoms.study.trial

    real = atoms.study.trial.train_local
    monkeypatch.setattr(atoms.study.trial, "train_local", lambda *a, **k: real(
        *a, **k, hooks=[NaNAt(5)]))  # a NaN in W_enc after step 5
    ctx = context_for(tmp_path, shards)
    trial = cells(ctx.cfg, ctx.h)["tsae-D32-M1024-s0"][0]
    result = execute_trial(ctx, trial)
    row = ResultStore(ctx.out).finished()[trial.key].iloc[0]
    assert result["status"] == row["status"] == "diverged"
    assert "non-finite" in row["message"]


# -- the summary -----------------------------------------------------------------------------
def planted(jump_at: dict[int, float]) -> pd.DataFrame:
    """Atoms rows with R² 0.7 below the planted |D|/H of each |M| and 0.99 from it on."""
    rows = []
    for m, at in jump_at.items():
        for d in (1, 2, 3, 4, 5):
            rows.append({"cell": f"tsae-D{d}-M{m}", "trial_key": f"k{d}-{m}", "family": "tsae",
                         "unit_set": "atoms", "status": "finished", "objective": 0.1,
                         "train_rows": m, "d_sae_over_h": float(d),
                         "r2_euclid_centred": 0.99 if d >= at else 0.7,
                         "train_r2_euclid_centred": 0.99, "l0_mean": 10.0,
                         "q_star_pairwise": 0.9})
    return pd.DataFrame(rows)


def test_transitions_find_a_planted_jump_and_report_none_without_one(tmp_path):
    steps = transitions(r2_grid(best_per_cell(planted({1000: 2, 10000: 4}))))
    assert steps["jump"].tolist() == [True, True]
    assert steps["at_d_over_h"].tolist() == [2.0, 4.0]
    flat = planted({1000: 99})
    assert not transitions(r2_grid(best_per_cell(flat)))["jump"].any()
    text = summarise(flat, tmp_path).read_text()
    assert "|M| = 1000: no jump" in text


def test_best_per_cell_keeps_the_lowest_objective():
    t = planted({1000: 2})
    extra = t.iloc[[0]].assign(objective=0.05, r2_euclid_centred=0.5, trial_key="better")
    best = best_per_cell(pd.concat([t, extra]))
    assert best.loc[best["cell"] == "tsae-D1-M1000", "trial_key"].item() == "better"


@pytest.mark.parametrize("path", sorted(Path("experiments/configs/scaling").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_study_config_loads_and_plans(path):
    cfg = from_dict(StudyConfig, yaml.safe_load(path.read_text()))
    plan = cells(cfg, h=576)
    assert sum(len(v) for v in plan.values()) >= 4
    planned = planned_split(cfg)
    if planned is None:  # fact prompts: only the extraction knows the rows (test_counterfact)
        assert cfg.data.extract.corpus_format == "counterfact"
        return
    train, held = planned
    assert max(cfg.grid.train_rows) <= train
    assert cfg.data.validation_rows + cfg.data.test_rows <= held


def test_config_rejects_fields_the_study_sets():
    with pytest.raises(ConfigError, match="sae.d_sae"):
        from_dict(StudyConfig, {"sae": {"d_sae": 3}})


@pytest.mark.parametrize("with_shards", [True, False])
def test_dry_run_prints_the_plan_without_ray_or_work(tmp_path, shards, capsys, monkeypatch,
                                                     with_shards):
    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(scaling, "ensure_ray", no_ray)
    if with_shards:
        data = study_dict(shards, tmp_path / "out", **{"baselines.exemplar_k": [2]})
        h = 32
    else:
        data = yaml.safe_load(TINY.read_text())
        data["out"] = str(tmp_path / "out")
        data["data"]["extract"]["out"] = str(tmp_path / "acts")
        h = 64  # tiny-random's hidden size
    code = run(scaling.main, ["--config", str(write_config(tmp_path, data)), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and f"H = {h}" in out and "total:" in out
    cfg = from_dict(StudyConfig, data)
    assert f"total: {sum(len(v) for v in cells(cfg, h).values())} trials" in out
    assert not (tmp_path / "out" / "rows").exists() and not (tmp_path / "acts").exists()
