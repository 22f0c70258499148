"""The study report: built from a hand-made results folder with a planted transition, rendered
in headless Chromium (every image must load, no console errors), and its command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import plots
from analysis.report import build_report, main
from atoms.aip.metric import AIP, SecondMoment, save_aip
from atoms.sae.model import SAEConfig, build_sae
from atoms.sae.saelens import save_sae
from tests.browser import render
from tests.shardsets import write_shard_set

H = 32
D_OVER_H = [0.5, 1.0, 2.0, 4.0, 8.0]
M = [256, 1024, 4096, 16384]
SEEDS = [0, 1, 2]
DATA = {"holdout_shards": 2, "validation_rows": 200, "test_rows": 600}
ROOT = Path(__file__).resolve().parent.parent


def planted_r2(d_over_h: float, m: int, seed: int) -> float:
    """R² 0.5 below |D|*/H = 0.5·√2·(|M|/256)^½ and 0.9 above: |D|* ∝ |M|^0.5."""
    boundary = 0.5 * 2**0.5 * (m / 256) ** 0.5
    return (0.9 if d_over_h > boundary else 0.5) + 0.004 * (seed - 1)


def _save(kind: str, n: int, x: torch.Tensor, folder: Path) -> str:
    sae = build_sae(SAEConfig(d_in=H, d_sae=n, kind=kind, init_threshold=0.05, seed=n))
    sae.fit_input_scale(x)
    return str(save_sae(sae, folder))


def _row(study: Path, family: str, unit_set: str, d: float, m, seed: int, **kw) -> dict:
    n = int(d * H)
    cell = {"neurons": "neurons"}.get(family, f"{family}-D{n}-M{m}-s{seed}")
    r2 = planted_r2(d, m, seed) if family == "tsae" else {"relu": 0.85, "neurons": 1.0,
                                                         "random": -0.3}[family] + 0.01 * seed
    return {"study": study.name, "trial_key": f"{cell}-opt0", "cell": cell, "family": family,
            "unit_set": unit_set, "d_sae": n, "d_sae_over_h": d, "h": H,
            "train_rows": float(m) if m else np.nan, "seed": seed, "status": "finished",
            "sparsity_coeff": 1e-3, "objective": 1.0 - r2, "model": "synthetic",
            "site": "resid_post", "layer": 0, "r2_euclid_centred": r2,
            "r2_aip_centred": r2 - 0.05, "q_star_pairwise": 0.1 + 0.02 * d + 0.003 * seed,
            "q_star_per_unit": 0.05, "uniqueness_pct": 10.0, "l0_mean": 4.0 + d,
            "dead_fraction": 0.01, "r2_primary": "r2_euclid_centred",
            "q_star_primary": "q_star_pairwise", "code_version": "0.1.0+test",
            "checkpoint_path": None, **kw}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A study folder: shards + S̃, saved SAEs for the rows the figures read, a results table
    with 3 seeds and a planted transition, a diverged trial and monosemanticity scores."""
    root = tmp_path_factory.mktemp("report")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, H, generator=g) + 2.0 * torch.randn(H, generator=g)
    shards = write_shard_set(root / "shards", x, 6)
    aip_path = save_aip(AIP.from_moment(SecondMoment(H).update(x)), shards / "aip.safetensors")
    folder = root / "demo-study"
    common = {"data_folder": str(shards), "aip_path": str(aip_path),
              "study_config": json.dumps({"name": folder.name, "data": DATA})}
    rows = [_row(folder, "neurons", "neurons", 1.0, None, 0, **common)]
    for seed in SEEDS:
        for d in D_OVER_H:
            rows.append(_row(folder, "random", "random", d, None, seed, **common))
            rows.append(_row(folder, "relu", "relu_features", d, 4096, seed, **common))
            for m in M:
                rows.append(_row(folder, "tsae", "atoms", d, m, seed, **common))
    table = pd.DataFrame(rows)
    for i, r in table[table["seed"] == 0].iterrows():
        head = r["d_sae_over_h"] == max(D_OVER_H) and r["train_rows"] == 4096
        if (r["family"] == "tsae" and (r["train_rows"] == max(M) or head)) or \
                (r["family"] == "relu" and head):
            kind = "threshold" if r["family"] == "tsae" else "relu"
            table.loc[i, "checkpoint_path"] = _save(kind, int(r["d_sae"]), x,
                                                    folder / "trials" / r["trial_key"] / "sae")
    bad = _row(folder, "tsae", "atoms", 8.0, 16384, 0, **common)
    table = pd.concat([table, pd.DataFrame([{**bad, "status": "diverged", "trial_key": "tsae-"
                                             "D256-M16384-s0-opt9", "r2_euclid_centred": np.nan}])])
    folder.mkdir(exist_ok=True)
    table.to_parquet(folder / "results.parquet", index=False)
    (folder / "monosemanticity").mkdir()
    pd.DataFrame({"unit_set": ["atoms"] * 4 + ["neurons"] * 4, "unit": list(range(4)) * 2,
                  "score": [0.6, 0.7, 0.8, 0.7, 0.2, 0.3, 0.25, 0.2], "judge": "test",
                  "attempts": 10, "parse_failures": [4, 0, 0, 0, 0, 0, 0, 0]}
                 ).to_parquet(folder / "monosemanticity" / "scores.parquet")
    return folder


@pytest.fixture(scope="module")
def report(study) -> tuple[Path, Path]:
    return build_report(study)


