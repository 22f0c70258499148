"""One training run on a shard set in this process: metrics, artefacts, resume, bad input."""

import json

import pytest
import torch

from atoms.core.config import from_dict
from atoms.core.errors import ConfigError, InputError, TrainingDiverged
from atoms.sae.saelens import load_sae
from atoms.train.batches import DataSplit, ShardBatches, epoch_files
from atoms.train.checkpoint import find_checkpoints, load_checkpoint
from atoms.train.job import TrainJob
from atoms.train.loop import Trainer
from atoms.train.run import train_local
from tests.checks import crash_once_at
from tests.faults import NaNAt
from tests.shardsets import synthetic_shard_set


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return synthetic_shard_set(tmp_path_factory.mktemp("shards") / "resid_post" / "layer_0")


def job(data, out, **changes):
    spec = {
        "run": {"data": str(data), "out": str(out), "checkpoint_every": 40, "eval_every": 80,
                "eval_rows": 2048},
        "sae": {"d_sae": 64, "bandwidth": 0.1, "init_threshold": 0.3, "bias": False},
        "train": {"steps": 160, "batch_size": 256, "lr": 0.004, "sparsity_coeff": 0.05,
                  "sparsity_warmup_steps": 0, "lr_warmup_steps": 10, "log_every": 20},
        "ray": {},
    }
    for section, values in changes.items():
        spec[section] = {**spec[section], **values}
    return from_dict(TrainJob, spec)


@pytest.fixture(scope="module")
def finished(shard_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, train_local(job(shard_set, out), progress=False)


def test_a_run_reports_held_out_and_train_metrics(finished):
    out, m = finished
    assert m["status"] == "finished" and m["step"] == 160
    assert m["eval_r2_euclid_centred"] > 0.7  # 160 steps: plumbing, not quality (test_training)
    assert abs(m["eval_r2_euclid_centred"] - m["train_r2_euclid_centred"]) < 0.05
    assert 1.0 <= m["eval_l0_mean"] <= 8.0
    for key in ("eval_dead_fraction", "train_dead_fraction", "eval_threshold_mean",
                "eval_threshold_moved", "eval_r2_aip_centred", "eval_r2_euclid_uncentred"):
        assert key in m
    assert m["eval_threshold_moved"] > 0.0
    assert [e["step"] for e in m["evals"]] == [80]
    assert m["history"][-1]["step"] == 159 and m["timings"]["steady_rows_per_s"] > 0
    assert json.loads((out / "metrics.json").read_text()) == m


def test_the_final_sae_loads_and_matches_the_last_checkpoint(finished, shard_set):
    out, m = finished
    sae = load_sae(m["sae_path"])
    last = find_checkpoints(out / "checkpoints")
    assert [p.name for p in last] == ["step_0000120", "step_0000160"]  # keep_checkpoints=2
    ck_sae, payload = load_checkpoint(last[-1])
    assert payload["state"]["step"] == 160
    x = DataSplit.of(shard_set).holdout
    from atoms.train.batches import read_rows

    rows = read_rows(x, 32, 512)
    with torch.no_grad():
        assert torch.allclose(sae(rows).recon, ck_sae(rows).recon, atol=1e-5)


def test_every_saved_sae_says_where_it_attaches(finished, shard_set):
    out, m = finished
    folders = [out / "sae", *find_checkpoints(out / "checkpoints")]
    for folder in folders:
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]
        assert meta["hook_name"] == "blocks.0.hook_resid_post"
        assert meta["model_name"] == "synthetic" and meta["context_size"] == 64
        assert meta["dataset_path"] == "synthetic" and meta["hook_head_index"] is None
        assert meta["data"] == str(shard_set) and meta["positions"] == "all"
    sae = load_sae(out / "sae")
    assert sae.provenance["layout"] == "atoms" and sae.provenance["metadata"]["hook_name"]


def test_a_folder_resaved_by_saelens_loads_and_says_so(finished, tmp_path, caplog):
    import logging
    import shutil

    out, _ = finished
    resaved = tmp_path / "resaved"
    shutil.copytree(out / "sae", resaved)
    cfg = json.loads((resaved / "cfg.json").read_text())
    ours = load_sae(out / "sae")
    del cfg["atoms"]  # what SAELens's save_model writes back: its own fields only
    (resaved / "cfg.json").write_text(json.dumps(cfg))
    (resaved / "checksums.json").unlink()
    with caplog.at_level(logging.INFO, logger="atoms.sae.saelens"):
        plain = load_sae(resaved)
    assert plain.provenance == {"layout": "saelens", "metric": False,
                                "metadata": cfg["metadata"]}
    assert "no atoms block" in caplog.text
    x = torch.randn(32, ours.cfg.d_in)
    assert torch.allclose(plain(x).recon, ours(x).recon, atol=1e-5)


def test_rerunning_a_finished_run_returns_its_metrics(finished, shard_set):
    out, m = finished
    assert train_local(job(shard_set, out), progress=False) == m


def test_a_crashed_run_resumes_to_the_same_weights(shard_set, finished, tmp_path, monkeypatch):
    _, reference = finished
    crash_once_at(monkeypatch, 97)
    with pytest.raises(RuntimeError, match="killed"):
        train_local(job(shard_set, tmp_path), progress=False)
    assert not (tmp_path / "metrics.json").exists()
    assert [p.name for p in find_checkpoints(tmp_path / "checkpoints")][-1] == "step_0000080"
    resumed = train_local(job(shard_set, tmp_path), progress=False)
    assert resumed["resumed_from"] == [80] and reference["resumed_from"] == []
    a, b = load_sae(reference["sae_path"]), load_sae(resumed["sae_path"])
    for name, p in a.named_parameters():  # bitwise: the auto step's choice is resumed too
        assert torch.equal(p, dict(b.named_parameters())[name]), name
    assert resumed["eval_r2_euclid_centred"] == reference["eval_r2_euclid_centred"]


