"""The scaling study's config: one YAML, validated when it loads, every field typed.

A study covers one (model, site, layer): its data (``data``), the grid |D| × |M| × seed
(``grid``), how the sparsity coefficient is chosen per cell (``sparsity``), the SAE and the
schedule shared by every trained cell (``sae``, ``train``), the baselines, the evaluation sample
sizes and the execution. Quantities keep one name from YAML to result column:
``sparsity_coeff`` (λ), ``d_sae`` (a latent count) and ``d_sae_over_h`` (a multiple of H).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from atoms.core.config import require
from atoms.core.errors import ConfigError
from atoms.evaluate.evaluator import UnitEvalConfig
from atoms.extract.extraction import ExtractConfig
from atoms.sae.model import SAEConfig
from atoms.train.loop import TrainConfig

GEOMETRY_FAMILY = {"euclidean": "tsae", "aip": "tsae_aip", "aip_centred": "tsae_aip_centred"}
"""grid.geometries → the threshold-SAE family trained in that geometry."""
FAMILIES = (*GEOMETRY_FAMILY.values(), "relu", "topk", "batchtopk", "neurons", "random",
            "exemplar", "pretrained")
UNIT_SET = {"tsae": ("atoms", "atoms"), "tsae_aip": ("atoms_aip", "atoms"),
            "tsae_aip_centred": ("jumprelu_centred_whitening", "features"),
            "relu": ("relu_features", "features"), "topk": ("topk_features", "features"),
            "batchtopk": ("batchtopk_features", "features"),
            "neurons": ("neurons", "neurons"), "random": ("random", "random"),
            "exemplar": ("exemplar", "exemplar")}
"""family → (unit-set name, unit kind) in result rows; pretrained SAEs use their own name,
exemplar sets add their K (``exemplar_k1``)."""
FAMILY_GEOMETRY = {"tsae": ("euclidean", "uncentred"), "tsae_aip": ("aip", "uncentred"),
                   "tsae_aip_centred": ("aip", "centred")}
"""A threshold-SAE family's (sae.geometry, sae.whitening)."""


@dataclass
class StudyAIP:
    """How the study's S̃ is fitted: from which rows, leaving which out."""

    source: ExtractConfig | None = None
    """Fit S̃ on another corpus than the training rows (the paper: Wikipedia documents; cap
    them with ``max_documents`` or ``max_tokens``), extracted into ``source.out``. Its model,
    revision, dtype, site and layer are always ``data.extract``'s. Unset: the training rows."""
    exclude: list[Literal["bos", "sinks"]] = field(default_factory=list)
    """Rows left out of E[mmᵀ]: BOS rows, and attention-sink rows of norm above
    ``sink_factor`` × the median (``atoms.aip.ray_moment.RowFilter``)."""
    sink_factor: float = 10.0

    def __post_init__(self):
        require(self.sink_factor > 1, "sink_factor", f"must be > 1, got {self.sink_factor}")


@dataclass
class StudyData:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """How to extract the activations (one site, one layer); skipped when ``shards`` is set."""
    shards: str = ""
    """An existing shard folder (``<root>/<site>/layer_<l>``) to use instead of extracting."""
    holdout_shards: int = 1
    """The last this-many shards (later documents) are held out."""
    validation_rows: int = 2048
    """Held-out rows that pick λ (the Optuna objective) and steer it (``search: control``)."""
    test_rows: int = 4096
    """Further held-out rows on which every reported metric is measured. Both are drawn by one
    seeded permutation of the first validation_rows + test_rows held-out rows, so they are two
    random samples of the same held-out documents."""
    aip_floor: float = 1e-6
    """Eigenvalue floor (relative to λ_max) when fitting S̃ for the study."""
    aip: StudyAIP = field(default_factory=StudyAIP)

    def __post_init__(self):
        require(len(self.extract.sites) == 1 and len(self.extract.layers) == 1, "extract",
                "a study covers one site and one layer (list exactly one of each)")
        require(self.holdout_shards >= 1, "holdout_shards", "must be at least 1")
        require(self.validation_rows >= 1, "validation_rows", "must be positive")
        require(self.test_rows >= 1, "test_rows", "must be positive")
        require(self.aip.source is None or not self.shards, "aip.source",
                "needs data.extract (its model, site and layer), not data.shards")
        if self.aip.source is not None:
            ex = self.extract
            self.aip.source = dataclasses.replace(
                self.aip.source, model=ex.model, revision=ex.revision, dtype=ex.dtype,
                sites=list(ex.sites), layers=list(ex.layers))
            require(self.aip.source.out != ex.out, "aip.source.out",
                    "must differ from data.extract.out")


