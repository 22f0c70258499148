"""What one training run is: where it reads and writes (``run``), the SAE, the schedule, and —
for the Ray Train executor only — its workers (``ray``). One YAML per run
(``experiments/configs/train/``) loads into a ``TrainJob``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from atoms.core.config import require
from atoms.sae.model import SAEConfig
from atoms.train.loop import TrainConfig


@dataclass
class RunSettings:
    data: str
    """Shard folder of one (site, layer): ``<root>/<site>/layer_<l>``; a local path or a
    storage URI (mirrored on each node that reads it)."""
    out: str = "results/train/run"
    """Run folder: a local path or a storage URI (``s3://bucket/prefix?…``)."""
    executor: Literal["plain", "ray"] = "plain"
    """This process (``plain``) or a Ray Train run (``ray``, configured by ``ray:``)."""
    holdout_shards: int = 1
    """The last this-many shards (later documents) are held out for evaluation."""
    eval_rows: int = 16384
    """Rows of held-out data (and of training data, for train R²) per evaluation."""
    eval_pool: int = 0
    """Draw the ``eval_rows`` held-out rows as the first of a seeded permutation of the first
    this-many held-out rows (0: the first ``eval_rows`` in order). A study sets it so a run's
    rows are exactly its validation rows, a random sample of the same documents as its test
    rows (``atoms.train.batches.held_out_rows``)."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: once per pass over the training rows); the
    final evaluation always runs."""
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    aip: str = "auto"
    """'auto' (the S̃ beside the shards when fitted), 'none', or a path or URI."""
    shuffle_rows: int = 65536
    """Shuffle buffer when streaming shards."""
    train_rows: int = 0
    """Train on the first this-many training rows only (0: all): the data scale |M|."""
    in_memory_gb: float = 4.0
    """Hold the training rows (each Ray worker: its share) in memory when they fit in this
    many GB; stream them from the shards otherwise."""
    torch_threads: int = 0
    """Threads per process/worker (0: leave torch's default)."""

    def __post_init__(self):
        require(self.holdout_shards >= 1, "holdout_shards", "must be at least 1")
        require(self.eval_rows >= 1, "eval_rows", "must be positive")
        require(self.eval_pool == 0 or self.eval_pool >= self.eval_rows, "eval_pool",
                f"must be 0 or ≥ eval_rows={self.eval_rows}, got {self.eval_pool}")
        require(self.eval_every >= 0, "eval_every", "must be non-negative")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be positive")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        require(self.train_rows >= 0, "train_rows", "must be non-negative (0: all rows)")


@dataclass
class RayExecutorConfig:
    """The Ray Train executor's own settings (``run.executor: ray``)."""

    workers: int = 1
    """Ray Train workers (data-parallel; the global batch is split between them)."""
    cpus_per_worker: float = 0.5
    """Fractional on small machines: Ray Data needs CPUs left over to read shards."""
    use_gpu: bool = False
    max_failures: int = 3
    """Ray Train restarts from the last checkpoint after a worker failure, this many times."""

    def __post_init__(self):
        require(self.workers >= 1, "workers", "must be at least 1")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")


@dataclass
class TrainJob:
    """What ``experiments/train.py`` reads: where (run), what (sae) and how (train)."""

    run: RunSettings
    sae: SAEConfig = field(default_factory=SAEConfig)
    """The SAE; ``d_in`` unset takes the shard set's width, ``seed`` unset the training seed."""
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayExecutorConfig = field(default_factory=RayExecutorConfig)
    """Workers of the Ray Train executor (ignored by the plain one)."""

    @property
    def workers(self) -> int:
        """Data-parallel workers of this run: 1 for the plain executor."""
        return self.ray.workers if self.run.executor == "ray" else 1