def test_report_renders_with_every_image(report, study, tmp_path):
    html_path, md_path = report
    assert html_path == study / "report.html" and md_path == study / "report.md"
    probe = render(html_path, tmp_path, tmp_path / "report.png")
    ids = {i["id"] for i in probe["imgs"]}
    assert {"r2_heatmap_0", "q_star_0", "angles", "l0_0", "thresholds_0"} <= ids, ids
    broken = [i for i in probe["imgs"] if not (i["complete"] and i["width"] > 0)]
    assert not broken, broken
    assert probe["errors"] == [] and probe["console"] == [], probe
    assert probe["headline_rows"] == 5  # header + neurons, features, atoms, random
    assert "Representation shift: Euclidean vs AIP angles" in probe["h2"]
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_broken_image_is_caught(report, tmp_path):
    page = tmp_path / "broken.html"
    text = report[0].read_text()
    start = text.index("base64,", text.index("id='q_star_0'")) + len("base64,")
    page.write_text(text[:start] + "iVBORw0KGgoAAAAbroken" + text[start + 40:])
    probe = render(page, tmp_path)
    broken = [i["id"] for i in probe["imgs"] if not (i["complete"] and i["width"] > 0)]
    assert broken == ["q_star_0"]


def test_report_content(report, study):
    md = report[1].read_text()
    for name in ("r2_heatmap_0", "q_star_0", "angles", "l0_0", "thresholds_0"):
        assert f"](report_files/{name}.png)" in md
        assert (study / "report_files" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert md.count("transition, |D|\\* =") == len(M)
    alpha = float(re.search(r"with α = ([0-9.]+)", md).group(1))
    assert alpha == pytest.approx(0.5, abs=0.05)
    assert "tsae-D256-M16384-s0-opt9" in md and "diverged" in md
    assert "| unit set | judge | units | mean score | parse failures |" in md
    assert "| atoms | test | 4 | 0.7 [" in md and "| 0.1 |" in md  # 4 of 40 answers
    assert "0.1.0+test" in md and "r2_euclid_centred" in md and "q_star_pairwise" in md
    assert not list(study.glob(".report*.tmp"))
    page = report[0].read_text()
    assert not re.search(r"https?://|<link|<script|@import|src='(?!data:image/png;base64,)", page)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_main_on_a_folder_copied_without_shards(study, tmp_path, capsys):
    """A results folder moved off the cluster: shards and S̃ gone, SAEs found beside the table."""
    copy = tmp_path / "results" / study.name
    shutil.copytree(study / "trials", copy / "trials")
    table = pd.read_parquet(study / "results.parquet")
    table["data_folder"] = "/cluster/activations/layer_0"
    table["aip_path"] = "/cluster/activations/layer_0/aip.safetensors"
    table["checkpoint_path"] = table["checkpoint_path"].str.replace(str(study), "/cluster/x")
    table.to_parquet(copy / "results.parquet", index=False)
    assert main([str(tmp_path / "results")]) == 0
    assert capsys.readouterr().out.split() == ["report:", str(tmp_path / "results" / "report.html"),
                                   "markdown:", str(tmp_path / "results" / "report.md")]
    md = (tmp_path / "results" / "report.md").read_text()
    assert "activation shards not found at /cluster/activations/layer_0" in md
    assert "r2_heatmap_0.png" in md and "angles.png" not in md
    row = table[table["checkpoint_path"].notna()].iloc[0].copy()
    row["source"] = str(copy)
    assert plots.sae_folder(row) == copy / "trials" / row["trial_key"] / "sae"


def test_cli_on_a_folder_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    done = _cli(str(tmp_path / "empty"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no results" in lines[0]
    assert not (tmp_path / "empty" / "report.html").exists()


def test_main_on_a_stored_study_publishes_its_report(study, s3_server, storage_cache, capsys):
    """A study in an object store: its result files are mirrored here (trial folders are not),
    the report is built in the mirror and published beside the results."""
    from atoms.store.storage import Storage, mirror_path

    uri = s3_server.uri("reported-study")
    store = Storage(uri)
    store.put_file(study / "results.parquet", "results.parquet")
    store.put_tree(study / "monosemanticity", "monosemanticity")
    assert main([uri]) == 0
    local = mirror_path(uri)
    assert capsys.readouterr().out.split() == ["report:", str(local / "report.html"),
                                               "markdown:", str(local / "report.md")]
    assert not (local / "trials").exists()
    stored = store.files(recursive=True)
    assert {"report.html", "report.md", "report_files/r2_heatmap_0.png"} <= set(stored)
    assert store.read_bytes("report.md") == (local / "report.md").read_bytes()
    assert "| atoms | test | 4 | 0.7 [" in (local / "report.md").read_text()


def test_control_verdicts_compare_each_learned_set_with_the_best_exemplar():
    import pandas as pd

    from analysis.report import control_verdicts

    heads = pd.DataFrame({
        "model": "m", "site": "resid_post", "layer": 1,
        "unit_set": ["atoms", "relu_features", "exemplar_k1", "exemplar_k8", "random"],
        "family": ["tsae", "relu", "exemplar", "exemplar", "random"],
        "r2_mean": [0.9, 0.6, 0.5, 0.7, 0.1], "l0": [8.0, 8.0, 1.0, 8.0, 8.0]})
    lines = control_verdicts(heads)
    assert len(lines) == 2
    aip = control_verdicts(heads.assign(r2_aip=[0.2, 0.3, 0.4, 0.1, 0.0]))[2:]
    assert all("**not above**" in line and "exemplar_k1" in line for line in aip)
    assert lines[0].startswith("atoms") and " above the exemplar control exemplar_k8" in lines[0]
    assert "**not above**" in lines[1] and lines[1].startswith("relu_features")
