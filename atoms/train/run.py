"""One SAE training run on a shard set: its config, its checks, and the plain executor.

A run folder ``out`` holds ``checkpoints/step_*`` (plain) or ``ray/`` (Ray Train), and, once
finished, ``sae/`` (the final SAE, SAELens layout, input scaling folded) and ``metrics.json``
(final held-out and train metrics, history, config, timings). A diverged run writes
``diverged.json`` instead. Rerunning an unfinished run resumes from its last checkpoint.

``out`` (and ``data``) may be storage URIs (``atoms.store.storage``): training then works in the
node's mirror of ``out`` and publishes each checkpoint, the final SAE and ``metrics.json`` to the
store as they are written (``atoms.train.run_folder``), so the run resumes on any node. The
job is ``atoms.train.job.TrainJob``; ``hooks`` (run after every step) are how tests inject
faults.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from atoms.aip.fit import AIP_CENTRED_FILE, AIP_FILE, load_aip_once
from atoms.aip.metric import AIP, Whitening
from atoms.core.config import to_dict
from atoms.core.errors import InputError, TrainingDiverged
from atoms.core.io import code_version
from atoms.evaluate.evaluator import evaluate_sae
from atoms.extract.shard_store import local_layer
from atoms.extract.shards import load_manifest
from atoms.sae.model import SAEConfig, SparseAutoencoder, build_sae, input_scale
from atoms.sae.saelens import save_sae
from atoms.store.storage import Storage, is_remote, mirror_path, pull_file, redact, redact_all
from atoms.train.batches import (
    DataSplit,
    ShardBatches,
    TensorBatches,
    fits_in_memory,
    held_out_rows,
    in_geometry,
    read_rows,
)
from atoms.train.checkpoint import load_checkpoint
from atoms.train.job import RunSettings, TrainJob
from atoms.train.loop import Checkpointer, Hook, Trainer, train_epochs
from atoms.train.run_folder import DIVERGED, METRICS, RunFolder


@dataclasses.dataclass
class Prepared:
    """A job checked against its data, before any training."""

    job: TrainJob
    split: DataSplit
    sae_cfg: SAEConfig
    aip_path: Path | None
    input_scale: float
    whitening: Whitening | None = None
    """The map to the training geometry (geometry 'aip'), fixed once for every executor."""

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
        if self.whitening is not None:
            sae.set_whitening(self.whitening)
        sae.input_scale.fill_(self.input_scale)
        if self.aip_path is not None:
            sae.set_metric(self.aip())
        return sae

    def aip(self) -> AIP | None:
        return load_aip_once(self.aip_path)[0] if self.aip_path is not None else None

    def evaluator(self, holdout: torch.Tensor):
        """Held-out metrics of an SAE during training (the AIP ones when S̃ is known)."""
        aip = self.aip()
        return lambda sae: evaluate_sae(sae, holdout, aip)

    def aip_source(self) -> str | None:
        """Where the AIP came from, as recorded: its path, or its stored URI (redacted)."""
        run = self.job.run
        if self.aip_path is None or not (is_remote(run.aip) or is_remote(run.data)):
            return str(self.aip_path) if self.aip_path else None
        return redact(run.aip) if is_remote(run.aip) else Storage(run.data).show(AIP_FILE)

    def metadata(self) -> dict:
        """SAELens's metadata of every checkpoint and the final SAE: where it attaches (model,
        hook, context size, dataset; from the shards' manifest) and the data it trained on."""
        data = redact(self.job.run.data) if is_remote(self.job.run.data) else str(self.split.folder)
        return {**load_manifest(self.split.folder).sae_metadata(), "data": data,
                "holdout_shards": self.job.run.holdout_shards}

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


