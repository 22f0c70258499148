"""Ray Tune glue for a study: a searcher over cells, each cell's λ gridded or from Optuna.

``CellSearcher`` walks the cells round-robin (costliest first). A gridded cell hands out its
fixed λ values; an Optuna cell asks its own ``OptunaSearch`` (seeded per cell, warm-started with
the cell's finished samples), so Optuna tunes λ separately for every (|D|, |M|, seed).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import zlib
from collections import deque

from atoms.store.storage import Storage
from atoms.study.config import StudyConfig
from atoms.study.plan import Trial, search_space
from atoms.study.trial import StudyContext, execute_trial

METRIC, MODE = "objective", "min"


def _cost(trial: Trial) -> float:
    return float(trial.d_sae or 1) * float(trial.train_rows or 1)


def optuna_searcher(cell: str, low: float, high: float, samples: int,
                    done: list[tuple[float, float]]):
    """An OptunaSearch over λ ∈ [low, high] (log scale), told the cell's finished samples."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=zlib.crc32(cell.encode()),
                                         n_startup_trials=max(1, samples // 3))
    space = {"sparsity_coeff": optuna.distributions.FloatDistribution(low, high, log=True)}
    return OptunaSearch(space=space, metric=METRIC, mode=MODE, sampler=sampler,
                        points_to_evaluate=[{"sparsity_coeff": c} for c, _ in done] or None,
                        evaluated_rewards=[r for _, r in done] or None)


def make_searcher(pending: dict[str, list[Trial]], cfg: StudyConfig,
                  done: dict[str, list[tuple[float, float]]]):
    """A Tune Searcher handing out every pending trial once (see module docstring)."""
    from ray.tune.search import Searcher

    class CellSearcher(Searcher):
        def __init__(self):
            super().__init__(metric=METRIC, mode=MODE)
            order = sorted(pending, key=lambda c: -max(_cost(t) for t in pending[c]))
            self.queues = {c: deque(pending[c]) for c in order}
            self.optuna = {}
            self.owner: dict[str, str] = {}

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def _next_cell(self) -> str | None:
            for cell, queue in self.queues.items():
                if queue:
                    self.queues[cell] = self.queues.pop(cell)  # to the back: round-robin
                    return cell
            return None

        def suggest(self, trial_id: str):
            cell = self._next_cell()
            if cell is None:
                return Searcher.FINISHED
            trial = self.queues[cell].popleft()
            if trial.sparsity_coeff is None:
                if cell not in self.optuna:
                    space = search_space(cfg, trial.family)
                    self.optuna[cell] = optuna_searcher(cell, space.low, space.high,
                                                        space.samples, done.get(cell, []))
                coeff = self.optuna[cell].suggest(trial_id)["sparsity_coeff"]
                trial = dataclasses.replace(trial, sparsity_coeff=float(coeff))
                self.owner[trial_id] = cell
            return {"trial": dataclasses.asdict(trial)}

        def save(self, checkpoint_path: str) -> None:
            """Nothing to save: the row files are the study's state (see ``plan``)."""

        def restore(self, checkpoint_path: str) -> None:
            """Nothing to restore: a rerun rebuilds the plan from the row files."""

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
            cell = self.owner.pop(trial_id, None)
            if cell is not None:
                self.optuna[cell].on_trial_complete(trial_id, result, error)

    return CellSearcher()


def _trainable(config: dict, ctx: StudyContext | None = None) -> None:
    from ray import tune

    tune.report(execute_trial(ctx, Trial(**config["trial"])))


def _progress_callback(total: int, progress: bool):
    from ray.tune import Callback
    from tqdm.auto import tqdm

    class Progress(Callback):
        def __init__(self):
            self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not progress,
                            file=sys.stdout)
            self.failed: list[str] = []

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.bar.update(1)
            self.bar.set_postfix_str(trial.config["trial"]["key"])

        def on_trial_error(self, iteration, trials, trial, **info):
            self.bar.update(1)
            self.failed.append(trial.config["trial"]["key"])

    return Progress()


def run_sweep(ctx: StudyContext, pending: dict[str, list[Trial]],
              done: dict[str, list[tuple[float, float]]], progress: bool = True) -> list[str]:
    """Run every pending trial through Ray Tune; returns the keys of trials that failed."""
    import ray
    from ray import tune

    total = sum(len(v) for v in pending.values())
    if total == 0:
        return []
    ex = ctx.cfg.execution
    cpus = ray.cluster_resources().get("CPU", 1.0)
    per_trial = 0.5 if ex.trial_executor == "ray" else ex.cpus_per_trial
    concurrent = ex.max_concurrent or max(1, int(cpus // ex.cpus_per_trial))
    callback = _progress_callback(total, progress)
    out = Storage(ctx.cfg.out)  # Tune's experiment state beside the rows, local or stored
    trainable = tune.with_resources(tune.with_parameters(_trainable, ctx=ctx),
                                    {"cpu": per_trial, "gpu": 0})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(pending, ctx.cfg, done), num_samples=total,
            max_concurrent_trials=concurrent, metric=METRIC, mode=MODE, reuse_actors=True,
            trial_dirname_creator=lambda t: t.config["trial"]["key"]),
        run_config=tune.RunConfig(
            name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=out.path("tune"), storage_filesystem=out.fs, verbose=0,
            failure_config=tune.FailureConfig(max_failures=ex.retries),
            callbacks=[callback]),
    )
    tuner.fit()
    callback.bar.close()
    return callback.failed
