"""The study's controls and geometries: exemplar, TopK, atoms in the AIP geometry, stability."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from analysis.stability import with_stability
from atoms.aip.fit import aip_file
from atoms.aip.metric import AIP, SecondMoment, save_aip
from atoms.evaluate.units import UnitSet
from atoms.extract.shards import ShardSet
from atoms.sae.saelens import load_sae
from atoms.store.results import ResultStore
from atoms.study.plan import cells
from atoms.study.trial import cell_rows, execute_trial
from atoms.train.batches import read_rows
from tests.shardsets import synthetic_shard_set
from tests.test_study import context_for


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards × 2048 rows of sparse synthetic codes (d = 32), with S̃ (and the centred
    Cov⁻¹) beside them."""
    folder = synthetic_shard_set(tmp_path_factory.mktemp("acts") / "layer", rows=12288)
    x = read_rows(ShardSet.open(folder).paths, 32, 12288)
    for centred in (False, True):
        save_aip(AIP.from_moment(SecondMoment(32, centred=centred).update(x)),
                 folder / aip_file(centred))
    return folder


def test_the_exemplar_control_stores_its_training_rows_and_reconstructs_them(tmp_path, shards):
    ctx = context_for(tmp_path, shards, **{"grid.d_sae": [64], "grid.train_rows": [64],
                                           "baselines.exemplar_k": [1, 3]})
    plan = cells(ctx.cfg, ctx.h)
    trial = plan["exemplar-k1-D64-M64-s0"][0]
    execute_trial(ctx, trial)
    row = ResultStore(ctx.out).finished()[trial.key].iloc[0]
    assert row["unit_set"] == "exemplar_k1" and row["unit_kind"] == "exemplar"
    assert row["omp_k"] == 1 and row["n_units"] == 64
    for variant in ("euclid_centred", "aip_centred", "euclid_uncentred"):
        assert row[f"train_r2_{variant}"] == pytest.approx(1.0, abs=1e-6)
    assert row["r2_euclid_centred"] < 0.9  # unseen documents are not stored rows
    stored = ResultStore(ctx.out).read_units(trial.key, "exemplar_k1")
    rows = UnitSet.exemplar(cell_rows(ctx, 64), 64).directions
    torch.testing.assert_close(stored, rows, atol=1e-3, rtol=1e-3)  # float16 on disk
    assert "exemplar-k3-D64-M64-s0" in plan


def test_topk_and_aip_geometry_trials_train_and_fold(tmp_path, shards):
    ctx = context_for(tmp_path, shards, **{"grid.d_sae_over_h": [2], "grid.train_rows": [1024],
                                           "grid.geometries": ["euclidean", "aip",
                                                               "aip_centred"],
                                           "baselines.topk_k": [4], "baselines.batchtopk_k": [4]})
    plan = cells(ctx.cfg, ctx.h)
    store = ResultStore(ctx.out)
    keys = {"tsae_aip-D64-M1024-s0": ("atoms_aip", "aip", "uncentred"),
            "tsae_aip_centred-D64-M1024-s0": ("jumprelu_centred_whitening", "aip", "centred"),
            "topk-k4-D64-M1024-s0": ("topk_features", None, None),
            "batchtopk-k4-D64-M1024-s0": ("batchtopk_features", None, None)}
    for cell, (name, geometry, whitening) in keys.items():
        trial = plan[cell][0]
        assert execute_trial(ctx, trial)["status"] == "finished"
        row = store.finished()[trial.key].iloc[0]
        assert row["unit_set"] == name and (row["geometry"] or None) == geometry
        assert (row["whitening"] or None) == whitening
        judged = "r2_aip_centred" if geometry else "r2_euclid_centred"  # its training loss
        assert 0 < row[judged] <= 1 and row[f"train_{judged}"] > 0
        sae = load_sae(row["checkpoint_path"])  # the saved SAE runs on raw rows
        assert sae.whiten is None
        if geometry:
            assert sae.trained_geometry == {"geometry": geometry, "whitening": whitening}
    topk = store.finished()["topk-k4-D64-M1024-s0"].iloc[0]
    assert topk["l0_max"] <= 4 and topk["k"] == 4
    batch = store.finished()["batchtopk-k4-D64-M1024-s0"].iloc[0]  # judged as its JumpReLU
    assert 1 < batch["l0_mean"] < 12 and batch["l0_max"] > 4


