"""Training run folders on a storage URI (a real S3 server): checkpoints, the final SAE and
metrics are published as they are written, and a run resumes from the store on any node."""

import json

import pytest
import torch

from atoms.core.errors import InputError, TrainingDiverged
from atoms.sae.saelens import load_sae
from atoms.store.storage import CACHE_ENV, Storage, pull
from atoms.train.loop import Trainer
from atoms.train.run import finished_metrics, train_local
from tests.checks import crash_once_at
from tests.faults import NaNAt
from tests.shardsets import synthetic_shard_set
from tests.test_train_run import job as full_job

STEPS = {"steps": 60}  # the default 'auto' step: its dense/sparse choice resumes bitwise
RUN = {"checkpoint_every": 20, "eval_every": 40, "eval_rows": 1024}
WEIGHTS = "sae_weights.safetensors"


def job(data, out, **changes):
    return full_job(data, out, run={**RUN, **changes.pop("run", {})},
                    train={**STEPS, **changes.pop("train", {})}, **changes)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return synthetic_shard_set(tmp_path_factory.mktemp("shards") / "resid_post" / "layer_0",
                               rows=6144, shards=4)


@pytest.fixture(scope="module")
def reference(shard_set, tmp_path_factory):
    """The same run on local paths, uninterrupted."""
    out = tmp_path_factory.mktemp("local-run")
    return out, train_local(job(shard_set, out), progress=False)


def stored_checkpoints(uri) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for rel in Storage(uri).files("checkpoints", recursive=True):
        _, folder, name = rel.split("/")
        found.setdefault(folder, set()).add(name)
    return found


def assert_same_sae(stored_sae_path, local_sae_path):
    """Bitwise: the same weights file, and the same tensors loaded."""
    folder = pull(stored_sae_path)
    assert (folder / WEIGHTS).read_bytes() == (local_sae_path / WEIGHTS).read_bytes()
    a, b = load_sae(folder), load_sae(local_sae_path)
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name]), name


def test_a_run_publishes_checkpoints_the_sae_and_metrics(shard_set, reference, s3_server,
                                                         storage_cache, monkeypatch, tmp_path):
    uri = s3_server.uri()
    m = train_local(job(shard_set, uri), progress=False)
    store = Storage(uri)
    assert m["status"] == "finished" and m["sae_path"] == store.uri_of("sae")
    kept = stored_checkpoints(uri)  # keep_checkpoints=2: step 20 was removed from the store too
    assert sorted(kept) == ["step_0000040", "step_0000060"]
    assert all({"checkpoint.json", "checksums.json", WEIGHTS} <= names for names in kept.values())
    assert store.read_json("metrics.json") == m and finished_metrics(uri) == m
    assert_same_sae(m["sae_path"], reference[0] / "sae")
    assert m["eval_r2_euclid_centred"] == reference[1]["eval_r2_euclid_centred"]
    # Another node (an empty mirror) sees the finished run and trains nothing.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "other-node"))
    monkeypatch.setattr(Trainer, "step", lambda *_: pytest.fail("trained again"))
    assert train_local(job(shard_set, uri), progress=False) == m
    assert finished_metrics(s3_server.uri()) is None


def test_an_interrupted_run_resumes_from_the_store_on_an_empty_mirror(
        shard_set, reference, s3_server, storage_cache, monkeypatch, tmp_path):
    uri = s3_server.uri()
    crash_once_at(monkeypatch, 45)
    with pytest.raises(RuntimeError, match="killed"):
        train_local(job(shard_set, uri), progress=False)
    assert sorted(stored_checkpoints(uri)) == ["step_0000020", "step_0000040"]
    assert finished_metrics(uri) is None
    store = Storage(uri)  # a half-published checkpoint (no checkpoint.json) is never used
    store.write_text("checkpoints/step_0000050/cfg.json", "{}")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "fresh-node"))
    resumed = train_local(job(shard_set, uri), progress=False)
    assert resumed["resumed_from"] == [40] and reference[1]["resumed_from"] == []
    assert sorted(stored_checkpoints(uri)) == ["step_0000040", "step_0000060"]
    assert any((tmp_path / "fresh-node").rglob("step_0000060"))
    assert_same_sae(resumed["sae_path"], reference[0] / "sae")
    assert resumed["eval_r2_euclid_centred"] == reference[1]["eval_r2_euclid_centred"]