@dataclass
class Grid:
    d_sae_over_h: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """Dictionary sizes |D| as multiples of H (used unless ``d_sae`` is given)."""
    d_sae: list[int] = field(default_factory=list)
    """Dictionary sizes |D| as latent counts (instead of ``d_sae_over_h``)."""
    train_rows: list[int] = field(default_factory=lambda: [4096, 16384, 65536])
    """Data scales |M|: training rows, the first this-many of the training shards."""
    seeds: list[int] = field(default_factory=lambda: [0])
    geometries: list[Literal["euclidean", "aip", "aip_centred"]] = field(
        default_factory=lambda: ["euclidean"])
    """The atoms' training geometries, each a family of its own at every cell: 'euclidean'
    (atoms), 'aip' (atoms_aip: loss ‖m − m̂‖²_S̃, unit AIP atoms, the paper's uncentred S̃) and
    'aip_centred' (the peers' centred covariance whitening, a control)."""
    budget: Literal["steps", "epochs", "converge"] = "steps"
    """Equal optimiser steps per cell (``train.steps``), equal passes over |M| (``epochs``), or
    every cell trained until converged (``converge``: ``train.converge_window`` and
    ``converge_tol``, capped at ``max_steps``; rows record ``converged`` and the steps taken)."""
    epochs: float = 10.0
    max_steps: int = 100000
    """Cap on steps when ``budget`` is ``epochs`` or ``converge``."""

    def __post_init__(self):
        sizes = "d_sae" if self.d_sae else "d_sae_over_h"
        for name in (sizes, "train_rows", "seeds"):
            require(len(getattr(self, name)) > 0, name, "is empty: list at least one")
        require(all(v > 0 for v in self.d_sae_over_h), "d_sae_over_h",
                "every size must be positive")
        require(all(n >= 1 for n in self.d_sae), "d_sae", "every latent count must be ≥ 1")
        require(all(m >= 1 for m in self.train_rows), "train_rows", "must be positive")
        require(len(self.geometries) > 0 and len(set(self.geometries)) == len(self.geometries),
                "geometries", f"must list distinct geometries, got {self.geometries}")
        require(self.epochs > 0, "epochs", "must be positive")
        require(self.max_steps >= 1, "max_steps", "must be positive")

    def latents(self, h: int) -> list[int]:
        """|D| as latent counts for activations of width ``h``."""
        if self.d_sae:
            return sorted(set(self.d_sae))
        return sorted({latent_count(v, h) for v in self.d_sae_over_h})


def latent_count(d_sae_over_h: float, h: int) -> int:
    n = round(d_sae_over_h * h)
    if n < 1:
        raise ConfigError(f"grid.d_sae_over_h: {d_sae_over_h}·H = {d_sae_over_h * h:g} "
                          "is less than one latent")
    return n


def _coeff_range(values: list[float], field: str) -> None:
    require(len(values) == 2 and 0 < values[0] < values[1], field,
            f"expected [low, high] with 0 < low < high, got {values}")


