"""Ray Train: 2 DDP workers agree with the plain loop, survive a dying worker, stop on NaN."""

import json

import pytest
import torch

from atoms.core.errors import TrainingDiverged
from atoms.sae.saelens import load_sae
from atoms.train.checkpoint import find_checkpoints, load_checkpoint
from atoms.train.ray_train import RAY_FOLDER, train_ray
from atoms.train.run import train_local
from tests.faults import FAULT_MARKER, KillOnce, NaNAt
from tests.shardsets import synthetic_shard_set
from tests.test_train_run import job

pytestmark = pytest.mark.slow

# Streamed by Ray Data (in_memory_gb 0): the path whose replay after a restart is hardest.
RAY = {"executor": "ray", "torch_threads": 1, "shuffle_rows": 1024, "in_memory_gb": 0.0}
WORKERS = {"workers": 2, "cpus_per_worker": 0.5}
SHORT = {"steps": 100}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return synthetic_shard_set(tmp_path_factory.mktemp("shards") / "resid_post" / "layer_0")


@pytest.fixture(scope="module")
def uninterrupted(shard_set, tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("ray-run")
    return out, train_ray(job(shard_set, out, run=RAY, ray=WORKERS, train=SHORT), progress=False)


def weights(metrics) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_sae(metrics["sae_path"]).named_parameters()}


def test_two_workers_match_the_plain_loop_within_noise(uninterrupted, shard_set, tmp_path):
    _, ray_m = uninterrupted
    plain = train_local(job(shard_set, tmp_path, train=SHORT), progress=False)
    assert ray_m["timings"]["executor"] == "ray" and ray_m["timings"]["workers"] == 2
    # Same data, global batch and schedule; only the shuffle differs (Ray Data per worker).
    assert ray_m["eval_r2_euclid_centred"] == pytest.approx(plain["eval_r2_euclid_centred"],
                                                            abs=0.04)
    assert ray_m["eval_l0_mean"] == pytest.approx(plain["eval_l0_mean"], rel=0.2)
    assert ray_m["eval_dead_fraction"] == pytest.approx(plain["eval_dead_fraction"], abs=0.1)
    assert ray_m["history"][-1]["mse"] == pytest.approx(plain["history"][-1]["mse"], rel=0.25)


def test_a_dying_worker_is_restarted_and_resumes_to_the_same_weights(uninterrupted, shard_set,
                                                                     tmp_path):
    _, reference = uninterrupted
    # Checkpoints every 40 steps; worker 1 dies once at step 57 → restart from step 40.
    resumed = train_ray(job(shard_set, tmp_path, run=RAY, ray=WORKERS, train=SHORT),
                        progress=False, hooks=[KillOnce(57, tmp_path, exit_process=True)])
    assert (tmp_path / FAULT_MARKER).exists(), "the injected failure did not happen"
    assert resumed["resumed_from"] == [40] and reference["resumed_from"] == []
    a, b = weights(reference), weights(resumed)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, f"max |Δw| = {diff}"
    assert resumed["eval_r2_euclid_centred"] == pytest.approx(
        reference["eval_r2_euclid_centred"], abs=1e-4)
    kept = find_checkpoints(tmp_path / RAY_FOLDER, "checkpoint_*")
    assert len(kept) == 2
    for folder in kept:  # every kept checkpoint verifies (checksums, shapes) and loads
        sae, payload = load_checkpoint(folder)
        assert payload["positions"].shape == (2, 2)
        assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_nan_in_a_ray_run_stops_with_the_step(shard_set, tmp_path):
    bad = job(shard_set, tmp_path, train={"log_every": 10},
              ray=WORKERS, run={**RAY, "checkpoint_every": 10,
                   "in_memory_gb": 4.0})  # each worker holds its files in memory
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 24 .*last good "
                                               r"checkpoint: .*checkpoint_") as info:
        train_ray(bad, progress=False, hooks=[NaNAt(24)])
    assert info.value.step == 24
    assert json.loads((tmp_path / "diverged.json").read_text())["step"] == 24
    assert not (tmp_path / "metrics.json").exists()
    kept = find_checkpoints(tmp_path / RAY_FOLDER, "checkpoint_*")
    assert [load_checkpoint(k)[1]["state"]["step"] for k in kept] == [10, 20]


def test_workers_that_leave_no_cpu_for_ray_data_are_refused(shard_set, tmp_path, ray_session):
    from atoms.core.errors import ConfigError

    hungry = {**WORKERS, "cpus_per_worker": 1.0}
    with pytest.raises(ConfigError, match="leave less than 1 of the cluster's 2 CPUs"):
        train_ray(job(shard_set, tmp_path, run=RAY, ray=hungry), progress=False)
    assert not (tmp_path / RAY_FOLDER).exists()


def test_two_workers_train_in_the_aip_geometry_at_a_target_l0(tmp_path_factory, ray_session):
    """Ray Train with whitened batches on every worker and the controller steered by rank 0's
    held-out rows (broadcast): the saved SAE is folded and sits near the target L0."""
    from atoms.aip.metric import AIP, SecondMoment, save_aip
    from atoms.extract.shards import ShardSet
    from atoms.train.batches import read_rows

    folder = synthetic_shard_set(tmp_path_factory.mktemp("aip") / "resid_post" / "layer_0")
    s = ShardSet.open(folder)
    save_aip(AIP.from_moment(SecondMoment(s.d).update(read_rows(s.paths, s.d, 8192))),
             folder / "aip.safetensors")
    out = tmp_path_factory.mktemp("aip-run")
    spec = job(folder, out, run=RAY, ray=WORKERS,
               sae={"geometry": "aip", "bandwidth": 0.01, "init_threshold": 0.001, "bias": True},
               train={"steps": 300, "sparsity_coeff": 1e-3, "target_l0": 6.0,
                      "sparsity_warmup_steps": 30, "lr": 2e-3})
    metrics = train_ray(spec, progress=False)
    sae = load_sae(metrics["sae_path"])
    assert sae.whiten is None and sae.trained_geometry["geometry"] == "aip"
    assert abs(metrics["eval_l0_mean"] / 6.0 - 1) <= 0.25, metrics["eval_l0_mean"]
    assert metrics["history"][-1]["sparsity_coeff"] != 1e-3