def _aip_path(run: RunSettings, data: Path) -> Path | None:
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
    if job.sae.d_in is not None:
        split.check_d(job.sae.d_in)
    seed = job.sae.seed if job.sae.seed is not None else job.train.seed
    sae_cfg = dataclasses.replace(job.sae, d_in=split.d, seed=seed)
    workers = job.workers
    if job.train.batch_size % workers:
        raise InputError(f"train.batch_size: {job.train.batch_size} does not split evenly "
                         f"over ray.workers={workers}")
    if len(split.train) < workers:
        raise InputError(f"{split.folder}: {len(split.train)} training shards for {workers} "
                         "workers; each needs at least one")
    if job.train.batch_size // workers > split.train_rows // workers:
        raise InputError(f"train.batch_size: {job.train.batch_size} is more than the "
                         f"{split.train_rows} training rows in {split.folder}")
    aip_path = _aip_path(run, split.folder)
    whitening = _whitening(sae_cfg, aip_path, split.folder)
    sample = train_sample(split, 16384)
    if whitening is not None:
        sample = whitening.apply(sample.double())
    return Prepared(job, split, sae_cfg, aip_path, input_scale(sample), whitening)


def _whitening(cfg: SAEConfig, aip_path: Path | None, folder: Path) -> Whitening | None:
    """Geometry 'aip': the map of the run's S̃ (uncentred) or of the layer's centred Cov⁻¹."""
    if cfg.geometry != "aip":
        return None
    if cfg.whitening == "centred":  # beside the run's S̃ (its source's layer), else the shards
        path = folder / AIP_CENTRED_FILE
        if aip_path is not None and (Path(aip_path).parent / AIP_CENTRED_FILE).exists():
            path = Path(aip_path).parent / AIP_CENTRED_FILE
        if not path.exists():
            raise InputError(f"sae.whitening: 'centred' needs {path} (fit it with "
                             "experiments/fit_aip.py and aip.centred: true)")
    elif aip_path is None:
        raise InputError(f"sae.geometry: 'aip' needs S̃ ({folder / AIP_FILE} or run.aip)")
    else:
        path = aip_path
    return Whitening.of(load_aip_once(path)[0])


class StepTimer:
    """Steady-state throughput: rows/s between the ``warmup``-th step after (re)start and the
    last, so start-up (process, data pipeline, first allocations) is excluded. A step hook."""

    def __init__(self, batch_size: int, warmup: int = 5):
        self.batch_size, self.warmup, self.ticks = batch_size, warmup, 0
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def __call__(self, trainer: Trainer) -> None:
        self.ticks += 1
        step = trainer.state.step
        if self.ticks == self.warmup:
            self.first = (step, time.perf_counter())
        elif self.ticks > self.warmup:
            self.last = (step, time.perf_counter())

    def summary(self) -> dict:
        if self.first is None or self.last is None:
            return {}
        steps, seconds = self.last[0] - self.first[0], self.last[1] - self.first[1]
        return {"steady_steps": steps, "steady_rows_per_s": steps * self.batch_size / seconds}


