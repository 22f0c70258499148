"""Where a study's wall time goes: the share of it (× CPUs) spent in training steps and in
evaluation, under the old design (Optuna samples per cell, fixed steps) and the new one (one
steered run per cell, trained until converged).

    python -m benchmarks.study_efficiency [--results results/scaling/smollm2-135m-layer5-demo]

Both designs run, one after the other in this process's session, as ``experiments/scaling.py``
on the demo's activations (extracted first if missing) over a reduced grid: |D| ∈ {¼, 1}·H ×
|M| ∈ {256, 1024}, one seed, atoms, ReLU features, neurons and random directions. ``--results``
adds finished studies (their ``timing.json``), such as the demo itself. Goal: ≥ 0.6 of the wall
time in training steps and evaluation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from atoms.core.config import from_dict
from atoms.store.storage import Storage
from atoms.study.config import StudyConfig
from benchmarks.common import record

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments/configs/scaling/smollm2-135m-demo.yaml"
DESIGNS = {
    "Optuna, 2 samples per cell, 300 steps": {
        "grid": {"budget": "steps"}, "train": {"steps": 300},
        "sparsity": {"search": "optuna", "samples": 2, "sparsity_coeff_range": [1e-4, 3e-3]},
        "baselines": {"relu_search": "optuna", "relu_sparsity_coeff_range": [3e-3, 0.3]}},
    "steered, one run per cell, until converged (≤ 300 steps)": {
        "grid": {"budget": "converge", "max_steps": 300}, "sparsity": {"search": "control"},
        "baselines": {"relu_search": "control"}},
}


def _config(tmp: Path, name: str, changes: dict) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data["name"], data["out"] = name, str(tmp / name)
    data["grid"].update({"d_sae_over_h": [0.25, 1], "train_rows": [256, 1024], "seeds": [0],
                         "geometries": ["euclidean"]})
    data["baselines"]["exemplar_k"] = []
    for block, values in changes.items():
        data.setdefault(block, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    from_dict(StudyConfig, data)  # fails here, not in the child, on a bad change
    return path


def measure(folder) -> dict:
    """A finished study's wall time and CPUs (timing.json) against the seconds its trials spent
    in training steps and in evaluation (its rows)."""
    store = Storage(folder)
    timing = store.read_json("timing.json")
    rows = pd.read_parquet(Path(folder) / "results.parquet")
    trained = rows.dropna(subset=["train_seconds"]).drop_duplicates("trial_key")
    budget = timing["wall_seconds"] * timing["cpus"]
    steps = float(trained["train_seconds"].sum())
    evals = float(rows["eval_seconds"].sum())
    trained_rows = float((trained["steps"] * trained["batch_size"]).sum())
    step_rate = float(trained["steady_rows_per_s"].median())
    return {"trials": int(rows["trial_key"].nunique()), "trained": len(trained),
            "wall": timing["wall_seconds"], "cpus": timing["cpus"], "steps": steps,
            "eval": evals, "steps_fraction": steps / budget,
            "fraction": (steps + evals) / budget,
            "study_rows_per_s": trained_rows / timing["wall_seconds"], "step_rows_per_s":
            step_rate}


def _row(name: str, m: dict) -> list:
    return [name, m["trials"], m["trained"], f"{m['wall']:.0f}", f"{m['cpus']:g}",
            f"{m['steps']:.0f}", f"{m['eval']:.0f}", f"{m['steps_fraction']:.2f}",
            f"{m['fraction']:.2f}", f"{m['study_rows_per_s']:,.0f}",
            f"{m['step_rows_per_s']:,.0f}",
            f"{m['study_rows_per_s'] / m['step_rows_per_s'] / m['cpus']:.2f}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="*", default=[], help="finished study folders")
    args = parser.parse_args(argv)
    rows = []
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, changes) in enumerate(DESIGNS.items()):
            path = _config(Path(tmp), f"design{i}", changes)
            subprocess.run([sys.executable, str(ROOT / "experiments/scaling.py"), "--config",
                            str(path), "--quiet"], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            rows.append(_row(name, measure(Path(tmp) / f"design{i}")))
    for folder in args.results:
        rows.append(_row(f"finished study {Path(folder).name}", measure(folder)))
    record("Study efficiency: wall time in training steps and evaluation "
           "(benchmarks/study_efficiency.py)",
           ["design", "trials", "trained", "wall s", "CPUs", "steps s", "eval s",
            "steps / (wall·CPUs)", "(steps + eval) / (wall·CPUs)", "study trained rows/s",
            "step rows/s (median, 1 thread)", "study / (step·CPUs)"], rows,
           "The same reduced grid on the demo's activations under both designs (each run "
           "embedded, Ray start-up, extraction check, S̃ and the report included), then any "
           "finished study given. Goal: (steps + eval) / (wall·CPUs) ≥ 0.6.")


if __name__ == "__main__":
    main()