def test_a_remote_data_folder_trains_like_the_local_one(shard_set, reference, s3_server,
                                                        storage_cache, tmp_path):
    data = s3_server.uri()
    Storage(data).put_tree(shard_set)
    m = train_local(job(data, tmp_path / "run"), progress=False)
    assert m["sae_path"] == str(tmp_path / "run" / "sae")
    assert_same_sae(m["sae_path"], reference[0] / "sae")
    assert any(storage_cache.rglob("manifest*"))  # read from this node's mirror
    meta = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert "atoms-secret" not in json.dumps(meta)
    with pytest.raises(InputError, match=r"manifest\.json: not found"):
        train_local(job(s3_server.uri(), tmp_path / "none"), progress=False)


def test_divergence_is_recorded_in_the_store(shard_set, s3_server, storage_cache):
    uri = s3_server.uri()
    bad = job(shard_set, uri, train={"log_every": 5},
              run={"checkpoint_every": 5})
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint: s3://atoms:\*\*\*@"
                                               r".*checkpoints/step_0000020") as info:
        train_local(bad, progress=False, hooks=[NaNAt(24)])
    record = Storage(uri).read_json("diverged.json")
    assert record["step"] == 24 == info.value.step and "atoms-secret" not in record["message"]
    assert sorted(stored_checkpoints(uri)) == ["step_0000015", "step_0000020"]
    assert finished_metrics(uri) is None


def test_the_train_command_checks_out_before_any_work(shard_set, s3_server, storage_cache,
                                                      tmp_path, capsys):
    import yaml

    from atoms.core.cli import run
    from experiments.train import main

    spec = {"run": {"data": str(shard_set), "checkpoint_every": 20, "eval_rows": 1024},
            "sae": {"d_sae": 32}, "train": {"steps": 20, "batch_size": 256}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec))
    good = s3_server.uri()
    bad = good.replace("atoms-secret@", "wrong-secret@")
    assert run(main, ["--config", str(config), "--out", bad, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: out: s3://atoms:***@")
    assert "not writable" in err and "secret" not in err
    assert Storage(good).files("", recursive=True) == {} and not any(storage_cache.rglob("*"))
    assert run(main, ["--config", str(config), "--out", good, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"SAE (SAELens layout): {Storage(good).show('sae')}" in printed
    assert f"metrics: {Storage(good).show('metrics.json')}" in printed
    assert "atoms-secret" not in printed and finished_metrics(good)["step"] == 20


@pytest.mark.slow
def test_ray_train_persists_checkpoints_in_the_store(shard_set, s3_server, storage_cache,
                                                     ray_session):
    from atoms.train.ray_train import RAY_FOLDER, train_ray

    data, uri = s3_server.uri(), s3_server.uri()
    Storage(data).put_tree(shard_set)
    ray_run = {"executor": "ray", "torch_threads": 1}
    workers = {"workers": 2, "cpus_per_worker": 0.5}
    m = train_ray(job(data, uri, run=ray_run, ray=workers), progress=False)
    store = Storage(uri)
    markers = store.files(RAY_FOLDER, "checkpoint.json", recursive=True)
    assert len(markers) == 2 and all("/checkpoint_" in k for k in markers)
    assert m["timings"]["executor"] == "ray" and "fit_seconds" in m["timings"]
    assert finished_metrics(uri) == m and m["sae_path"] == store.uri_of("sae")
    assert load_sae(pull(m["sae_path"])).cfg.d_sae == 64
    assert train_ray(job(data, uri, run=ray_run, ray=workers), progress=False) == m
    # Unfinished again: the stored checkpoint of another width is refused before Ray starts.
    store.delete("metrics.json")
    with pytest.raises(InputError, match="d_sae"):
        train_ray(job(data, uri, run=ray_run, ray=workers, sae={"d_sae": 96}), progress=False)
