"""The Ray Train executor: a ``TorchTrainer`` of data-parallel workers fed by Ray Data.

Each worker reads its own training files through ``ray.data.read_parquet``: held in memory when
they fit (read once; a fresh permutation every epoch), otherwise streamed by
``iter_torch_batches`` with files permuted every epoch and a seeded local shuffle. Either way a
restarted worker replays exactly the batches it would have seen. Gradients are averaged in one
all-reduce (the hand-written threshold-SAE step) or by DDP (other SAEs). Every
``checkpoint_every`` steps rank 0 writes a checkpoint (SAELens layout + trainer state with every
worker's data position) and Ray persists it; after a worker failure ``FailureConfig`` restarts
the group from the newest one.

A remote ``out`` (a storage URI) is Ray's storage too: checkpoints persist under ``out/ray`` in
the store through its pyarrow filesystem, rank 0 publishes the final SAE and metrics (or the
divergence record) through ``atoms.train.run_folder``, and every worker reads a remote data
folder from its own node's mirror.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from atoms.core.errors import AtomsError, ConfigError, TrainingDiverged
from atoms.train.batches import (
    TensorBatches,
    epoch_files,
    fits_in_memory,
    held_out_rows,
    in_geometry,
    parquet_rows,
)
from atoms.train.checkpoint import find_checkpoints, load_checkpoint, write_checkpoint
from atoms.train.job import TrainJob
from atoms.train.loop import (
    Checkpointer,
    Hook,
    SAEObjective,
    Sync,
    TorchDistributedSync,
    Trainer,
    train_epochs,
    uses_fast_step,
)
from atoms.train.run import (
    Prepared,
    StepTimer,
    final_metrics,
    finished_metrics,
    prepare,
    train_sample,
    write_final,
)
from atoms.train.run_folder import DIVERGED, METRICS, RAY_FOLDER, RunFolder


def _dataset(files: list[Path]):
    """The activation column of ``files`` as a Ray Dataset, rows in file order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # a worker's bars would interleave in the driver log
    return ray.data.read_parquet([str(f) for f in files]).select_columns(["activation"])


class RayShardBatches:
    """This worker's batches for one epoch streamed by Ray Data, fixed for (seed, epoch, rank):
    files permuted every epoch and dealt round-robin, rows through a seeded local shuffle."""

    def __init__(self, paths: list[Path], batch_size: int, seed: int, rank: int, world: int,
                 shuffle_rows: int, device: torch.device):
        self.paths, self.batch_size, self.seed = paths, batch_size, seed
        self.rank, self.world, self.shuffle_rows, self.device = rank, world, shuffle_rows, device

    def epoch(self, epoch: int):
        files = epoch_files(self.paths, self.seed, epoch, self.rank, self.world)
        shuffle_seed = (self.seed * 1_000_003 + epoch * 1009 + self.rank) % 2**31
        for batch in _dataset(files).iter_torch_batches(
                batch_size=self.batch_size, drop_last=True, dtypes=torch.float32,
                local_shuffle_buffer_size=self.shuffle_rows, local_shuffle_seed=shuffle_seed,
                device=self.device):
            yield batch["activation"]


def worker_source(prep: Prepared, rank: int, world: int, device: torch.device):
    """This worker's batch source: its own files (every world-th) read once by Ray Data and
    held in memory when they fit ``run.in_memory_gb``, else streamed every epoch."""
    run, cfg, split = prep.job.run, prep.job.train, prep.split
    local_batch = cfg.batch_size // world
    mine = split.train[rank::world]
    if fits_in_memory(parquet_rows(mine), split.d, run.in_memory_gb):
        parts = [b["activation"] for b in _dataset(mine).iter_torch_batches(
            batch_size=65536, dtypes=torch.float32)]
        rows = torch.cat(parts)
        if split.row_limit:  # |M| rows over the world: each rank keeps its share
            rows = rows[: split.row_limit // world]
        return TensorBatches(rows.to(device), local_batch, cfg.seed, rank)
    return RayShardBatches(split.train, local_batch, cfg.seed, rank, world, run.shuffle_rows,
                           device)


def _report(metrics: dict, trainer: Trainer | None, rank: int, folder_meta: dict) -> None:
    """Every rank reports (it is a barrier); with a trainer, rank 0 attaches a checkpoint."""
    import ray.train

    if trainer is None:
        ray.train.report(metrics)
        return
    payload = trainer.state_dict()  # collective: gathers every worker's data position
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            folder = write_checkpoint(trainer.sae, payload, Path(tmp) / "checkpoint", folder_meta)
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint)


