"""The scaling study: atoms vs features vs neurons, and R² over dictionary size × data scale.

    python experiments/scaling.py [--config experiments/configs/scaling/smollm2-135m-demo.yaml]
    ray job submit -- python experiments/scaling.py --config ...      # on a Ray cluster

From one YAML config: extract (or reuse) one layer's activations, fit the AIP S̃, then run every
trial of the grid |D| × |M| × seed × λ (λ gridded or proposed by Optuna) plus the baselines
(neurons, random directions, ReLU-L1 features, imported SAEs) through Ray Tune. Each finished
trial writes its rows to <out>/rows/; a rerun skips finished trials and does the rest. Ends
with <out>/results.parquet, <out>/summary.md, top-activating contexts with offline judge scores
(<out>/monosemanticity/) and <out>/report.html (+ report.md).

``out``, ``data.extract.out`` and ``data.shards`` may be storage URIs (s3://bucket/prefix, …;
see atoms.store.storage), so every node of a cluster reads and writes the same place; an unwritable
one fails before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from analysis.monosemanticity import run_harness
from analysis.report import REPORT_FILES, build_report
from analysis.summary import summarise
from atoms.train.batches import DataSplit, read_rows, split_rows
from atoms.core.config import to_dict
from atoms.extract.ray_extract import ensure_ray, run_extraction
from atoms.core.errors import AtomsError, ConfigError
from atoms.core.io import code_version
from atoms.store.results import MONOSEMANTICITY, ResultStore, publish_results, pull_results
from atoms.extract.shard_store import layer_rel, load_layer_manifest, local_layer
from atoms.extract.shards import load_manifest
from atoms.store.storage import Storage, is_remote, redact, redact_all
from atoms.study.config import StudyConfig, Trial, cells, check_scale
from atoms.study.ray_sweep import run_sweep
from atoms.study.trial import StudyContext
from experiments.common import CONFIGS, config_parser, load_config, run
from experiments.data_config import AIPFitConfig
from experiments.fit_aip import fit_layer_aip

DEFAULT_CONFIG = CONFIGS / "scaling" / "smollm2-135m-demo.yaml"


class StudyIncomplete(AtomsError):
    """Some trials failed; their rows are missing until a rerun completes them."""


def planned_split(cfg: StudyConfig) -> tuple[int, int]:
    """(training rows, held-out rows) the extraction will give, assuming the corpus is long
    enough: the |M| check runs on this before any work, then again on the real shards."""
    ex = cfg.data.extract
    windows = ex.max_tokens // ex.context_len
    per_window = {"all": ex.context_len, "last": 1,
                  "no_bos": ex.context_len - int(ex.prepend_bos)}[ex.positions]
    shards = -(-windows // ex.windows_per_shard)
    if cfg.data.holdout_shards >= shards:
        return 0, 0
    held_windows = windows - (shards - cfg.data.holdout_shards) * ex.windows_per_shard
    return (windows - held_windows) * per_window, held_windows * per_window


def _layer(ex) -> str:
    return layer_rel(ex.sites[0], ex.layers[0])


def shard_folder(cfg: StudyConfig, progress: bool) -> str:
    """The study's shard folder (path or URI): given, or extracted now (finished shards are
    kept)."""
    if cfg.data.shards:
        return cfg.data.shards
    ex = cfg.data.extract
    run_extraction(ex, progress=progress)
    return Storage(ex.out).uri_of(_layer(ex))


def ensure_aip(cfg: StudyConfig, folder: str, progress: bool) -> str:
    """``<folder>/aip.safetensors`` (path or URI), fitted from every shard (uncentred) when
    missing."""
    store = Storage(folder)
    if store.size("aip.safetensors") is None:
        _, aip, rows = fit_layer_aip(folder, AIPFitConfig(floor=cfg.data.aip_floor), progress)
        print(f"fitted S̃ on {rows} rows (condition number {aip.condition_number:.3g})")
    return store.uri_of("aip.safetensors")


def context(cfg: StudyConfig, folder: str, aip_path: str) -> StudyContext:
    local = local_layer(folder)  # a URI's shards come to this node's mirror
    split = DataSplit.of(local, cfg.data.holdout_shards)  # every sha256 checked
    check_scale(cfg, split.train_rows, split.holdout_rows, redact(folder))
    held = read_rows(split.holdout, split.d, cfg.data.validation_rows + cfg.data.test_rows)
    manifest = load_manifest(local)
    meta = {"model": manifest.model, "revision": manifest.revision, "site": manifest.site,
            "layer": manifest.layer, "positions": manifest.positions,
            "data_folder": redact(Storage(folder).uri), "code_version": code_version(),
            "study_config": json.dumps(redact_all(to_dict(cfg)), sort_keys=True)}
    threads = max(1, int(cfg.execution.cpus_per_trial))
    return StudyContext(cfg, Storage(folder).uri, split.d, Storage(aip_path).uri,
                        held[: cfg.data.validation_rows].clone(),
                        held[cfg.data.validation_rows:].clone(), meta, threads)


def plan(cfg: StudyConfig, h: int, store: ResultStore):
    """(pending trials by cell, finished Optuna samples by cell as (λ, objective), counts)."""
    finished = store.finished()
    pending, done = {}, {}
    plan_cells = cells(cfg, h)
    for cell, trials in plan_cells.items():
        todo = [t for t in trials if t.key not in finished]
        if todo:
            pending[cell] = todo
        done[cell] = [(float(f["sparsity_coeff"].iloc[0]), float(f["objective"].iloc[0]))
                      for t in trials if t.family in ("tsae", "relu") and t.coeff is None
                      and (f := finished.get(t.key)) is not None]
    total = sum(len(t) for t in plan_cells.values())
    return pending, done, total


def write_plan(cfg: StudyConfig, pending: dict[str, list[Trial]], total: int) -> None:
    Storage(cfg.out).write_json("study.json", {
        "config": redact_all(to_dict(cfg)), "trials": total,
        "pending": [dataclasses.asdict(t) for v in pending.values() for t in v]})


def precheck(cfg: StudyConfig) -> None:
    """Every check that needs no model and no Ray: the output (and extraction) storage is
    writable, |M| and held-out sizes against the rows that exist (or that the extraction will
    give), and the grid against H."""
    Storage(cfg.out).check_writable("out")
    for p in cfg.baselines.pretrained:
        if not Storage(p.path).exists():
            raise ConfigError(f"baselines.pretrained: {p.name}: {redact(p.path)} does not exist")
    ex = cfg.data.extract
    if not cfg.data.shards:
        Storage(ex.out).check_writable("data.extract.out")
    folder = cfg.data.shards or Storage(ex.out).uri_of(_layer(ex))
    if cfg.data.shards or Storage(folder).exists("manifest.json"):
        manifest = load_layer_manifest(folder)  # a stored one is read, not its shards
        where = redact(folder)
        check_scale(cfg, *split_rows(manifest, cfg.data.holdout_shards, where), where)
        cells(cfg, manifest.d)
    else:
        train, held = planned_split(cfg)
        check_scale(cfg, train, held, f"data.extract (max_tokens={ex.max_tokens})")


def finish(cfg: StudyConfig, store: ResultStore) -> tuple[str, Path, Path, Path]:
    """results.parquet, summary.md, monosemanticity/ and the report, built in a local folder
    (``out`` itself, or its node mirror) and published to ``out`` when it is a URI."""
    table_path, table = store.write_table()
    local = pull_results(cfg.out)
    summary_path = summarise(table, local)
    print(summary_path.read_text())
    print(f"monosemanticity (offline heuristic judge): {run_harness(local)}", flush=True)
    report_html, report_md = build_report(local)
    if is_remote(cfg.out):
        publish_results(local, cfg.out, (summary_path.name, MONOSEMANTICITY, *REPORT_FILES))
        print(f"published to {redact(cfg.out)}")
    return table_path, summary_path, report_html, report_md


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__.splitlines()[0], DEFAULT_CONFIG).parse_args(argv)
    cfg = load_config(StudyConfig, args)
    cfg.out = Storage(cfg.out).uri  # trials run in other working directories
    progress = not args.quiet
    start = time.perf_counter()
    precheck(cfg)
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    ensure_ray(progress=False)
    folder = shard_folder(cfg, progress)
    aip_path = ensure_aip(cfg, folder, progress)
    ctx = context(cfg, folder, aip_path)
    store = ResultStore(cfg.out)
    pending, done, total = plan(cfg, ctx.h, store)
    n_pending = sum(len(v) for v in pending.values())
    print(f"study {cfg.name}: {total} trials, {total - n_pending} finished, {n_pending} to run "
          f"(H = {ctx.h}, {redact(folder)})", flush=True)
    write_plan(cfg, pending, total)
    failed = run_sweep(ctx, pending, done, progress=progress)
    table_path, summary_path, report_html, report_md = finish(cfg, store)
    print(f"results: {redact(table_path)}\nsummary: {summary_path}\nreport: {report_html}\n"
          f"markdown: {report_md}\nwall time {time.perf_counter() - start:.0f} s")
    if failed:
        raise StudyIncomplete(f"{len(failed)} trials failed ({', '.join(failed[:5])}); rerun "
                              "the same command to retry them")


if __name__ == "__main__":
    sys.exit(run(main))
