"""Run one trial of a study: train (or load, or construct) a unit set, judge it, write its rows.

Executor-agnostic: a Ray Tune trial, the sequential benchmark and the tests all call
``execute_trial``. A trained trial keeps its run folder ``<out>/trials/<key>`` (checkpoints,
the final SAE, metrics.json), so a retried or rerun trial resumes from its last checkpoint.
``out``, the shard folder and S̃ may be storage URIs (``atoms.store.storage``): a trial on any node
reads them through its node's mirror and publishes its checkpoints and rows to the store.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from atoms.aip.fit import load_aip_once
from atoms.aip.metric import AIP
from atoms.core.config import to_dict
from atoms.core.errors import TrainingDiverged
from atoms.evaluate.evaluator import evaluate_sae, evaluate_unit_set
from atoms.evaluate.units import UnitSet
from atoms.extract.shard_store import local_layer
from atoms.sae.formats import load_any_sae
from atoms.sae.saelens import load_sae
from atoms.store.results import ResultStore
from atoms.store.storage import Storage, fetch, mirror_path, redact
from atoms.study.config import FAMILY_GEOMETRY, UNIT_SET, StudyConfig
from atoms.study.plan import SEARCHED, TRAINED, Trial, search_space, trial_steps
from atoms.train.batches import DataSplit, fits_in_memory, parquet_rows
from atoms.train.job import RayExecutorConfig, RunSettings, TrainJob
from atoms.train.run import finished_metrics, train_local, train_sample

SPEC = "trial.json"
DIVERGED_OBJECTIVE = 1e3


@dataclass
class StudyContext:
    """What every trial of a study shares (built once by the driver)."""

    cfg: StudyConfig
    folder: str
    """The shard folder of the study's (site, layer): a path or a storage URI."""
    h: int
    aip_path: str | None
    validation: torch.Tensor
    test: torch.Tensor
    meta: dict
    """model, revision, site, layer, positions, code_version: copied into every row."""
    threads: int = 1

    @property
    def out(self) -> str:
        return self.cfg.out

    def trial_out(self, key: str) -> str:
        """The run folder of trial ``key``: ``<out>/trials/<key>`` (a path or a URI)."""
        return Storage(self.out).uri_of(f"trials/{key}")

    def aip(self) -> AIP | None:
        """S̃ of the study's layer, read once per process."""
        return load_aip_once(self.aip_path)[0] if self.aip_path else None


def objective(r2_centred: float, l0_mean: float, target_l0: float) -> float:
    """(1 − R²) + max(0, ln(L0 / target)): the best fit whose mean L0 stays within target."""
    if not (math.isfinite(r2_centred) and math.isfinite(l0_mean)):
        return DIVERGED_OBJECTIVE
    return (1.0 - r2_centred) + max(0.0, math.log(max(l0_mean, 1e-12) / target_l0))


def _claim_folder(folder: str, spec: dict) -> None:
    """Keep the run folder (path or URI) only if it belongs to this exact trial (an
    interrupted Optuna sample may come back with another λ); otherwise start it afresh."""
    store = Storage(folder)
    spec = json.loads(json.dumps(spec))  # as it reads back
    if store.size(SPEC) is not None and store.read_json(SPEC) != spec:
        store.delete("")
        shutil.rmtree(mirror_path(folder), ignore_errors=True)
    if store.size(SPEC) is None:
        store.write_json(SPEC, spec)


def run_settings(ctx: StudyContext, trial: Trial) -> RunSettings:
    """The training run of one trial: |M| rows, final evaluation only."""
    cfg = ctx.cfg
    return RunSettings(
        data=ctx.folder, out=ctx.trial_out(trial.key), executor=cfg.execution.trial_executor,
        holdout_shards=cfg.data.holdout_shards, eval_rows=cfg.data.validation_rows,
        eval_pool=cfg.data.validation_rows + cfg.data.test_rows,
        eval_every=10**9, checkpoint_every=cfg.checkpoint_every, keep_checkpoints=1,
        aip=ctx.aip_path or "none", train_rows=trial.train_rows, torch_threads=ctx.threads)