def _ray_checkpointer(rank: int, every: int, meta: dict) -> Checkpointer:
    """Every ``every`` steps before the last: all ranks report the latest history row (and the
    evaluation of this step, if any) with rank 0's checkpoint, which Ray persists."""

    def save(t: Trainer) -> None:
        step = t.state.step
        metrics = {**(t.state.history[-1] if t.state.history else {}), "step": step}
        if t.state.evals and t.state.evals[-1]["step"] == step:
            metrics.update(t.state.evals[-1])
        _report(metrics, t, rank, meta)

    return Checkpointer(save, every, at_end=False)


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    prep: Prepared = config["prep"].on_this_node()
    run, cfg, split = prep.job.run, prep.job.train, prep.split
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    device = ray.train.torch.get_device()
    payload = None
    if (ck := ray.train.get_checkpoint()) is not None:
        with ck.as_directory() as folder:
            sae, payload = load_checkpoint(folder, expect=prep.sae_cfg)
    else:
        sae = prep.new_sae()
    sae.to(device)
    objective = None  # the hand-written step averages its gradients through the Sync
    if not uses_fast_step(sae, cfg):
        objective = ray.train.torch.prepare_model(
            SAEObjective(sae), parallel_strategy_kwargs={"broadcast_buffers": False})
    trainer = Trainer(sae, cfg, objective, TorchDistributedSync() if world > 1 else Sync())
    if payload is not None:
        trainer.load_state_dict(payload)
    source = in_geometry(worker_source(prep, rank, world, device), prep.whitening)
    holdout = held_out_rows(split, run.eval_rows, run.eval_pool).to(device) if rank == 0 \
        else None
    evaluator = prep.evaluator(holdout) if rank == 0 else (lambda sae: None)
    if cfg.target_l0:
        trainer.set_l0_probe(holdout)
    meta, timer = prep.metadata(), StepTimer(cfg.batch_size)
    start = time.perf_counter()
    try:
        train_epochs(trainer, source, evaluator=evaluator, eval_every=prep.eval_every,
                     checkpointer=_ray_checkpointer(rank, run.checkpoint_every, meta),
                     hooks=(timer, *config["hooks"]), progress=False)
    except TrainingDiverged as e:
        if rank == 0:
            prep.folder().write_json(DIVERGED, {"step": e.step, "message": str(e)}, indent=None)
        return
    seconds = time.perf_counter() - start
    metrics = {"step": trainer.state.step}
    dead = float(trainer.dead().float().mean())  # collective: every rank takes part
    if rank == 0:
        train_rows = train_sample(split, run.eval_rows)
        metrics.update(final_metrics(prep, trainer, holdout, train_rows.to(device), dead))
    _report(metrics, trainer, rank, meta)
    if rank == 0:
        write_final(prep, sae.cpu(), trainer.state, metrics,
                    {"train_seconds": seconds, **timer.summary(), "executor": "ray",
                     "workers": world, "device": str(device)})


def _check_cpus(cfg) -> None:
    """Ray Data's read tasks need a whole CPU beside the workers, or the run waits forever."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if total - cfg.workers * cfg.cpus_per_worker < 1.0:
        raise ConfigError(f"ray.cpus_per_worker: {cfg.workers} workers × {cfg.cpus_per_worker} "
                          f"CPU leave less than 1 of the cluster's {total:g} CPUs for Ray Data "
                          "to read shards (the run would hang); lower it")


def _storage(folder: RunFolder) -> dict:
    """Ray Train's storage for the run folder: the local folder, or the store's filesystem and
    the path within it (Ray persists checkpoints there natively)."""
    if folder.remote:
        return {"storage_path": folder.store.root, "storage_filesystem": folder.store.fs}
    storage = folder.local.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    return {"storage_path": str(storage)}


def train_ray(job: TrainJob, progress: bool = True, hooks: Iterable[Hook] = ()) -> dict:
    """Train with Ray Train (resuming from ``out/ray`` if present, in the store when ``out`` is
    remote); returns the final metrics. ``hooks`` run on every worker after every step."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from atoms.store.ray_env import ensure_ray, worker_env

    prep = prepare(job)
    run, ray_cfg = job.run, job.ray
    if (done := finished_metrics(run.out)) is not None:
        return done
    folder = prep.folder()
    newest = folder.pull_checkpoint(RAY_FOLDER, "checkpoint_*")  # remote: the stored newest
    existing = [newest] if newest else find_checkpoints(folder.local / RAY_FOLDER,
                                                        "checkpoint_*")
    if existing:  # a checkpoint of another architecture fails here, before Ray starts
        load_checkpoint(existing[-1], expect=prep.sae_cfg)
    folder.delete(DIVERGED)
    storage = _storage(folder)
    ensure_ray(progress)
    _check_cpus(ray_cfg)
    resources = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1} if ray_cfg.use_gpu else {})}
    trainer = TorchTrainer(
        _worker, train_loop_config={"prep": prep, "hooks": tuple(hooks)},
        scaling_config=ScalingConfig(num_workers=ray_cfg.workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RAY_FOLDER, **storage,
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=run.keep_checkpoints),
                             # workers mirror remote folders where this process does
                             worker_runtime_env=worker_env() or None))
    start = time.perf_counter()
    result = trainer.fit()
    fit_seconds = time.perf_counter() - start
    if (error := folder.read_json(DIVERGED)) is not None:
        last = result.checkpoint.path if result.checkpoint is not None else None
        msg = folder.write_diverged(TrainingDiverged(error["message"], error["step"]),
                                    folder.fs_path_to_show(last) if last else None)
        raise TrainingDiverged(msg, step=error["step"])
    metrics = finished_metrics(run.out)
    if metrics is None:
        raise AtomsError(f"{folder.show()}: the Ray Train run ended without {METRICS}")
    metrics["timings"]["fit_seconds"] = fit_seconds
    folder.write_json(METRICS, metrics)
    return metrics
