"""One SAE training run on a shard set: its config, its checks, and the plain executor.

A run folder ``out`` holds ``checkpoints/step_*`` (plain) or ``ray/`` (Ray Train), and, once
finished, ``sae/`` (the final SAE, SAELens layout, input scaling folded) and ``metrics.json``
(final held-out and train metrics, history, config, timings). A diverged run writes
``diverged.json`` instead. Rerunning an unfinished run resumes from its last checkpoint.

``out`` (and ``data``) may be storage URIs (``atoms.store.storage``): training then works in the
node's mirror of ``out`` and publishes each checkpoint, the final SAE and ``metrics.json`` to the
store as they are written (``atoms.train.run_folder``), so the run resumes on any node.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from atoms.aip.metric import AIP, load_aip
from atoms.train.batches import DataSplit, ShardBatches, TensorBatches, read_rows
from atoms.train.checkpoint import (
    find_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    step_folder,
    write_checkpoint,
)
from atoms.core.config import from_dict, require, to_dict
from atoms.core.errors import InputError, TrainingDiverged
from atoms.evaluate.sae_eval import evaluate
from atoms.core.io import code_version
from atoms.train.run_folder import RunFolder
from atoms.sae.model import SAEConfig, SparseAutoencoder, build_sae
from atoms.sae.saelens import save_sae
from atoms.extract.shard_store import local_layer
from atoms.store.storage import Storage, is_remote, mirror_path, pull_file, redact, redact_all
from atoms.train.loop import TrainConfig, Trainer, train_epochs

METRICS = "metrics.json"
DIVERGED = "diverged.json"
CHECKPOINTS = "checkpoints"
AIP_FILE = "aip.safetensors"


@dataclass
class RunConfig:
    data: str
    """Shard folder of one (site, layer): ``<root>/<site>/layer_<l>``; a local path or a
    storage URI (mirrored on each node that reads it)."""
    out: str = "results/train/run"
    """Run folder: a local path or a storage URI (``s3://bucket/prefix?…``)."""
    holdout_shards: int = 1
    """The last this-many shards (later documents) are held out for evaluation."""
    eval_rows: int = 16384
    """Rows of held-out data (and of training data, for train R²) per evaluation."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: once per pass over the training rows); the
    final evaluation always runs."""
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    aip: str = "auto"
    """'auto' (``<data>/aip.safetensors`` when present), 'none', or a path or URI."""
    executor: Literal["plain", "ray"] = "plain"
    workers: int = 1
    """Ray Train workers (data-parallel; the global batch is split between them)."""
    cpus_per_worker: float = 0.5
    """Fractional on small machines: Ray Data needs CPUs left over to read shards."""
    use_gpu: bool = False
    max_failures: int = 3
    """Ray Train restarts from the last checkpoint after a worker failure, this many times."""
    shuffle_rows: int = 65536
    """Shuffle buffer when streaming shards."""
    train_rows: int = 0
    """Train on the first this-many training rows only (0: all): the data scale |M|."""
    in_memory_gb: float = 4.0
    """Plain executor: hold the training rows in memory when they fit in this many GB."""
    torch_threads: int = 0
    """Threads per process/worker (0: leave torch's default)."""
    fault: Literal["none", "kill", "nan"] = "none"
    """Fault injection for tests, after step ``fault_step``: 'kill' ends the last worker's
    process once (plain: raises once), 'nan' writes a NaN into W_enc."""
    fault_step: int = -1

    def __post_init__(self):
        require(self.holdout_shards >= 1, "holdout_shards", "must be at least 1")
        require(self.eval_rows >= 1, "eval_rows", "must be positive")
        require(self.eval_every >= 0, "eval_every", "must be non-negative")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be positive")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        require(self.workers >= 1, "workers", "must be at least 1")
        require(self.train_rows >= 0, "train_rows", "must be non-negative (0: all rows)")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")


@dataclass
class TrainJob:
    """What ``experiments/train.py`` reads: where (run), what (sae) and how (train)."""

    run: RunConfig
    sae: dict = field(default_factory=dict)
    """SAEConfig fields; d_in defaults to the shard set's width."""
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Prepared:
    """A job checked against its data, before any training."""

    job: TrainJob
    split: DataSplit
    sae_cfg: SAEConfig
    aip_path: Path | None
    input_scale: float

    @property
    def out(self) -> Path:
        """The local run folder: ``run.out``, or this node's mirror of it when remote."""
        return mirror_path(self.job.run.out)

    def folder(self) -> RunFolder:
        return RunFolder(self.job.run.out)

    @property
    def eval_every(self) -> int:
        """Steps between held-out evaluations: ``run.eval_every``, or one epoch when 0."""
        return self.job.run.eval_every or max(1, self.split.train_rows // self.job.train.batch_size)

    def new_sae(self) -> SparseAutoencoder:
        sae = build_sae(self.sae_cfg)
        sae.input_scale.fill_(self.input_scale)
        if self.aip_path is not None:
            sae.set_metric(load_aip(self.aip_path)[0])
        return sae

    def aip(self) -> AIP | None:
        return load_aip(self.aip_path)[0] if self.aip_path is not None else None

    def aip_source(self) -> str | None:
        """Where the AIP came from, as recorded: its path, or its stored URI (redacted)."""
        run = self.job.run
        if self.aip_path is None or not (is_remote(run.aip) or is_remote(run.data)):
            return str(self.aip_path) if self.aip_path else None
        return redact(run.aip) if is_remote(run.aip) else Storage(run.data).show(AIP_FILE)

    def metadata(self) -> dict:
        data = redact(self.job.run.data) if is_remote(self.job.run.data) else str(self.split.folder)
        return {"data": data, "holdout_shards": self.job.run.holdout_shards}

    def on_this_node(self) -> Prepared:
        """This job with its data and AIP paths on this node (a Ray worker on another node
        pulls a remote data folder to its own mirror; checksums verified on first use)."""
        run = self.job.run
        if not (is_remote(run.data) or is_remote(run.aip)):
            return self
        split = self.split
        folder = local_layer(run.data)
        if folder != split.folder:
            split = DataSplit.of(folder, run.holdout_shards)
            if run.train_rows:
                split = split.limit(run.train_rows)
        return dataclasses.replace(self, split=split, aip_path=_aip_path(run, folder))


def _aip_path(run: RunConfig, data: Path) -> Path | None:
    if run.aip == "none":
        return None
    if run.aip == "auto":
        path = data / AIP_FILE
        return path if path.exists() else None
    if is_remote(run.aip):
        return pull_file(run.aip)
    if not Path(run.aip).exists():
        raise InputError(f"run.aip: {run.aip} does not exist")
    return Path(run.aip)


def prepare(job: TrainJob) -> Prepared:
    """Check the job against its shard set (width, shard counts, batch split) and fix the
    input scale s (E‖s·x‖² = 1 on up to 16k training rows) so every executor uses the same."""
    run = job.run
    split = DataSplit.of(local_layer(run.data), run.holdout_shards)
    if run.train_rows:
        split = split.limit(run.train_rows)
    sae_dict = {"seed": job.train.seed, **job.sae}
    if "d_in" in sae_dict:
        split.check_d(sae_dict["d_in"])
    sae_cfg = from_dict(SAEConfig, {"d_in": split.d, **sae_dict}, "sae")
    workers = run.workers if run.executor == "ray" else 1
    if job.train.batch_size % workers:
        raise InputError(f"train.batch_size: {job.train.batch_size} does not split evenly "
                         f"over run.workers={workers}")
    if len(split.train) < workers:
        raise InputError(f"{split.folder}: {len(split.train)} training shards for {workers} "
                         "workers; each needs at least one")
    if job.train.batch_size // workers > split.train_rows // workers:
        raise InputError(f"train.batch_size: {job.train.batch_size} is more than the "
                         f"{split.train_rows} training rows in {split.folder}")
    sample = train_sample(split, 16384)
    mean_sq = float(sample.double().pow(2).sum(1).mean())
    scale = 1.0 / math.sqrt(mean_sq) if mean_sq > 0 else 1.0
    return Prepared(job, split, sae_cfg, _aip_path(run, split.folder), scale)


class StepTimer:
    """Steady-state throughput: rows/s between the ``warmup``-th step after (re)start and the
    last, so start-up (process, data pipeline, first allocations) is excluded."""

    def __init__(self, batch_size: int, warmup: int = 5):
        self.batch_size, self.warmup, self.ticks = batch_size, warmup, 0
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def tick(self, step: int) -> None:
        self.ticks += 1
        if self.ticks == self.warmup:
            self.first = (step, time.perf_counter())
        elif self.ticks > self.warmup:
            self.last = (step, time.perf_counter())

    def summary(self) -> dict:
        if self.first is None or self.last is None:
            return {}
        steps, seconds = self.last[0] - self.first[0], self.last[1] - self.first[1]
        return {"steady_steps": steps, "steady_rows_per_s": steps * self.batch_size / seconds}


FAULT_MARKER = ".fault_injected"


def inject_fault(trainer: Trainer, run: RunConfig, out: Path, last_worker: bool) -> None:
    """Apply ``run.fault`` once the trainer has taken ``run.fault_step`` steps."""
    if run.fault == "none" or trainer.state.step != run.fault_step:
        return
    if run.fault == "nan":
        with torch.no_grad():
            trainer.sae.W_enc[0, 0] = float("nan")
        return
    marker = out / FAULT_MARKER
    if last_worker and not marker.exists():
        out.mkdir(parents=True, exist_ok=True)
        marker.touch()
        if run.executor == "ray":
            os._exit(1)  # the worker process dies; Ray Train restarts the group
        raise RuntimeError(f"injected failure at step {run.fault_step}")


def train_sample(split: DataSplit, rows: int) -> torch.Tensor:
    """Training rows for train-R²: spread over the shards, or the first rows of a split
    limited to |M| rows (so the sample never reaches past what was trained on)."""
    if split.row_limit:
        return read_rows(split.train, split.d, min(rows, split.row_limit))
    return read_rows(split.train[:: max(1, len(split.train) // 4)], split.d, rows)


def finished_metrics(out) -> dict | None:
    """The metrics of a finished run in ``out``, a path or URI (None when it has not finished)."""
    return RunFolder(out).read_json(METRICS)


def write_final(prep: Prepared, sae: SparseAutoencoder, trainer_state, metrics: dict,
                timings: dict) -> Path:
    """``out/sae`` then ``out/metrics.json`` (last, so its presence means finished); for a
    remote ``out`` both are written locally, then published in that order, and ``sae_path``
    is the stored URI of ``sae/``. Returns the local metrics.json."""
    folder = prep.folder()
    sae_dir = save_sae(sae, folder.local / "sae", prep.metadata())
    folder.publish_folder(sae_dir)
    record = {
        "status": "finished", "step": trainer_state.step,
        "sae_path": folder.uri_of("sae") if folder.remote else str(sae_dir),
        **metrics, "resampled": trainer_state.resampled, "timings": timings,
        "resumed_from": trainer_state.resumed_from,
        "history": trainer_state.history, "evals": trainer_state.evals,
        "config": {"run": redact_all(to_dict(prep.job.run)), "sae": to_dict(prep.sae_cfg),
                   "train": to_dict(prep.job.train)},
        "input_scale": prep.input_scale, "aip": prep.aip_source(),
        "code_version": code_version(),
    }
    return folder.write_json(METRICS, record)


def write_diverged(out, error: TrainingDiverged, last_checkpoint: str | None) -> str:
    """Record a divergence in the run folder ``out`` (path or URI); returns the message naming
    the last good checkpoint."""
    msg = f"{error} — last good checkpoint: {last_checkpoint or 'none'}"
    RunFolder(out).write_json(DIVERGED, {"status": "diverged", "step": error.step,
                                         "message": msg, "last_checkpoint": last_checkpoint},
                              indent=None)
    return msg


def final_metrics(prep: Prepared, trainer: Trainer, holdout: torch.Tensor,
                  train_rows: torch.Tensor, train_dead_fraction: float) -> dict:
    """Held-out (eval_*) and train-sample (train_*) metrics of the trained SAE."""
    aip = prep.aip()
    start = trainer.state.threshold_start
    return {**evaluate(trainer.sae, holdout, aip, prefix="eval_", threshold_start=start),
            **evaluate(trainer.sae, train_rows, aip, prefix="train_"),
            "train_dead_fraction": train_dead_fraction}


def train_local(job: TrainJob, progress: bool = True) -> dict:
    """Train in this process (resuming from ``out/checkpoints``, the stored ones when ``out``
    is remote); returns the final metrics."""
    prep = prepare(job)
    if (done := finished_metrics(job.run.out)) is not None:
        return done
    run, cfg = job.run, job.train
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    folder = prep.folder()
    ck_root = folder.local / CHECKPOINTS
    folder.pull_checkpoint(CHECKPOINTS, "step_*")
    existing = find_checkpoints(ck_root)
    if existing:
        sae, payload = load_checkpoint(existing[-1], expect=prep.sae_cfg)
        trainer = Trainer(sae, cfg)
        trainer.load_state_dict(payload)
    else:
        trainer = Trainer(prep.new_sae(), cfg)
    split = prep.split
    if split.train_rows * split.d * 4 <= run.in_memory_gb * 2**30:
        source = TensorBatches(read_rows(split.train, split.d, split.train_rows),
                               cfg.batch_size, cfg.seed)
    else:
        source = ShardBatches(split.train, split.d, cfg.batch_size, cfg.seed,
                              shuffle_rows=run.shuffle_rows)
    holdout = read_rows(split.holdout, split.d, run.eval_rows)
    aip, timer = prep.aip(), StepTimer(cfg.batch_size)
    folder.delete(DIVERGED)

    def on_step(t: Trainer) -> None:
        step = t.state.step
        timer.tick(step)
        inject_fault(t, run, prep.out, last_worker=True)
        if step % prep.eval_every == 0 and step < cfg.steps:
            t.state.evals.append({"step": step, **evaluate(t.sae, holdout, aip)})
        if step % run.checkpoint_every == 0 or step == cfg.steps:
            t.flush()  # a non-finite loss stops here, before it can reach a checkpoint
            written = write_checkpoint(t.sae, t.state_dict(), step_folder(ck_root, step),
                                       prep.metadata())
            folder.publish_checkpoint(written)
            prune_checkpoints(ck_root, run.keep_checkpoints)
            folder.prune_stored(CHECKPOINTS, "step_*", find_checkpoints(ck_root))

    start = time.perf_counter()
    try:
        train_epochs(trainer, source, on_step=on_step, progress=progress)
    except TrainingDiverged as e:
        last = find_checkpoints(ck_root)
        shown = folder.show(last[-1].relative_to(folder.local).as_posix()) if last else None
        msg = write_diverged(run.out, e, shown)
        raise TrainingDiverged(msg, step=e.step) from None
    seconds = time.perf_counter() - start
    train_rows = train_sample(split, run.eval_rows)
    dead = float(trainer.dead().float().mean())
    metrics = final_metrics(prep, trainer, holdout, train_rows, dead)
    write_final(prep, trainer.sae, trainer.state, metrics,
                {"train_seconds": seconds, **timer.summary(), "executor": "plain",
                 "workers": 1})
    return finished_metrics(run.out)