def test_stability_columns_need_two_seeds(tmp_path, shards):
    ctx = context_for(tmp_path, shards, **{"grid.d_sae_over_h": [1], "grid.train_rows": [1024],
                                           "grid.seeds": [0, 1, 2], "baselines.relu": False})
    plan = cells(ctx.cfg, ctx.h)
    for cell in ("random-D32-s0", "random-D32-s1", "random-D32-s2", "neurons"):
        execute_trial(ctx, plan[cell][0])
    store = ResultStore(ctx.out)
    table = with_stability(store.table(), store, ctx.aip())
    random = table[table["family"] == "random"]
    assert (random["stability_pairs"] == 3).all()
    assert (random["stability_matched_fraction"] < 0.2).all()
    assert random["stability_pw_mcc"].iloc[0] == pytest.approx(
        random["stability_random_pw_mcc"].iloc[0], abs=0.1)
    assert table.loc[table["family"] == "neurons", "stability_pw_mcc"].isna().all()
    assert isinstance(table, pd.DataFrame)


def test_a_trial_run_steers_and_evaluates_on_the_study_validation_rows(tmp_path, shards):
    from atoms.study.trial import run_settings
    from atoms.train.batches import DataSplit, held_out_rows

    ctx = context_for(tmp_path, shards)
    run = run_settings(ctx, cells(ctx.cfg, ctx.h)["tsae-D32-M1024-s0"][0])
    split = DataSplit.of(shards, run.holdout_shards)
    assert torch.equal(held_out_rows(split, run.eval_rows, run.eval_pool), ctx.validation)
    pool = held_out_rows(split, run.eval_pool, run.eval_pool)
    assert torch.equal(pool[len(ctx.validation):], ctx.test)  # disjoint, same documents


def test_a_controlled_study_with_no_starting_lambda_fails_before_work(tmp_path, shards):
    from atoms.core.errors import ConfigError

    with pytest.raises(ConfigError, match="sparsity_coeff"):
        context_for(tmp_path, shards, **{"sparsity.search": "control",
                                         "sparsity.sparsity_coeff": [0.0]})


def test_a_converge_budget_trial_records_its_convergence_and_steps(tmp_path, shards):
    ctx = context_for(tmp_path, shards, **{
        "grid.d_sae_over_h": [2], "grid.train_rows": [2048], "grid.budget": "converge",
        "grid.max_steps": 1500, "sparsity.search": "control", "sparsity.sparsity_coeff": [3e-4],
        "sparsity.target_l0": 4.0, "train.converge_window": 100, "train.converge_tol": 0.02,
        "train.lr": 3e-3})
    trial = cells(ctx.cfg, ctx.h)["tsae-D64-M2048-s0"][0]
    execute_trial(ctx, trial)
    row = ResultStore(ctx.out).finished()[trial.key].iloc[0]
    assert row["steps_cap"] == 1500 and row["converged"]
    assert row["steps"] == row["converged_at"] + 100 < 1500
    assert abs(row["l0_mean"] / 4.0 - 1) <= 0.1  # steered and calibrated on validation rows
    assert row["threshold_scale"] > 0
    assert row["epochs"] == pytest.approx(row["steps"] * row["batch_size"] / 2048)
    cap = context_for(tmp_path / "cap", shards, **{
        "grid.d_sae_over_h": [2], "grid.train_rows": [2048], "grid.budget": "converge",
        "grid.max_steps": 60, "sparsity.search": "control", "sparsity.sparsity_coeff": [3e-4],
        "sparsity.target_l0": 4.0, "train.converge_window": 100})
    trial = cells(cap.cfg, cap.h)["tsae-D64-M2048-s0"][0]
    execute_trial(cap, trial)
    row = ResultStore(cap.out).finished()[trial.key].iloc[0]
    assert not row["converged"] and row["steps"] == 60 and pd.isna(row["converged_at"])
