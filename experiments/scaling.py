"""The scaling study: atoms vs features vs neurons, and R² over dictionary size × data scale.

    python experiments/scaling.py [--config experiments/configs/scaling/smollm2-135m-demo.yaml]
    python experiments/scaling.py --config ... --dry-run   # check and print the plan only
    ray job submit -- python experiments/scaling.py --config ...      # on a Ray cluster

From one YAML config: extract (or reuse) one layer's activations, fit the AIP S̃, then run every
trial of the grid |D| × |M| × seed × λ (λ gridded or proposed by Optuna) plus the baselines
(neurons, random directions, ReLU-L1 features, imported SAEs) through Ray Tune. Each finished
trial writes its rows to <out>/rows/; a rerun skips finished trials and does the rest. Ends
with <out>/results.parquet, <out>/summary.md, top-activating contexts with judge scores
(<out>/monosemanticity/: the offline heuristic, or an LLM judge by ``monosemanticity.judge``)
and <out>/report.html (+ report.md).

``out``, ``data.extract.out`` and ``data.shards`` may be storage URIs (s3://bucket/prefix, …;
see atoms.store.storage), so every node of a cluster reads and writes the same place; an unwritable
one fails before any work.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from analysis.judges import make_client, make_judge
from analysis.monosemanticity import run_harness
from analysis.report import REPORT_FILES, build_report
from analysis.stability import with_stability
from analysis.summary import summarise
from atoms.core.cli import config_parser, load_config, run
from atoms.core.errors import AtomsError
from atoms.store.ray_env import cluster_cpus, ensure_ray
from atoms.store.results import MONOSEMANTICITY, ResultStore, publish_results, pull_results
from atoms.store.storage import Storage, is_remote, redact
from atoms.study.config import StudyConfig
from atoms.study.plan import check_resume, describe_plan, pending_trials, write_plan
from atoms.study.ray_sweep import run_sweep
from atoms.study.setup import context, planned_width, precheck, shard_folder, study_aip

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "scaling" / "smollm2-135m-demo.yaml"


class StudyIncomplete(AtomsError):
    """Some trials failed; their rows are missing until a rerun completes them."""


def finish(cfg: StudyConfig, store: ResultStore, aip=None) -> tuple[str, Path, Path, Path]:
    """results.parquet (with cross-seed stability under S̃ ``aip``), summary.md,
    monosemanticity/ and the report, built in a local folder (``out`` itself, or its node
    mirror) and published to ``out`` when it is a URI."""
    table_path, table = store.write_table(with_stability(store.table(), store, aip))
    local = pull_results(cfg.out)
    summary_path = summarise(table, local)
    print(summary_path.read_text())
    m = cfg.monosemanticity
    judge = make_judge(m.judge, m.judge_url, m.judge_key_env)
    out = run_harness(local, m.units, m.top_k, judge, progress=True)
    print(f"monosemanticity (judge {m.judge}): {out}", flush=True)
    report_html, report_md = build_report(local)
    if is_remote(cfg.out):
        publish_results(local, cfg.out, (summary_path.name, MONOSEMANTICITY, *REPORT_FILES))
        print(f"published to {redact(cfg.out)}")
    return table_path, summary_path, report_html, report_md


def write_timing(cfg: StudyConfig, phases: dict, trials_run: int) -> None:
    """``<out>/timing.json``: this invocation's wall time by phase, the CPUs Ray had and the
    trials it ran (``benchmarks/study_efficiency.py`` reads it)."""
    Storage(cfg.out).write_json("timing.json", {
        **phases, "wall_seconds": sum(phases.values()), "trials_run": trials_run,
        "cpus": cluster_cpus()})


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__.splitlines()[0], DEFAULT_CONFIG, StudyConfig)
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, print the plan and exit (no Ray, no work)")
    args = parser.parse_args(argv)
    cfg = load_config(StudyConfig, args)
    cfg.out = Storage(cfg.out).uri  # trials run in other working directories
    progress = not args.quiet
    start = time.perf_counter()
    precheck(cfg)
    check_resume(cfg, ResultStore(cfg.out))  # before any work: a changed config is refused
    m = cfg.monosemanticity
    if m.judge.startswith("openai:"):  # an unreachable endpoint or a missing key fails now
        make_client(m.judge, m.judge_url, m.judge_key_env)
    if args.dry_run:
        print(describe_plan(cfg, planned_width(cfg)))
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    ensure_ray(progress=False)
    phases = {"start_seconds": time.perf_counter() - start}
    folder = shard_folder(cfg, progress)
    phases["extract_seconds"] = time.perf_counter() - start - sum(phases.values())
    aip_path = study_aip(cfg, folder, progress)
    ctx = context(cfg, folder, aip_path)
    phases["aip_seconds"] = time.perf_counter() - start - sum(phases.values())
    store = ResultStore(cfg.out)
    todo, done, total = pending_trials(cfg, ctx.h, store)
    n_pending = sum(len(v) for v in todo.values())
    print(f"study {cfg.name}: {total} trials, {total - n_pending} finished, {n_pending} to run "
          f"(H = {ctx.h}, {redact(folder)})", flush=True)
    write_plan(cfg, todo, total)
    failed = run_sweep(ctx, todo, done, progress=progress)
    phases["sweep_seconds"] = time.perf_counter() - start - sum(phases.values())
    table_path, summary_path, report_html, report_md = finish(cfg, store, ctx.aip())
    phases["finish_seconds"] = time.perf_counter() - start - sum(phases.values())
    write_timing(cfg, phases, n_pending)
    print(f"results: {redact(table_path)}\nsummary: {summary_path}\nreport: {report_html}\n"
          f"markdown: {report_md}\nwall time {time.perf_counter() - start:.0f} s")
    if failed:
        raise StudyIncomplete(f"{len(failed)} trials failed ({', '.join(failed[:5])}); rerun "
                              "the same command to retry them")


if __name__ == "__main__":
    sys.exit(run(main))