@dataclass
class Sparsity:
    search: Literal["grid", "optuna", "control"] = "optuna"
    """How each cell's sparsity coefficient is chosen: every value of ``sparsity_coeff``,
    ``samples`` Optuna proposals in ``sparsity_coeff_range``, or one run whose λ (starting at
    ``sparsity_coeff[0]``) is steered to hit ``target_l0`` (``train.target_l0``)."""
    sparsity_coeff: list[float] = field(default_factory=lambda: [3e-4])
    """λ values when ``search: grid``."""
    sparsity_coeff_range: list[float] = field(default_factory=lambda: [1e-5, 1e-2])
    """Optuna: λ log-uniform in [low, high]."""
    samples: int = 3
    """Optuna: λ samples per cell."""
    target_l0: float = 64.0
    """The objective: (1 − R²_val) + max(0, ln(L0_val / target_l0)), i.e. the best held-out
    fit whose mean L0 stays within the target."""

    def __post_init__(self):
        if self.search in ("grid", "control"):
            require(len(self.sparsity_coeff) > 0, "sparsity_coeff", "is empty: list at least one")
            require(all(v >= 0 for v in self.sparsity_coeff), "sparsity_coeff", "must be ≥ 0")
        require(self.search != "control" or self.sparsity_coeff[0] > 0, "sparsity_coeff",
                "search 'control' starts from sparsity_coeff[0], which must be positive")
        _coeff_range(self.sparsity_coeff_range, "sparsity_coeff_range")
        require(self.samples >= 1, "samples", "must be at least 1")
        require(self.target_l0 > 0, "target_l0", "must be positive")

    @property
    def per_cell(self) -> int:
        return len(self.sparsity_coeff) if self.search == "grid" else self.samples


@dataclass
class PretrainedSAE:
    name: str
    """The unit set's name in result rows."""
    path: str
    """Any layout ``atoms.evaluate.units.load_unit_set`` reads (SAELens, sparsify,
    Gemma/Llama Scope)."""


@dataclass
class Baselines:
    neurons: bool = True
    random: bool = True
    """Random unit directions at every |D| of the grid (codes: OMP with K = eval.random_k)."""
    relu: bool = True
    """ReLU + L1 SAEs ('features') at every |D|, trained like the atoms."""
    relu_train_rows: list[int] = field(default_factory=list)
    """|M| values for the ReLU SAEs (default: the largest of the grid)."""
    relu_search: Literal["grid", "optuna", "control"] = "grid"
    """The ReLU SAEs' sparsity coefficient (their L1 weight): every ``relu_sparsity_coeff``,
    Optuna in ``relu_sparsity_coeff_range`` with the atoms' objective and
    ``sparsity.samples`` samples per cell, or steered from ``relu_sparsity_coeff[0]`` to
    ``sparsity.target_l0`` (features at the atoms' sparsity)."""
    relu_sparsity_coeff: list[float] = field(default_factory=lambda: [3e-3])
    """The ReLU SAEs' λ values when ``relu_search: grid``."""
    relu_sparsity_coeff_range: list[float] = field(default_factory=lambda: [1e-3, 0.3])
    """Optuna: the ReLU SAEs' λ log-uniform in [low, high]."""
    topk_k: list[int] = field(default_factory=list)
    """TopK SAEs ('topk_features') at every |D| with each k listed (empty: none); trained like
    the atoms on ``topk_train_rows``. Match k to the atoms' L0."""
    batchtopk_k: list[int] = field(default_factory=list)
    """BatchTopK SAEs ('batchtopk_features', k latents per row on average; saved as the
    JumpReLU of their learned threshold) at every |D| with each k listed."""
    topk_train_rows: list[int] = field(default_factory=list)
    """|M| values for the TopK and BatchTopK SAEs (default: the largest of the grid)."""
    exemplar_k: list[int] = field(default_factory=list)
    """The exemplar control at every (|D|, |M|) of the grid, once per K listed (empty: none):
    |D| training rows of the cell as directions, K-sparse OMP codes in the AIP geometry. It
    learns nothing; a dictionary must beat it to claim more than memorisation."""
    pretrained: list[PretrainedSAE] = field(default_factory=list)
    """Imported SAEs judged as features beside the trained ones."""

    def __post_init__(self):
        require(all(k >= 1 for k in self.topk_k), "topk_k", "every k must be ≥ 1")
        require(all(k >= 1 for k in self.batchtopk_k), "batchtopk_k", "every k must be ≥ 1")
        require(all(k >= 1 for k in self.exemplar_k), "exemplar_k", "every K must be ≥ 1")
        require(not self.relu or self.relu_search == "optuna" or len(self.relu_sparsity_coeff) > 0,
                "relu_sparsity_coeff", "is empty")
        require(not self.relu or self.relu_search != "control" or self.relu_sparsity_coeff[0] > 0,
                "relu_sparsity_coeff", "relu_search 'control' starts from "
                "relu_sparsity_coeff[0], which must be positive")
        _coeff_range(self.relu_sparsity_coeff_range, "relu_sparsity_coeff_range")


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
        require(self.cpus_per_trial > 0, "cpus_per_trial", "must be positive")
        require(self.max_concurrent >= 0, "max_concurrent", "must be ≥ 0")
        require(self.workers >= 1, "workers", "must be at least 1")


