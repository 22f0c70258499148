"""A study's plan: its cells and trials, the sizes checked before any work, what is left to run.

A *cell* fixes (family, |D|, |M|, seed); its *samples* differ only in the sparsity coefficient,
gridded or proposed by Optuna. Every trial has a key that names its row file, so a rerun of the
same study knows exactly which trials are finished.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from atoms.core.config import to_dict
from atoms.core.errors import ConfigError
from atoms.extract.shards import Manifest
from atoms.store.results import ROWS, ResultStore
from atoms.store.storage import Storage, redact_all
from atoms.study.config import GEOMETRY_FAMILY, StudyConfig
from atoms.train.batches import split_rows

SEARCHED = (*GEOMETRY_FAMILY.values(), "relu")
"""Families whose sparsity coefficient is searched (gridded or by Optuna)."""
TRAINED = (*SEARCHED, "topk", "batchtopk")
"""Families that train an SAE."""


@dataclass(frozen=True)
class Trial:
    """One unit of work; ``key`` names its row file and its folder."""

    key: str
    cell: str
    family: str
    index: int = 0
    d_sae: int = 0
    """|D| as a latent count (0: not applicable)."""
    train_rows: int = 0
    seed: int = 0
    sparsity_coeff: float | None = None
    """λ; None until Optuna proposes it."""
    name: str = ""
    path: str = ""
    k: int = 0
    """TopK's k, or the exemplar control's OMP sparsity K (0: not applicable)."""


@dataclass(frozen=True)
class SearchSpace:
    """How a trained family's sparsity coefficient is chosen in each cell."""

    search: str
    """'grid', 'optuna' or 'control' (one run steered to the target L0 from values[0])."""
    values: tuple[float, ...]
    """The gridded sparsity_coeff values."""
    low: float
    high: float
    """Optuna's log-uniform range."""
    samples: int


def search_space(cfg: StudyConfig, family: str) -> SearchSpace:
    """The sparsity-coefficient search of a searched family (atoms in any geometry, or ReLU
    features)."""
    if family == "relu":
        b = cfg.baselines
        return SearchSpace(b.relu_search, tuple(b.relu_sparsity_coeff),
                           *b.relu_sparsity_coeff_range, cfg.sparsity.samples)
    sp = cfg.sparsity
    return SearchSpace(sp.search, tuple(sp.sparsity_coeff), *sp.sparsity_coeff_range,
                       sp.samples)


def trial_steps(cfg: StudyConfig, train_rows: int) -> int:
    """Steps of a cell: ``train.steps``, ⌈epochs·|M| / batch⌉ capped at ``max_steps``, or the
    cap ``max_steps`` of a converging cell."""
    if cfg.grid.budget == "steps":
        return cfg.train.steps
    if cfg.grid.budget == "converge":
        return cfg.grid.max_steps
    batch = min(cfg.train.batch_size, train_rows)
    return min(cfg.grid.max_steps, max(1, math.ceil(cfg.grid.epochs * train_rows / batch)))


def _lam(v: float) -> str:
    return f"{v:.3g}".replace("+", "")


def _samples(family: str, n: int, m: int, seed: int, space: SearchSpace
             ) -> dict[str, list[Trial]]:
    """One trained cell: its gridded λ values, or ``samples`` Optuna samples (λ None)."""
    cell = f"{family}-D{n}-M{m}-s{seed}"
    if space.search == "control":
        return {cell: [Trial(f"{cell}-ctl", cell, family, 0, n, m, seed, space.values[0])]}
    if space.search == "grid":
        return {cell: [Trial(f"{cell}-l{_lam(v)}", cell, family, i, n, m, seed, v)
                       for i, v in enumerate(space.values)]}
    return {cell: [Trial(f"{cell}-opt{i}", cell, family, i, n, m, seed)
                   for i in range(space.samples)]}


