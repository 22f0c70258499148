"""Train one SAE on an activation shard set, in this process or with Ray Train.

    python experiments/train.py --config experiments/configs/train/smollm2-135m-layer5-4h.yaml
        [--executor ray --workers 2] [--out DIR_OR_URI]

Rerunning resumes an unfinished run from its last checkpoint; a finished run is reported as is.
``--out`` (or run.out) may be a storage URI (s3://bucket/prefix?…): checked writable first, then
checkpoints, the SAE and metrics.json are published there.
Prints the final metrics and where the SAE (SAELens layout) and metrics.json are.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from atoms.core.cli import config_parser, run
from atoms.core.config import load_yaml
from atoms.store.storage import Storage, redact
from atoms.train.job import TrainJob
from atoms.train.run import train_local
from atoms.train.run_folder import METRICS, RunFolder

CONFIGS = Path(__file__).with_name("configs")
DEFAULT_TRAIN_CONFIG = CONFIGS / "train" / "smollm2-135m-layer5-4h.yaml"
SHOWN = ("eval_r2_euclid_centred", "train_r2_euclid_centred", "eval_l0_mean",
         "eval_dead_fraction", "train_dead_fraction", "eval_threshold_mean",
         "eval_threshold_moved")


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__.splitlines()[0], DEFAULT_TRAIN_CONFIG, TrainJob)
    parser.add_argument("--executor", choices=["plain", "ray"], default=None)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    job = load_yaml(TrainJob, args.config)
    changes = {k: v for k, v in (("out", None if args.out is None else str(args.out)),
                                 ("executor", args.executor)) if v is not None}
    job.run = dataclasses.replace(job.run, **changes)
    if args.workers is not None:
        job.ray = dataclasses.replace(job.ray, workers=args.workers)
    Storage(job.run.out).check_writable("out")  # leaves nothing behind
    if job.run.executor == "ray":
        from atoms.train.ray_train import train_ray

        metrics = train_ray(job, progress=not args.quiet)
    else:
        metrics = train_local(job, progress=not args.quiet)
    for key in SHOWN:
        if key in metrics:
            print(f"{key:>26}: {metrics[key]:.4f}")
    print(f"SAE (SAELens layout): {redact(metrics['sae_path'])}")
    print(f"metrics: {RunFolder(job.run.out).show(METRICS)}")


if __name__ == "__main__":
    sys.exit(run(main))
