"""Training throughput: the plain loop vs Ray Train (1 and 2 workers) vs the matmul ceiling.

    python benchmarks/train.py [--quick]

All runs train the same threshold SAE (B=4096, d=576 → N=2304, SmolLM2's 4H) on the same
synthetic shard set. Steady rows/s is measured inside the training process from its 5th step
to its last (start-up excluded); Ray Train's fixed overhead is fit() wall time minus the steps at
that rate. GFLOP/s counts 10·B·d·N per step. Goals: plain ≥ 0.60 of the fp32 matmul ceiling
(measured in this process, before and after); Ray Train within 15% of the plain loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from atoms.core.config import from_dict
from atoms.train.job import TrainJob
from atoms.train.ray_train import train_ray
from atoms.train.run import train_local
from benchmarks.common import matmul_gflops, record
from tests.shardsets import write_shard_set

B, D, N = 4096, 576, 2304


def job(data: Path, out: Path, steps: int, ray: dict | None = None, **run) -> TrainJob:
    return from_dict(TrainJob, {
        "run": {"data": str(data), "out": str(out), "eval_rows": 1024, "checkpoint_every": steps,
                "keep_checkpoints": 1, **run},
        "ray": ray or {},
        "sae": {"d_sae": N, "bandwidth": 0.01, "init_threshold": 0.01},
        "train": {"steps": steps, "batch_size": B, "lr_warmup_steps": 5, "log_every": 10},
    })


def timed(fn) -> tuple[dict, float]:
    start = time.perf_counter()
    metrics = fn()
    return metrics, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    steps = 20 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((steps + 2) * B, D, generator=gen)  # one epoch covers every step
        data = write_shard_set(tmp / "shards", x, 8)  # 7 training shards + 1 held out
        del x
        ceilings = [matmul_gflops(B, D, N)]
        runs = {
            "plain loop (2 threads)": lambda: train_local(
                job(data, tmp / "plain", steps, torch_threads=2), progress=False),
            "Ray Train, 1 worker (1 CPU, 2 threads)": lambda: train_ray(job(
                data, tmp / "ray1", steps, executor="ray", torch_threads=2,
                ray={"workers": 1, "cpus_per_worker": 1.0}), progress=False),
            "Ray Train, 2 workers (0.5 CPU, 1 thread each)": lambda: train_ray(job(
                data, tmp / "ray2", steps, executor="ray", torch_threads=1,
                ray={"workers": 2, "cpus_per_worker": 0.5}), progress=False),
        }
        results = {name: timed(fn) for name, fn in runs.items()}
        ceilings.append(matmul_gflops(B, D, N))
    ceiling = max(ceilings)
    plain_rate = results["plain loop (2 threads)"][0]["timings"]["steady_rows_per_s"]
    rows = []
    for name, (metrics, wall) in results.items():
        t = metrics["timings"]
        rate = t["steady_rows_per_s"]
        gflops = 10 * D * N * rate / 1e9
        overhead = t.get("fit_seconds", wall) - steps * B / rate
        rows.append([name, f"{rate:,.0f}", f"{gflops:.1f}", f"{gflops / ceiling:.2f}",
                     f"{rate / plain_rate:.2f}", f"{wall:.1f}", f"{overhead:.1f}"])
    record("SAE training throughput (benchmarks/train.py)",
           ["executor", "steady rows/s", "GFLOP/s", "fraction of ceiling", "vs plain loop",
            "wall s", "fixed overhead s"], rows,
           notes=f"B={B} d={D} N={N}, {steps} steps, fp32; matmul ceiling {ceiling:.1f} GFLOP/s "
                 f"(max of before/after: {', '.join(f'{c:.1f}' for c in ceilings)}). Goals: plain "
                 "≥ 0.60 of the ceiling; Ray Train ≥ 0.85 of the plain loop past start-up.")


if __name__ == "__main__":
    main()