def train_job(ctx: StudyContext, trial: Trial) -> TrainJob:
    cfg = ctx.cfg
    steps = trial_steps(cfg, trial.train_rows)
    controlled = trial.family in SEARCHED and search_space(cfg, trial.family).search == "control"
    train = dataclasses.replace(
        cfg.train, seed=trial.seed, sparsity_coeff=float(trial.sparsity_coeff), steps=steps,
        target_l0=cfg.sparsity.target_l0 if controlled else 0.0,
        converge=cfg.grid.budget == "converge",
        batch_size=min(cfg.train.batch_size, trial.train_rows),
        lr_warmup_steps=min(cfg.train.lr_warmup_steps, steps // 4),
        sparsity_warmup_steps=min(cfg.train.sparsity_warmup_steps, steps // 2))
    sae = dataclasses.replace(cfg.sae, d_sae=trial.d_sae, **sae_fields(trial))
    ex = cfg.execution
    ray = RayExecutorConfig(workers=ex.workers, use_gpu=ex.use_gpu)
    return TrainJob(run=run_settings(ctx, trial), sae=sae, train=train, ray=ray)


def sae_fields(trial: Trial) -> dict:
    """The SAEConfig fields a family sets: kind, its loss, geometry and whitening, TopK's k."""
    if trial.family == "relu":
        return {"kind": "relu", "sparsity_loss": "l1"}
    if trial.family in ("topk", "batchtopk"):
        return {"kind": trial.family, "sparsity_loss": "none", "k": trial.k}
    geometry, whitening = FAMILY_GEOMETRY[trial.family]
    return {"kind": "threshold", "geometry": geometry, "whitening": whitening}


def unit_set_name(trial: Trial) -> str:
    name = UNIT_SET[trial.family][0]
    return f"{name}_k{trial.k}" if trial.family == "exemplar" else name


def rows_used(split, job: TrainJob) -> int:
    """Rows trained on: exactly |M| when held in memory, the whole shard prefix when streamed."""
    if fits_in_memory(split.train_rows, split.d, job.run.in_memory_gb):
        return split.train_rows
    return parquet_rows(split.train)


def _train(ctx: StudyContext, trial: Trial) -> tuple[list[tuple], dict]:
    job = train_job(ctx, trial)
    _claim_folder(job.run.out, {"trial": dataclasses.asdict(trial),
                                "job": {"sae": to_dict(job.sae), "train": to_dict(job.train)}})
    info = {"steps": job.train.steps, "steps_cap": job.train.steps,
            "batch_size": job.train.batch_size,
            "config": {"sae": to_dict(job.sae), "train": to_dict(job.train)}}
    try:
        if job.run.executor == "ray":
            from atoms.train.ray_train import train_ray
            metrics = train_ray(job, progress=False)
        else:
            metrics = train_local(job, progress=False)
    except TrainingDiverged as e:
        return [], {**info, "status": "diverged", "message": str(e), "objective":
                    DIVERGED_OBJECTIVE}
    metrics = metrics or finished_metrics(job.run.out)
    steps = int(metrics.get("step", job.train.steps))
    info.update(steps=steps, epochs=steps * job.train.batch_size / trial.train_rows,
                converged=(metrics.get("converged_at") is not None) if job.train.converge
                else None, converged_at=metrics.get("converged_at"),
                threshold_scale=metrics.get("threshold_scale"))
    sae = load_sae(fetch(metrics["sae_path"]))
    name, kind = unit_set_name(trial), UNIT_SET[trial.family][1]
    val = evaluate_sae(sae, ctx.validation, ctx.aip(), prefix="")
    split = DataSplit.of(local_layer(ctx.folder), job.run.holdout_shards, verify=False).limit(
        trial.train_rows)  # the run verified the shards already
    info.update(
        status="finished", checkpoint_path=redact(metrics["sae_path"]),
        train_seconds=metrics["timings"].get("train_seconds"),
        target_l0=job.train.target_l0 or None,
        final_sparsity_coeff=(metrics.get("history") or [{}])[-1].get("sparsity_coeff"),
        steady_rows_per_s=metrics["timings"].get("steady_rows_per_s"),
        val_r2_euclid_centred=val["r2_euclid_centred"], val_l0_mean=val["l0_mean"],
        objective=objective(val["r2_euclid_centred"], val["l0_mean"],
                            ctx.cfg.sparsity.target_l0),
        **{k[5:]: metrics[k] for k in metrics if k.startswith("eval_threshold")},
        train_rows_used=rows_used(split, job))
    units = UnitSet.from_sae(sae, name, kind, redact(metrics["sae_path"]))
    return [(units, sae, train_sample(split, ctx.cfg.data.test_rows))], info


def cell_rows(ctx: StudyContext, train_rows: int) -> torch.Tensor:
    """The |M| training rows of a cell (the first ``train_rows`` of the training shards)."""
    split = DataSplit.of(local_layer(ctx.folder), ctx.cfg.data.holdout_shards, verify=False)
    return train_sample(split.limit(train_rows), train_rows)


def _fixed(ctx: StudyContext, trial: Trial) -> tuple[list[tuple], dict]:
    if trial.family == "neurons":
        return [(UnitSet.neurons(ctx.h), None, None)], {"status": "finished"}
    if trial.family == "random":
        units = UnitSet.random(ctx.h, trial.d_sae, seed=trial.seed)
        return [(units, None, None)], {"status": "finished"}
    if trial.family == "exemplar":
        rows = cell_rows(ctx, trial.train_rows)
        units = UnitSet.exemplar(rows, trial.d_sae, seed=trial.seed, name=unit_set_name(trial))
        return [(units, None, rows)], {"status": "finished"}
    sae, layout = load_any_sae(fetch(trial.path))
    units = UnitSet.from_sae(sae, trial.name, "features", f"{layout}:{redact(trial.path)}")
    return [(units, sae, None)], {"status": "finished", "checkpoint_path": redact(trial.path)}


def execute_trial(ctx: StudyContext, trial: Trial) -> dict:
    """Run ``trial`` and write its rows; returns {'objective', 'rows', 'status'}."""
    started, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    trained = trial.family in TRAINED
    units, info = (_train if trained else _fixed)(ctx, trial)
    aip = ctx.aip()
    geometry, whitening = FAMILY_GEOMETRY.get(trial.family, (None, None))
    base = {
        "study": ctx.cfg.name, "trial_key": trial.key, "cell": trial.cell,
        "family": trial.family, "d_sae": trial.d_sae or None, "d_sae_over_h":
        (trial.d_sae / ctx.h) if trial.d_sae else None, "train_rows": trial.train_rows or None,
        "seed": trial.seed, "sparsity_coeff": trial.sparsity_coeff, "k": trial.k or None,
        "geometry": geometry, "whitening": whitening,
        "sparsity_search": search_space(ctx.cfg, trial.family).search
        if trial.family in SEARCHED else None,
        "h": ctx.h, "aip_path": redact(ctx.aip_path) if ctx.aip_path else None,
        "r2_primary": "r2_euclid_centred", "q_star_primary": "q_star_pairwise", **ctx.meta,
        "started_at": started, "host": platform.node(), **info,
    }
    rows, store = [], ResultStore(ctx.out)
    for unit_set, sae, train_rows in units:
        metrics = evaluate_unit_set(unit_set, ctx.test, aip, ctx.cfg.eval, sae=sae,
                                    train_rows=train_rows, seed=trial.seed, random_k=trial.k
                                    or None)
        store.write_units(trial.key, unit_set.name, unit_set.directions)
        rows.append({**base, "unit_set": unit_set.name, "unit_kind": unit_set.kind,
                     "unit_source": unit_set.source, **metrics})
    if not rows:  # a diverged training still leaves a row, so the cell shows it
        rows.append({**base, "unit_set": unit_set_name(trial),
                     "unit_kind": UNIT_SET[trial.family][1]})
    wall = time.perf_counter() - t0
    for row in rows:
        row["wall_seconds"] = wall
    store.write(trial.key, rows)
    return {"objective": float(info.get("objective", 0.0)), "rows": len(rows),
            "status": info["status"]}