def train_sample(split: DataSplit, rows: int) -> torch.Tensor:
    """Training rows for train-R²: spread over the shards, or the first rows of a split
    limited to |M| rows (so the sample never reaches past what was trained on)."""
    if split.row_limit:
        return read_rows(split.train, split.d, min(rows, split.row_limit))
    return read_rows(split.train[:: max(1, len(split.train) // 4)], split.d, rows)


def finished_metrics(out) -> dict | None:
    """The metrics of a finished run in ``out``, a path or URI (None when it has not finished)."""
    return RunFolder(out).finished_metrics()


def write_final(prep: Prepared, sae: SparseAutoencoder, trainer_state, metrics: dict,
                timings: dict) -> Path:
    """``out/sae`` then ``out/metrics.json`` (last, so its presence means finished); for a
    remote ``out`` both are written locally, then published in that order, and ``sae_path``
    is the stored URI of ``sae/``. Returns the local metrics.json."""
    folder = prep.folder()
    sae_dir = save_sae(sae.inference_form(), folder.local / "sae", prep.metadata())
    folder.publish_folder(sae_dir)
    record = {
        "status": "finished", "step": trainer_state.step,
        "converged_at": trainer_state.converged_at,
        "threshold_scale": trainer_state.threshold_scale,
        "sae_path": folder.uri_of("sae") if folder.remote else str(sae_dir),
        **metrics, "resampled": trainer_state.resampled, "timings": timings,
        "resumed_from": trainer_state.resumed_from,
        "history": trainer_state.history, "evals": trainer_state.evals,
        "config": {"run": redact_all(to_dict(prep.job.run)), "sae": to_dict(prep.sae_cfg),
                   "train": to_dict(prep.job.train), "ray": to_dict(prep.job.ray)},
        "input_scale": prep.input_scale, "aip": prep.aip_source(),
        "code_version": code_version(),
    }
    return folder.write_json(METRICS, record)


def final_metrics(prep: Prepared, trainer: Trainer, holdout: torch.Tensor,
                  train_rows: torch.Tensor, train_dead_fraction: float) -> dict:
    """Held-out (eval_*) and train-sample (train_*) metrics of the trained SAE, in the form
    that is saved (``inference_form``)."""
    aip, sae = prep.aip(), trainer.sae.inference_form()
    start = trainer.state.threshold_start
    return {**evaluate_sae(sae, holdout, aip, prefix="eval_", threshold_start=start),
            **evaluate_sae(sae, train_rows, aip, prefix="train_"),
            "train_dead_fraction": train_dead_fraction}


def train_local(job: TrainJob, progress: bool = True, hooks: Iterable[Hook] = ()) -> dict:
    """Train in this process (resuming from ``out/checkpoints``, the stored ones when ``out``
    is remote); returns the final metrics. ``hooks`` run after every step."""
    prep = prepare(job)
    if (done := finished_metrics(job.run.out)) is not None:
        return done
    run, cfg = job.run, job.train
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    folder = prep.folder()
    newest = folder.newest_checkpoint()
    if newest is not None:
        sae, payload = load_checkpoint(newest, expect=prep.sae_cfg)
        trainer = Trainer(sae, cfg)
        trainer.load_state_dict(payload)
    else:
        trainer = Trainer(prep.new_sae(), cfg)
    split = prep.split
    if fits_in_memory(split.train_rows, split.d, run.in_memory_gb):
        source = TensorBatches(read_rows(split.train, split.d, split.train_rows),
                               cfg.batch_size, cfg.seed)
    else:
        source = ShardBatches(split.train, split.d, cfg.batch_size, cfg.seed,
                              shuffle_rows=run.shuffle_rows)
    source = in_geometry(source, prep.whitening)
    holdout = held_out_rows(split, run.eval_rows, run.eval_pool)
    if cfg.target_l0:
        trainer.set_l0_probe(holdout)
    timer, meta = StepTimer(cfg.batch_size), prep.metadata()
    folder.delete(DIVERGED)
    checkpointer = Checkpointer(
        lambda t: folder.save_checkpoint(t.sae, t.state_dict(), meta, run.keep_checkpoints),
        run.checkpoint_every)
    start = time.perf_counter()
    try:
        train_epochs(trainer, source, evaluator=prep.evaluator(holdout),
                     eval_every=prep.eval_every, checkpointer=checkpointer,
                     hooks=(timer, *hooks), progress=progress)
    except TrainingDiverged as e:
        last = folder.newest_checkpoint(pull=False)  # what this run published last
        shown = folder.show(last.relative_to(folder.local).as_posix()) if last else None
        msg = folder.write_diverged(e, shown)
        raise TrainingDiverged(msg, step=e.step) from None
    seconds = time.perf_counter() - start
    train_rows = train_sample(split, run.eval_rows)
    dead = float(trainer.dead().float().mean())
    metrics = final_metrics(prep, trainer, holdout, train_rows, dead)
    write_final(prep, trainer.sae, trainer.state, metrics,
                {"train_seconds": seconds, **timer.summary(), "executor": "plain",
                 "workers": 1})
    return finished_metrics(run.out)
