"""The scaling study with its shards, checkpoints and results on an S3 object store (a real
SeaweedFS server on 127.0.0.1), and its refusal of an unwritable output before any work."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from atoms.store.storage import Storage
from tests.test_scaling_ray import ROOT, TINY, local_env

CLI = [sys.executable, str(ROOT / "experiments/scaling.py"), "--quiet"]


def write_config(tmp_path: Path, out: str, acts: str, **changes) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["out"], data["data"]["extract"]["out"] = out, acts
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def study(path: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**local_env(), "ATOMS_STORAGE_CACHE": str(cache)}
    return subprocess.run([*CLI, "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("where", ["out", "data.extract.out"])
def test_an_unwritable_output_fails_before_any_work_with_one_line(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    good, bad = str(tmp_path / "fine"), str(blocker / "sub")
    out, acts = (bad, good) if where == "out" else (good, bad)
    done = study(write_config(tmp_path, out, acts), tmp_path / "cache")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: {where}: {bad} is not writable ({lines[0].split('(', 1)[1]}"]
    assert not Path(good).exists() and not (tmp_path / "cache").exists()  # nothing began
    assert blocker.read_text() == "not a folder"


def test_wrong_credentials_fail_before_any_work(tmp_path, s3_server):
    out = s3_server.uri().replace("atoms-secret", "not-the-secret")
    done = study(write_config(tmp_path, out, str(tmp_path / "acts")), tmp_path / "cache")
    assert done.returncode == 2
    assert done.stderr.startswith("error: out: s3://atoms:***@atoms-test/")
    assert "not-the-secret" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "acts").exists()


@pytest.mark.slow
@pytest.mark.ci
def test_study_on_an_object_store_resumes_from_the_store_alone(tmp_path, s3_server):
    """Extraction, trials and results all in S3; a rerun on an empty mirror (a fresh node)
    finds every trial finished there and rebuilds the same table and report."""
    out, acts = s3_server.uri("study"), s3_server.uri("acts")
    path = write_config(
        tmp_path, out, acts,
        grid={"d_sae_over_h": [1], "train_rows": [256], "seeds": [0], "budget": "steps"},
        sparsity={"search": "grid", "sparsity_coeff": [1e-3]},
        baselines={"neurons": True, "random": False, "relu": False})
    first = study(path, tmp_path / "node-a")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 to run" in first.stdout and "atoms-secret" not in first.stdout

    store = Storage(out)
    stored = store.files(recursive=True)
    key = "tsae-D64-M256-s0-l0.001"
    for name in ("results.parquet", "study.json", "summary.md", "report.html", "report.md",
                 f"rows/{key}.parquet", "rows/neurons.parquet",
                 f"trials/{key}/metrics.json", f"trials/{key}/sae/sae_weights.safetensors",
                 "monosemanticity/scores.parquet"):
        assert name in stored, name
    assert any(n.startswith(f"trials/{key}/checkpoints/step_") for n in stored)
    shards = Storage(acts).files("resid_post/layer_1")
    assert "resid_post/layer_1/manifest.json" in shards
    assert "resid_post/layer_1/aip.safetensors" in shards
    table = pd.read_parquet(io.BytesIO(store.read_bytes("results.parquet")))
    assert sorted(table["unit_set"]) == ["atoms", "neurons"]
    atoms = table[table["unit_set"] == "atoms"].iloc[0]
    assert atoms["status"] == "finished" and atoms["r2_euclid_centred"] > 0
    assert atoms["checkpoint_path"].startswith("s3://atoms:***@atoms-test/study/trials/")
    assert not table.astype(str).apply(lambda c: c.str.contains("atoms-secret")).any().any()

    rows_before = {n: s for n, s in stored.items() if n.startswith("rows/")}
    again = study(path, tmp_path / "node-b")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 finished, 0 to run" in again.stdout
    assert {n: s for n, s in store.files(recursive=True).items()
            if n.startswith("rows/")} == rows_before
    rebuilt = pd.read_parquet(io.BytesIO(store.read_bytes("results.parquet")))
    pd.testing.assert_frame_equal(rebuilt, table)