def test_width_mismatch_is_one_clear_error(shard_set, tmp_path):
    with pytest.raises(InputError, match=r"has d=32 but sae\.d_in=48"):
        train_local(job(shard_set, tmp_path, sae={"d_in": 48}), progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("changes, error, match", [
    ({"run": {"holdout_shards": 6}}, InputError, "need 1 ≤ holdout_shards < shards"),
    ({"train": {"batch_size": 20000}}, InputError, "more than the 10240 training rows"),
    ({"run": {"checkpoint_every": 0}}, ConfigError, "run.checkpoint_every: must be positive"),
    ({"sae": {"d_sae": "big"}}, ConfigError, "sae.d_sae: expected an integer"),
])
def test_bad_jobs_fail_before_training(shard_set, tmp_path, changes, error, match):
    with pytest.raises(error, match=match):
        train_local(job(shard_set, tmp_path, **changes), progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_nan_in_training_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        shard_set, tmp_path):
    bad = job(shard_set, tmp_path, train={"log_every": 5},
              run={"checkpoint_every": 5})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 24 .*last good "
                                               r"checkpoint: .*step_0000020") as info:
        train_local(bad, progress=False, hooks=[NaNAt(24)])
    assert info.value.step == 24
    record = json.loads((tmp_path / "diverged.json").read_text())
    assert record["step"] == 24 and not (tmp_path / "metrics.json").exists()
    kept = find_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step_0000015", "step_0000020"]
    for folder in kept:
        sae, _ = load_checkpoint(folder)
        assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_a_checkpoint_of_another_architecture_is_refused(shard_set, tmp_path, monkeypatch):
    original = Trainer.step

    def crash(self, batch):
        if self.state.step == 45:
            raise RuntimeError("killed")
        original(self, batch)

    monkeypatch.setattr(Trainer, "step", crash)
    with pytest.raises(RuntimeError):
        train_local(job(shard_set, tmp_path), progress=False)
    monkeypatch.setattr(Trainer, "step", original)
    with pytest.raises(InputError, match=r"cfg\.json: kind='threshold' but the run expects "
                                         r"kind='relu'"):
        train_local(job(shard_set, tmp_path, sae={"kind": "relu"}), progress=False)
    with pytest.raises(InputError, match="d_sae"):
        train_local(job(shard_set, tmp_path, sae={"d_sae": 96}), progress=False)


def test_shard_batches_are_deterministic_and_split_files_between_ranks(shard_set):
    split = DataSplit.of(shard_set)
    files = [epoch_files(split.train, 0, 3, r, 2) for r in (0, 1)]
    assert sorted(files[0] + files[1]) == sorted(split.train)
    assert not set(files[0]) & set(files[1])

    def batches(epoch, rank):
        src = ShardBatches(split.train, 32, 128, seed=0, rank=rank, world=2, shuffle_rows=1000)
        return list(src.epoch(epoch))

    a, b = batches(1, 0), batches(1, 0)
    assert len(a) == 2048 * len(files[0]) // 128
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], batches(2, 0)[0])
    rows = torch.cat(a)
    assert len(torch.unique(rows, dim=0)) == len(rows)  # no row twice within an epoch


def test_the_train_command_prints_where_the_sae_is(shard_set, tmp_path, capsys):
    import yaml

    from atoms.core.cli import run
    from experiments.train import main

    spec = {"run": {"data": str(shard_set), "out": str(tmp_path / "unused"),
                    "checkpoint_every": 20},
            "sae": {"d_sae": 32}, "train": {"steps": 20, "batch_size": 256}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert run(main, ["--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"SAE (SAELens layout): {tmp_path / 'out' / 'sae'}" in printed
    assert "eval_r2_euclid_centred" in printed and (tmp_path / "out" / "metrics.json").exists()
    spec["sae"]["d_sae"] = -1
    config.write_text(yaml.safe_dump(spec))
    assert run(main, ["--config", str(config), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sae.d_sae: must be positive" in err
    assert not (tmp_path / "bad").exists()


def test_an_aip_beside_the_shards_is_used_for_r2_and_decoder_norms(tmp_path):
    from atoms.aip.metric import AIP, SecondMoment, save_aip
    from atoms.train.batches import read_rows

    folder = synthetic_shard_set(tmp_path / "shards", rows=4096, shards=4)
    split = DataSplit.of(folder)
    moment = SecondMoment(32)
    moment.update(read_rows(split.train, 32, split.train_rows))
    save_aip(AIP.from_moment(moment), folder / "aip.safetensors", {})
    m = train_local(job(folder, tmp_path / "run", sae={"decoder_norm": "aip"},
                        train={"steps": 40}, run={"eval_every": 0}), progress=False)
    assert m["aip"] == str(folder / "aip.safetensors")
    assert m["eval_r2_aip_centred"] != pytest.approx(m["eval_r2_euclid_centred"], abs=1e-4)
    sae = load_sae(m["sae_path"])
    assert not torch.equal(sae.metric, torch.eye(32))
    assert torch.allclose(sae.decoder_norms(), torch.ones(64), atol=1e-4)
    m2 = train_local(job(folder, tmp_path / "none", train={"steps": 40},
                         run={"eval_every": 0, "aip": "none"}), progress=False)
    assert m2["aip"] is None
    assert [e["step"] for e in m2["evals"]] == [12, 24, 36]  # once per epoch of 3072 rows
    assert m2["eval_r2_aip_centred"] == pytest.approx(m2["eval_r2_euclid_centred"])