def cells(cfg: StudyConfig, h: int) -> dict[str, list[Trial]]:
    """Every cell of the study with its trials (λ None for Optuna samples)."""
    out: dict[str, list[Trial]] = {}
    grid, base = cfg.grid, cfg.baselines
    atoms, relu = search_space(cfg, "tsae"), search_space(cfg, "relu")
    for seed in grid.seeds:
        for n in grid.latents(h):
            for geometry in grid.geometries:
                for m in grid.train_rows:
                    out.update(_samples(GEOMETRY_FAMILY[geometry], n, m, seed, atoms))
            if base.relu:
                for m in base.relu_train_rows or [max(grid.train_rows)]:
                    out.update(_samples("relu", n, m, seed, relu))
            for family, ks in (("topk", base.topk_k), ("batchtopk", base.batchtopk_k)):
                for k in ks:
                    for m in base.topk_train_rows or [max(grid.train_rows)]:
                        cell = f"{family}-k{k}-D{n}-M{m}-s{seed}"
                        out[cell] = [Trial(cell, cell, family, 0, n, m, seed, 0.0, k=k)]
            for k in base.exemplar_k:
                for m in grid.train_rows:
                    cell = f"exemplar-k{k}-D{n}-M{m}-s{seed}"
                    out[cell] = [Trial(cell, cell, "exemplar", 0, n, m, seed, k=k)]
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
    wanted = max([*cfg.grid.train_rows, *cfg.baselines.relu_train_rows,
                  *cfg.baselines.topk_train_rows])
    if wanted > train_rows:
        raise ConfigError(f"grid.train_rows: |M| = {wanted} but {where} has {train_rows} "
                          "training rows")
    need = cfg.data.validation_rows + cfg.data.test_rows
    if need > holdout_rows:
        raise ConfigError(f"data.validation_rows + data.test_rows: {need} held-out rows asked "
                          f"for but {where} holds out {holdout_rows}")


