"""The scaling study's config and its trials: |D| × |M| × seed cells, each with sparsity samples.

A *cell* fixes (family, |D|, |M|, seed); its *samples* differ only in the sparsity coefficient λ,
gridded or proposed by Optuna. Every trial has a key that names its row file, so a rerun of the
same study knows exactly which trials are finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from atoms.core.config import require
from atoms.core.errors import ConfigError
from atoms.extract.extraction import ExtractConfig
from atoms.train.run import RunConfig
from atoms.train.loop import TrainConfig
from atoms.evaluate.unit_eval import UnitEvalConfig

FAMILIES = ("tsae", "relu", "neurons", "random", "pretrained")
UNIT_SET = {"tsae": ("atoms", "atoms"), "relu": ("relu_features", "features"),
            "neurons": ("neurons", "neurons"), "random": ("random", "random")}
"""family → (unit-set name, unit kind) in result rows; pretrained SAEs use their own name."""


@dataclass
class StudyData:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """How to extract the activations (one site, one layer); skipped when ``shards`` is set."""
    shards: str = ""
    """An existing shard folder (``<root>/<site>/layer_<l>``) to use instead of extracting."""
    holdout_shards: int = 1
    """The last this-many shards (later documents) are held out."""
    validation_rows: int = 2048
    """Held-out rows that pick λ (the Optuna objective)."""
    test_rows: int = 4096
    """Further held-out rows on which every reported metric is measured."""
    aip_floor: float = 1e-6
    """Eigenvalue floor (relative to λ_max) when fitting S̃ for the study."""

    def __post_init__(self):
        require(len(self.extract.sites) == 1 and len(self.extract.layers) == 1, "data.extract",
                "a study covers one site and one layer (list exactly one of each)")
        require(self.holdout_shards >= 1, "data.holdout_shards", "must be at least 1")
        require(self.validation_rows >= 1, "data.validation_rows", "must be positive")
        require(self.test_rows >= 1, "data.test_rows", "must be positive")


@dataclass
class Grid:
    d_sae: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """Dictionary sizes |D|: multiples of H (``d_sae_unit: H``) or latent counts."""
    d_sae_unit: Literal["H", "latents"] = "H"
    train_rows: list[int] = field(default_factory=lambda: [4096, 16384, 65536])
    """Data scales |M|: training rows, the first this-many of the training shards."""
    seeds: list[int] = field(default_factory=lambda: [0])
    budget: Literal["steps", "epochs"] = "steps"
    """Equal optimiser steps per cell (``train.steps``) or equal passes over |M| (``epochs``)."""
    epochs: float = 10.0
    max_steps: int = 100000
    """Cap on steps when ``budget: epochs``."""

    def __post_init__(self):
        for name in ("d_sae", "train_rows", "seeds"):
            require(len(getattr(self, name)) > 0, f"grid.{name}", "is empty: list at least one")
        require(all(v > 0 for v in self.d_sae), "grid.d_sae", "every size must be positive")
        require(all(m >= 1 for m in self.train_rows), "grid.train_rows", "must be positive")
        require(self.epochs > 0, "grid.epochs", "must be positive")
        require(self.max_steps >= 1, "grid.max_steps", "must be positive")

    def latents(self, h: int) -> list[int]:
        return sorted({latent_count(v, self.d_sae_unit, h) for v in self.d_sae})


def latent_count(value: float, unit: str, h: int) -> int:
    n = round(value * h) if unit == "H" else int(value)
    if n < 1 or (unit == "latents" and value != int(value)):
        raise ConfigError(f"grid.d_sae: {value} does not give a whole positive number of latents")
    return n


@dataclass
class Sparsity:
    search: Literal["grid", "optuna"] = "optuna"
    values: list[float] = field(default_factory=lambda: [3e-4])
    """λ values when ``search: grid``."""
    low: float = 1e-5
    high: float = 1e-2
    """Optuna: λ log-uniform in [low, high]."""
    samples: int = 3
    """Optuna: λ samples per cell."""
    target_l0: float = 64.0
    """The objective: (1 − R²_val) + max(0, ln(L0_val / target_l0)), i.e. the best held-out
    fit whose mean L0 stays within the target."""

    def __post_init__(self):
        if self.search == "grid":
            require(len(self.values) > 0, "sparsity.values", "is empty: list at least one λ")
            require(all(v >= 0 for v in self.values), "sparsity.values", "must be ≥ 0")
        require(0 < self.low < self.high, "sparsity.low", "need 0 < low < high")
        require(self.samples >= 1, "sparsity.samples", "must be at least 1")
        require(self.target_l0 > 0, "sparsity.target_l0", "must be positive")

    @property
    def per_cell(self) -> int:
        return len(self.values) if self.search == "grid" else self.samples


@dataclass
class PretrainedSAE:
    name: str
    path: str
    """Any layout ``atoms.units.load_unit_set`` reads (SAELens, sparsify, Gemma/Llama Scope)."""


@dataclass
class Baselines:
    neurons: bool = True
    random: bool = True
    """Random unit directions at every |D| of the grid (codes: OMP with K = eval.random_k)."""
    relu: bool = True
    """ReLU + L1 SAEs ('features') at every |D|, trained like the atoms."""
    relu_train_rows: list[int] = field(default_factory=list)
    """|M| values for the ReLU SAEs (default: the largest of the grid)."""
    relu_search: Literal["grid", "optuna"] = "grid"
    """ReLU λ: the ``relu_l1`` grid, or Optuna in [relu_low, relu_high] with the atoms'
    objective and ``sparsity.samples`` samples per cell (features at comparable sparsity)."""
    relu_l1: list[float] = field(default_factory=lambda: [3e-3])
    """L1 coefficients of the ReLU SAEs when ``relu_search: grid``."""
    relu_low: float = 1e-3
    relu_high: float = 0.3
    pretrained: list[PretrainedSAE] = field(default_factory=list)

    def __post_init__(self):
        require(not self.relu or self.relu_search == "optuna" or len(self.relu_l1) > 0,
                "baselines.relu_l1", "is empty")
        require(0 < self.relu_low < self.relu_high, "baselines.relu_low", "need 0 < low < high")


@dataclass
class Execution:
    trial_executor: Literal["plain", "ray"] = "plain"
    """A plain process per trial (CPU), or a Ray Train run per trial (GPUs)."""
    cpus_per_trial: float = 1.0
    max_concurrent: int = 0
    """Trials at once (0: as many as the CPUs allow)."""
    workers: int = 1
    """Ray Train workers per trial (trial_executor: ray)."""
    use_gpu: bool = False
    retries: int = 1
    """Tune retries a failed trial this many times (it resumes from its checkpoint)."""

    def __post_init__(self):
        require(self.cpus_per_trial > 0, "execution.cpus_per_trial", "must be positive")
        require(self.max_concurrent >= 0, "execution.max_concurrent", "must be ≥ 0")
        require(self.workers >= 1, "execution.workers", "must be at least 1")


@dataclass
class StudyConfig:
    name: str = "study"
    out: str = "results/scaling/study"
    data: StudyData = field(default_factory=StudyData)
    grid: Grid = field(default_factory=Grid)
    sparsity: Sparsity = field(default_factory=Sparsity)
    sae: dict = field(default_factory=dict)
    """SAEConfig fields shared by every trained SAE (bandwidth, decoder_norm, …)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Shared training settings; per trial the seed, λ and (for ``budget: epochs``) steps vary."""
    baselines: Baselines = field(default_factory=Baselines)
    eval: UnitEvalConfig = field(default_factory=UnitEvalConfig)
    execution: Execution = field(default_factory=Execution)
    checkpoint_every: int = 500

    def __post_init__(self):
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty word")
        for bad in ("d_in", "d_sae", "kind", "seed"):
            require(bad not in self.sae, f"sae.{bad}", "is set by the study, not the config")


@dataclass(frozen=True)
class Trial:
    """One unit of work; ``key`` names its row file and its folder."""

    key: str
    cell: str
    family: str
    index: int = 0
    d_sae: int = 0
    train_rows: int = 0
    seed: int = 0
    coeff: float | None = None
    """λ; None until Optuna proposes it."""
    name: str = ""
    path: str = ""


def trial_steps(cfg: StudyConfig, train_rows: int) -> int:
    """Steps of a cell: ``train.steps``, or ⌈epochs·|M| / batch⌉ capped at ``max_steps``."""
    if cfg.grid.budget == "steps":
        return cfg.train.steps
    batch = min(cfg.train.batch_size, train_rows)
    return min(cfg.grid.max_steps, max(1, math.ceil(cfg.grid.epochs * train_rows / batch)))


def _lam(v: float) -> str:
    return f"{v:.3g}".replace("+", "")


def _samples(family: str, n: int, m: int, seed: int, search: str, values: list[float],
             samples: int) -> dict[str, list[Trial]]:
    """One trained cell: its gridded λ values, or ``samples`` Optuna samples (λ None)."""
    cell = f"{family}-D{n}-M{m}-s{seed}"
    if search == "grid":
        return {cell: [Trial(f"{cell}-l{_lam(v)}", cell, family, i, n, m, seed, v)
                       for i, v in enumerate(values)]}
    return {cell: [Trial(f"{cell}-opt{i}", cell, family, i, n, m, seed)
                   for i in range(samples)]}


def search_of(cfg: StudyConfig, family: str) -> tuple[str, float, float]:
    """(search, low, high) of λ for a trained family."""
    if family == "relu":
        b = cfg.baselines
        return b.relu_search, b.relu_low, b.relu_high
    return cfg.sparsity.search, cfg.sparsity.low, cfg.sparsity.high


def cells(cfg: StudyConfig, h: int) -> dict[str, list[Trial]]:
    """Every cell of the study with its trials (λ None for Optuna samples)."""
    out: dict[str, list[Trial]] = {}
    grid, sp, base = cfg.grid, cfg.sparsity, cfg.baselines
    for seed in grid.seeds:
        for n in grid.latents(h):
            for m in grid.train_rows:
                out.update(_samples("tsae", n, m, seed, sp.search, sp.values, sp.samples))
            if base.relu:
                for m in base.relu_train_rows or [max(grid.train_rows)]:
                    out.update(_samples("relu", n, m, seed, base.relu_search, base.relu_l1,
                                        sp.samples))
            if base.random:
                cell = f"random-D{n}-s{seed}"
                out[cell] = [Trial(cell, cell, "random", 0, n, 0, seed)]
    if base.neurons:
        out["neurons"] = [Trial("neurons", "neurons", "neurons", 0, h)]
    for p in base.pretrained:
        cell = f"pretrained-{p.name}"
        out[cell] = [Trial(cell, cell, "pretrained", name=p.name, path=p.path)]
    return out


def check_scale(cfg: StudyConfig, train_rows: int, holdout_rows: int, where: str) -> None:
    """|M| and the held-out sizes against the rows available (before any training)."""
    wanted = max([*cfg.grid.train_rows, *cfg.baselines.relu_train_rows])
    if wanted > train_rows:
        raise ConfigError(f"grid.train_rows: |M| = {wanted} but {where} has {train_rows} "
                          "training rows")
    need = cfg.data.validation_rows + cfg.data.test_rows
    if need > holdout_rows:
        raise ConfigError(f"data.validation_rows + data.test_rows: {need} held-out rows asked "
                          f"for but {where} holds out {holdout_rows}")


def run_config(cfg: StudyConfig, folder: str, trial_out: str, train_rows: int,
               threads: int) -> RunConfig:
    """The training run of one trial: |M| rows, final evaluation only."""
    ex = cfg.execution
    return RunConfig(
        data=folder, out=trial_out, holdout_shards=cfg.data.holdout_shards,
        eval_rows=cfg.data.validation_rows, eval_every=10**9,
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=1, aip="auto",
        executor=ex.trial_executor, workers=ex.workers, use_gpu=ex.use_gpu,
        train_rows=train_rows, torch_threads=threads)