@dataclass
class Monosemanticity:
    """The monosemanticity harness run at the end (``analysis.monosemanticity``)."""

    judge: str = "heuristic"
    """'heuristic' (offline, lexical), 'hf:<model>' (e.g. hf:smollm2-135m, in-process) or
    'openai:<model>' (an OpenAI-compatible endpoint): ``analysis.judges``."""
    judge_url: str | None = None
    """openai: the endpoint's base URL (unset: api.openai.com)."""
    judge_key_env: str = "OPENAI_API_KEY"
    """openai: the environment variable holding the key."""
    units: int = 16
    """Units sampled per unit set."""
    top_k: int = 8
    """Top contexts per unit (half shown to the explainer, half held out for detection)."""

    def __post_init__(self):
        kind, _, model = self.judge.partition(":")
        require(self.judge == "heuristic" or (kind in ("hf", "openai") and bool(model)),
                "judge", f"expected heuristic, hf:<model> or openai:<model>, got {self.judge!r}")
        require(self.units >= 1, "units", "must be positive")
        require(self.top_k >= 2, "top_k", "must be at least 2 (explain and detect)")


@dataclass
class StudyConfig:
    name: str = "study"
    out: str = "results/scaling/study"
    data: StudyData = field(default_factory=StudyData)
    grid: Grid = field(default_factory=Grid)
    sparsity: Sparsity = field(default_factory=Sparsity)
    sae: SAEConfig = field(default_factory=SAEConfig)
    """The SAE shared by every trained cell (bandwidth, decoder_norm, …); the study sets
    d_in, d_sae, kind and seed per trial."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Shared training settings; per trial the seed, sparsity_coeff and (for
    ``budget: epochs``) steps vary."""
    baselines: Baselines = field(default_factory=Baselines)
    eval: UnitEvalConfig = field(default_factory=UnitEvalConfig)
    execution: Execution = field(default_factory=Execution)
    monosemanticity: Monosemanticity = field(default_factory=Monosemanticity)
    checkpoint_every: int = 500

    def __post_init__(self):
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty word")
        sae = self.sae
        for name, unset in (("d_in", sae.d_in is None), ("d_sae", sae.d_sae is None),
                            ("kind", sae.kind == "threshold"), ("seed", sae.seed is None),
                            ("geometry", sae.geometry == "euclidean"),
                            ("whitening", sae.whitening == "uncentred"), ("k", sae.k == 0)):
            require(unset, f"sae.{name}", "is set by the study, not the config (see "
                    "grid.geometries and baselines.topk_k)")