def planned_split(cfg: StudyConfig) -> tuple[int, int] | None:
    """(training rows, held-out rows) the extraction will give, assuming the corpus is long
    enough: the |M| check runs on this before any work, then again on the real shards. None
    for fact prompts (counterfact), whose count only the extraction knows."""
    ex = cfg.data.extract
    if ex.corpus_format == "counterfact":
        return None
    windows = ex.max_tokens // ex.context_len
    per_window = {"all": ex.context_len, "last": 1,
                  "no_bos": ex.context_len - int(ex.prepend_bos)}[ex.positions]
    shards = -(-windows // ex.windows_per_shard)
    if cfg.data.holdout_shards >= shards:
        return 0, 0
    held_windows = windows - (shards - cfg.data.holdout_shards) * ex.windows_per_shard
    return (windows - held_windows) * per_window, held_windows * per_window


def check_against_manifest(cfg: StudyConfig, manifest: Manifest, where: str) -> None:
    """|M|, the held-out sizes and the grid against an existing shard set."""
    check_scale(cfg, *split_rows(manifest, cfg.data.holdout_shards, where), where)
    cells(cfg, manifest.d)


def pending_trials(cfg: StudyConfig, h: int, store: ResultStore):
    """(pending trials by cell, finished Optuna samples by cell as (λ, objective), total
    trials)."""
    finished = store.finished()
    todo_by_cell, done = {}, {}
    plan_cells = cells(cfg, h)
    for cell, trials in plan_cells.items():
        todo = [t for t in trials if t.key not in finished]
        if todo:
            todo_by_cell[cell] = todo
        done[cell] = [(float(f["sparsity_coeff"].iloc[0]), float(f["objective"].iloc[0]))
                      for t in trials if t.family in SEARCHED and t.sparsity_coeff is None
                      and (f := finished.get(t.key)) is not None]
    total = sum(len(t) for t in plan_cells.values())
    return todo_by_cell, done, total


def describe_plan(cfg: StudyConfig, h: int) -> str:
    """The plan as text: per family its cells, trials, steps per trial and training rows, then
    the totals (what ``experiments/scaling.py --dry-run`` prints)."""
    plan = cells(cfg, h)
    lines = [f"study {cfg.name}: H = {h}, |D| = {cfg.grid.latents(h)}, "
             f"|M| = {cfg.grid.train_rows}, seeds {cfg.grid.seeds}",
             f"{'family':<18}{'cells':>7}{'trials':>8}{'steps/trial':>13}{'rows/step':>11}"]
    total_trials = total_steps = 0
    for family in dict.fromkeys(t.family for ts in plan.values() for t in ts):
        trials = [t for ts in plan.values() for t in ts if t.family == family]
        steps = sorted({trial_steps(cfg, t.train_rows) for t in trials}) \
            if family in TRAINED else [0]
        batch = min(cfg.train.batch_size, max(t.train_rows for t in trials)) \
            if family in TRAINED else 0
        n_cells = len({t.cell for t in trials})
        span = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"
        if family in TRAINED and cfg.grid.budget == "converge":
            span = f"≤{span}"
        lines.append(f"{family:<18}{n_cells:>7}{len(trials):>8}{span:>13}{batch:>11}")
        total_trials += len(trials)
        total_steps += sum(trial_steps(cfg, t.train_rows) for t in trials) \
            if family in TRAINED else 0
    cap = " at most" if cfg.grid.budget == "converge" else ""
    lines.append(f"total: {total_trials} trials,{cap} {total_steps:,} training steps; sparsity "
                 f"search '{cfg.sparsity.search}', target L0 {cfg.sparsity.target_l0:g}")
    return "\n".join(lines)


def write_plan(cfg: StudyConfig, todo: dict[str, list[Trial]], total: int) -> None:
    """``<out>/study.json``: the config (secrets redacted), the trial count, what is pending."""
    Storage(cfg.out).write_json("study.json", {
        "config": redact_all(to_dict(cfg)), "trials": total,
        "pending": [dataclasses.asdict(t) for v in todo.values() for t in v]})


RESULT_SECTIONS = ("data", "sparsity", "sae", "train", "baselines", "eval", "grid")
"""Config sections a finished trial's numbers depend on."""
GRID_CAN_GROW = ("d_sae_over_h", "train_rows", "seeds", "geometries")
"""Grid lists a resumed study may extend: new cells, finished ones untouched."""


def check_resume(cfg: StudyConfig, store: ResultStore) -> None:
    """Refuse to add to ``<out>`` when its finished trials were made under other settings (the
    config in its ``study.json``): one line naming the first field that changed."""
    storage = Storage(cfg.out)
    if not storage.exists("study.json") or not store.storage.files(ROWS, "*.parquet"):
        return
    before = storage.read_json("study.json").get("config", {})
    now, defaults = redact_all(to_dict(cfg)), to_dict(StudyConfig())
    for section in RESULT_SECTIONS:
        old, new = dict(before.get(section) or {}), dict(now.get(section) or {})
        if section == "grid":
            for key in GRID_CAN_GROW:
                old.pop(key, None), new.pop(key, None)
        change = _first_change(old, new, section, defaults.get(section))
        if change:
            key, was, is_now = change
            now_says = ("the config no longer has that field" if is_now is ABSENT
                        else f"the config now says {is_now!r}")
            raise ConfigError(f"{storage.show('study.json')}: its finished trials were made with "
                              f"{key} = {was!r}, {now_says}; use another out: or remove the "
                              "folder")


ABSENT = object()
"""A recorded field the config no longer has (renamed or removed)."""
RECORDED_BEFORE = {"train.pre_act_coeff": 0.0}
"""What a recorded config without the field did, where that is not the field's default now."""


def _first_change(old, new, where: str, default=None):
    """(dotted key, old, new) of the first difference between two config trees, or None; a
    key the old tree lacks (a field newer than it) counts as what it did then
    (``RECORDED_BEFORE``), else as its default; one the new tree lacks is ``ABSENT``."""
    if isinstance(old, dict) and isinstance(new, dict):
        default = default if isinstance(default, dict) else {}
        for key in dict.fromkeys([*old, *new]):
            dotted = f"{where}.{key}"
            was = old[key] if key in old else RECORDED_BEFORE.get(dotted, default.get(key))
            change = _first_change(was, new.get(key, ABSENT), dotted, default.get(key))
            if change:
                return change
        return None
    same = old == new or (new is ABSENT and old is None)
    return None if same else (where, old, new)
