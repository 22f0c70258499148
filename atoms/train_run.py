"""One SAE training run on a shard set: its config, its checks, and the plain executor.

A run folder ``out`` holds ``checkpoints/step_*`` (plain) or ``ray/`` (Ray Train), and, once
finished, ``sae/`` (the final SAE, SAELens layout, input scaling folded) and ``metrics.json``
(final held-out and train metrics, history, config, timings). A diverged run writes
``diverged.json`` instead. Rerunning an unfinished run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from atoms.aip import AIP, load_aip
from atoms.batches import DataSplit, ShardBatches, TensorBatches, read_rows
from atoms.checkpoint import (
    find_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    step_folder,
    write_checkpoint,
)
from atoms.config import from_dict, require, to_dict
from atoms.errors import InputError, TrainingDiverged
from atoms.evaluation import evaluate
from atoms.io import atomic_path, code_version
from atoms.sae import SAEConfig, SparseAutoencoder, build_sae
from atoms.sae_io import save_sae
from atoms.training import TrainConfig, Trainer, train_epochs

METRICS = "metrics.json"
DIVERGED = "diverged.json"


@dataclass
class RunConfig:
    data: str
    """Shard folder of one (site, layer): ``<root>/<site>/layer_<l>``."""
    out: str = "results/train/run"
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
    """'auto' (``<data>/aip.safetensors`` when present), 'none', or a path."""
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
        return Path(self.job.run.out)

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

    def metadata(self) -> dict:
        return {"data": str(self.split.folder), "holdout_shards": self.job.run.holdout_shards}


def _aip_path(run: RunConfig) -> Path | None:
    if run.aip == "none":
        return None
    if run.aip == "auto":
        path = Path(run.data) / "aip.safetensors"
        return path if path.exists() else None
    if not Path(run.aip).exists():
        raise InputError(f"run.aip: {run.aip} does not exist")
    return Path(run.aip)


def prepare(job: TrainJob) -> Prepared:
    """Check the job against its shard set (width, shard counts, batch split) and fix the
    input scale s (E‖s·x‖² = 1 on up to 16k training rows) so every executor uses the same."""
    run = job.run
    split = DataSplit.of(run.data, run.holdout_shards)
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
    return Prepared(job, split, sae_cfg, _aip_path(run), scale)


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
    """The metrics of a finished run in ``out`` (None when it has not finished)."""
    path = Path(out) / METRICS
    return json.loads(path.read_text()) if path.exists() else None


def write_final(prep: Prepared, sae: SparseAutoencoder, trainer_state, metrics: dict,
                timings: dict) -> Path:
    """``out/sae`` then ``out/metrics.json`` (last, so its presence means finished)."""
    out = prep.out
    sae_dir = save_sae(sae, out / "sae", prep.metadata())
    record = {
        "status": "finished", "step": trainer_state.step, "sae_path": str(sae_dir),
        **metrics, "resampled": trainer_state.resampled, "timings": timings,
        "resumed_from": trainer_state.resumed_from,
        "history": trainer_state.history, "evals": trainer_state.evals,
        "config": {"run": to_dict(prep.job.run), "sae": to_dict(prep.sae_cfg),
                   "train": to_dict(prep.job.train)},
        "input_scale": prep.input_scale, "aip": str(prep.aip_path) if prep.aip_path else None,
        "code_version": code_version(),
    }
    with atomic_path(out / METRICS) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return out / METRICS


def write_diverged(out, error: TrainingDiverged, last_checkpoint: str | None) -> str:
    """Record a divergence; returns the message naming the last good checkpoint."""
    msg = f"{error} — last good checkpoint: {last_checkpoint or 'none'}"
    with atomic_path(Path(out) / DIVERGED) as tmp:
        tmp.write_text(json.dumps({"status": "diverged", "step": error.step, "message": msg,
                                   "last_checkpoint": last_checkpoint}))
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
    """Train in this process (resuming from ``out/checkpoints``); returns the final metrics."""
    prep = prepare(job)
    if (done := finished_metrics(prep.out)) is not None:
        return done
    run, cfg = job.run, job.train
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    ck_root = prep.out / "checkpoints"
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
    (prep.out / DIVERGED).unlink(missing_ok=True)

    def on_step(t: Trainer) -> None:
        step = t.state.step
        timer.tick(step)
        inject_fault(t, run, prep.out, last_worker=True)
        if step % prep.eval_every == 0 and step < cfg.steps:
            t.state.evals.append({"step": step, **evaluate(t.sae, holdout, aip)})
        if step % run.checkpoint_every == 0 or step == cfg.steps:
            t.flush()  # a non-finite loss stops here, before it can reach a checkpoint
            write_checkpoint(t.sae, t.state_dict(), step_folder(ck_root, step), prep.metadata())
            prune_checkpoints(ck_root, run.keep_checkpoints)

    start = time.perf_counter()
    try:
        train_epochs(trainer, source, on_step=on_step, progress=progress)
    except TrainingDiverged as e:
        last = find_checkpoints(ck_root)
        msg = write_diverged(prep.out, e, str(last[-1]) if last else None)
        raise TrainingDiverged(msg, step=e.step) from None
    seconds = time.perf_counter() - start
    train_rows = train_sample(split, run.eval_rows)
    dead = float(trainer.dead().float().mean())
    metrics = final_metrics(prep, trainer, holdout, train_rows, dead)
    write_final(prep, trainer.sae, trainer.state, metrics,
                {"train_seconds": seconds, **timer.summary(), "executor": "plain",
                 "workers": 1})
    return finished_metrics(prep.out)
