"""Wall time of a study's trials through Ray Tune vs the same trials one after another.

    python -m benchmarks.sweep [--trials-per-cell 1]

Both run the identical trials (gridded λ, fixed seeds) on a synthetic shard set: first in this
process one after another with torch using every core, then through Ray Tune, one trial per CPU
with one thread each (Ray started beforehand; its start-up is reported apart). Goal: Tune no
slower than sequential.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from atoms.aip.fit import layer_aip_uri
from atoms.aip.metric import AIP, SecondMoment, save_aip
from atoms.core.config import from_dict
from atoms.extract.shards import ShardSet
from atoms.store.ray_env import ensure_ray, stop_ray
from atoms.study.config import StudyConfig
from atoms.study.plan import cells
from atoms.study.ray_sweep import run_sweep
from atoms.study.setup import context
from atoms.study.trial import execute_trial
from atoms.train.batches import read_rows
from benchmarks.common import record
from tests.shardsets import synthetic_shard_set


def study(folder: Path, out: Path, lambdas: list[float]) -> StudyConfig:
    cfg = from_dict(StudyConfig, {
        "name": "bench", "out": str(out),
        "data": {"shards": str(folder), "holdout_shards": 1, "validation_rows": 1024,
                 "test_rows": 2048},
        "grid": {"d_sae_over_h": [1, 2, 4], "train_rows": [4096, 16384], "seeds": [0]},
        "sparsity": {"search": "grid", "sparsity_coeff": lambdas},
        "sae": {"bandwidth": 0.05, "init_threshold": 0.05},
        "train": {"steps": 300, "batch_size": 512, "lr_warmup_steps": 10,
                  "sparsity_warmup_steps": 50},
        "baselines": {"relu_sparsity_coeff": [1e-3]},
        "eval": {"sparsity_rows": 2048, "local_rows": 256, "recovery_rows": 4, "random_k": 4},
        "execution": {"cpus_per_trial": 1}, "checkpoint_every": 100})
    cfg.out = str(Path(cfg.out).resolve())
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials-per-cell", type=int, default=1, help="λ values per cell")
    args = parser.parse_args(argv)
    lambdas = [10 ** (-3 - 0.5 * i) for i in range(args.trials_per_cell)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic_shard_set(Path(tmp) / "acts", d=256, n_atoms=1024, rows=40960,
                                     shards=8)
        s = ShardSet.open(folder)
        x = read_rows(s.paths, s.d, 40960)
        aip_path = save_aip(AIP.from_moment(SecondMoment(s.d).update(x)), layer_aip_uri(folder))

        seq_cfg = study(folder, Path(tmp) / "sequential", lambdas)
        ctx = context(seq_cfg, folder, aip_path)
        ctx.threads = os.cpu_count() or 1
        trials = [t for ts in cells(seq_cfg, ctx.h).values() for t in ts]
        t0 = time.perf_counter()
        for trial in trials:
            execute_trial(ctx, trial)
        sequential = time.perf_counter() - t0

        t0 = time.perf_counter()
        ensure_ray(progress=False)
        ray_start = time.perf_counter() - t0
        tune_cfg = study(folder, Path(tmp) / "tune", lambdas)
        tune_ctx = context(tune_cfg, folder, aip_path)
        t0 = time.perf_counter()
        failed = run_sweep(tune_ctx, cells(tune_cfg, tune_ctx.h), {}, progress=False)
        tuned = time.perf_counter() - t0
        stop_ray()
        if failed:
            raise SystemExit(f"trials failed under Tune: {failed}")

    rows = [["sequential, one process", f"{torch.get_num_threads()} threads", f"{sequential:.1f}",
             "1.00"],
            ["Ray Tune", "1 trial per CPU, 1 thread each", f"{tuned:.1f}",
             f"{sequential / tuned:.2f}"]]
    record("Study sweep: Ray Tune vs sequential (benchmarks/sweep.py)",
           ["executor", "parallelism", "wall s", "speed-up vs sequential"], rows,
           f"{len(trials)} trials (TSAE |D| ∈ {{1,2,4}}·H × |M| ∈ {{4096, 16384}} × "
           f"{len(lambdas)} λ, ReLU, random, neurons), d = 256, 300 steps × 512 rows each. "
           f"Ray start-up {ray_start:.1f} s, not included. Goal: Tune ≥ 1.00.")


if __name__ == "__main__":
    main()
