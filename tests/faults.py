"""Faults injected through a training run's step hooks (``train_local``/``train_ray`` ``hooks``).

Pass them to Ray workers by value: ``ray.cloudpickle.register_pickle_by_value(tests.faults)``
happens on import, so a worker need not import this module.
"""

import os
import sys
from pathlib import Path

import torch

FAULT_MARKER = ".fault_injected"


class NaNAt:
    """Write a NaN into W_enc once the trainer has taken ``step`` steps."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, trainer) -> None:
        if trainer.state.step == self.step:
            with torch.no_grad():
                trainer.sae.W_enc[0, 0] = float("nan")


class KillOnce:
    """After ``step`` steps, end the last worker once (``marker`` records that it happened):
    its process exits (a Ray worker, restarted by Ray Train) or, in-process, it raises."""

    def __init__(self, step: int, out: Path, exit_process: bool):
        self.step, self.marker, self.exit_process = step, Path(out) / FAULT_MARKER, exit_process

    def __call__(self, trainer) -> None:
        sync = trainer.sync
        if trainer.state.step != self.step or sync.rank != sync.world - 1:
            return
        if self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        if self.exit_process:
            os._exit(1)  # the worker process dies; Ray Train restarts the group
        raise RuntimeError(f"injected failure at step {self.step}")


def _register_by_value() -> None:
    try:
        import ray.cloudpickle
    except ImportError:
        return
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


_register_by_value()
