"""The scaling study end to end through Ray Tune + Optuna: killed and rerun, and as a Ray job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from atoms.core.config import from_dict
from atoms.study.config import StudyConfig
from atoms.study.plan import cells
from tests.browser import render

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments/configs/scaling/tiny-random.yaml"


def tiny_config(tmp_path: Path) -> tuple[Path, StudyConfig]:
    data = yaml.safe_load(TINY.read_text())
    data["out"] = str(tmp_path / "study")
    data["data"]["extract"]["out"] = str(tmp_path / "acts")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, from_dict(StudyConfig, data)


def expected_rows(cfg: StudyConfig) -> set[tuple[str, str]]:
    h = 64  # tiny-random's hidden size
    names = {"tsae": "atoms", "relu": "relu_features", "random": "random", "neurons": "neurons"}
    return {(t.key, names[t.family]) for ts in cells(cfg, h).values() for t in ts}


def study_command(path: Path) -> list[str]:
    return [sys.executable, str(ROOT / "experiments/scaling.py"), "--config", str(path),
            "--quiet"]


def local_env() -> dict:
    """A private embedded Ray for the child (never a cluster another test started)."""
    return {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0"}


def settled(rows_dir: Path, quiet: float = 5.0) -> dict[str, int]:
    """Row files (name → mtime) once none has appeared for ``quiet`` seconds."""
    last, since = None, time.time()
    while True:
        now = {p.name: p.stat().st_mtime_ns for p in rows_dir.glob("*.parquet")}
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            return now
        time.sleep(0.2)


@pytest.mark.ci
def test_killed_study_reruns_to_exactly_one_row_per_trial_and_unit_set(tmp_path):
    path, cfg = tiny_config(tmp_path)
    rows_dir = Path(cfg.out) / "rows"
    proc = subprocess.Popen(study_command(path), cwd=ROOT, env=local_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if rows_dir.is_dir() and len(list(rows_dir.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the study ended before it could be killed: {proc.stderr.read()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its process group
    proc.wait()
    before = settled(rows_dir)  # a trial's worker may finish its write as it goes down
    assert 3 <= len(before) < len(expected_rows(cfg))
    assert not (Path(cfg.out) / "results.parquet").exists()

    done = subprocess.run(study_command(path), cwd=ROOT, env=local_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(before)} finished" in done.stdout
    after = {p.name: p.stat().st_mtime_ns for p in rows_dir.glob("*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())  # not redone
    table = pd.read_parquet(Path(cfg.out) / "results.parquet")
    pairs = list(zip(table["trial_key"], table["unit_set"], strict=True))
    assert len(pairs) == len(set(pairs))  # no duplicates
    assert set(pairs) == expected_rows(cfg)  # no holes
    atoms = table[table["family"] == "tsae"]
    assert (atoms["sparsity_search"] == "optuna").all()
    assert atoms["sparsity_coeff"].between(*cfg.sparsity.sparsity_coeff_range).all()
    assert atoms["status"].eq("finished").all() and atoms["r2_euclid_centred"].gt(0).all()
    assert (Path(cfg.out) / "summary.md").read_text().count("\n- |M| = ") == 2  # one per |M|
    probe = render(Path(cfg.out) / "report.html", tmp_path)  # the report the job writes
    assert {"r2_heatmap_0", "q_star_0", "angles"} <= {i["id"] for i in probe["imgs"]}
    assert all(i["complete"] and i["width"] > 0 for i in probe["imgs"]), probe["imgs"]
    assert probe["errors"] == [] and probe["console"] == [], probe
    scores = pd.read_parquet(Path(cfg.out) / "monosemanticity" / "scores.parquet")
    assert {"atoms", "neurons", "random"} <= set(scores["unit_set"])


def test_a_trial_can_be_a_ray_train_run_inside_tune(tmp_path):
    """execution.trial_executor: ray (the GPU-cluster mode), one cell, on CPU workers."""
    path, _ = tiny_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["grid"].update(d_sae_over_h=[1], train_rows=[256])
    data["sparsity"] = {"search": "grid", "sparsity_coeff": [1e-3]}
    data["baselines"] = {"neurons": False, "random": False, "relu": False}
    data["execution"] = {"trial_executor": "ray", "workers": 1, "cpus_per_trial": 0.5}
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run(study_command(path), cwd=ROOT, env=local_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_parquet(Path(data["out"]) / "results.parquet")
    assert table["trial_key"].tolist() == ["tsae-D64-M256-s0-l0.001"]
    run = Path(data["out"]) / "trials" / table["trial_key"].item()
    assert json.loads((run / "metrics.json").read_text())["timings"]["executor"] == "ray"
    assert (run / "ray").is_dir() and table["r2_euclid_centred"].item() > 0


@pytest.mark.ci
def test_the_study_runs_as_a_ray_job_on_a_local_head(tmp_path, s3_server, monkeypatch):
    """cluster/local-head.sh + `ray job submit` with the results in an object store (a cluster
    without a shared volume), then `stop` leaves none of its processes."""
    import io
    import re

    from atoms.store.storage import Storage
    from tests.rayhead import job_status, local_head, processes_of, run_script, submit_job

    path, cfg = tiny_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["out"] = cfg.out = s3_server.uri("job-study")
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("ATOMS_STORAGE_CACHE", str(tmp_path / "mirror"))  # the head inherits it
    with local_head(tmp_path / "head") as head:
        assert processes_of(head.temp_dir), "the head's processes carry its temp dir"
        job = submit_job(head, ["python", "experiments/scaling.py", "--config", str(path),
                                "--quiet"], working_dir=ROOT, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:]
        submission = re.search(r"Job '(raysubmit_\w+)' succeeded", job.stdout)
        assert submission and job_status(head, submission.group(1)) == "SUCCEEDED"
    assert processes_of(head.temp_dir) == [] and not head.temp_dir.exists()
    status = run_script("status", head.script_env)
    assert status.returncode == 3 and "down" in status.stdout, status.stdout
    table = pd.read_parquet(io.BytesIO(Storage(cfg.out).read_bytes("results.parquet")))
    assert set(zip(table["trial_key"], table["unit_set"], strict=True)) == expected_rows(cfg)
    assert "summary:" in job.stdout and "atoms-secret" not in job.stdout
    assert (tmp_path / "mirror").is_dir()  # the job's trials worked in the mirror it was given
