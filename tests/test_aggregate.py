import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.aggregate import METRICS, aggregate, headline, load_results
from atoms.core.errors import InputError

BASE = {"model": "m", "site": "resid_post", "layer": 3, "status": "finished", "h": 8}


def row(family, unit_set, cell, d=None, m=None, seed=0, objective=None, r2=0.5, q=0.1, **kw):
    return {**BASE, "family": family, "unit_set": unit_set, "cell": cell, "d_sae_over_h": d,
            "d_sae": None if d is None else int(d * 8), "train_rows": m, "seed": seed,
            "objective": objective, "r2_euclid_centred": r2, "q_star_pairwise": q,
            "l0_mean": 10.0, "dead_fraction": 0.0, "uniqueness_pct": 50.0, **kw}


def table(rows) -> pd.DataFrame:
    t = pd.DataFrame(rows)
    return t.astype({"d_sae_over_h": float, "train_rows": float, "objective": float})


def test_interval_matches_hand_computation_and_one_seed_is_nan():
    r2s = [0.71, 0.74, 0.80]
    rows = [row("tsae", "atoms", f"tsae-D2-M100-s{s}", 2, 100, s, 0.1, r2=v)
            for s, v in enumerate(r2s)]
    rows += [row("tsae", "atoms", f"tsae-D2-M100-s{s}", 2, 100, s, 0.9, r2=-5.0) for s in range(3)]
    rows.append(row("tsae", "atoms", "tsae-D4-M100-s0", 4, 100, 0, 0.1, r2=0.9))
    agg = aggregate(table(rows)).set_index("d_sae_over_h")
    mean, sd = np.mean(r2s), np.std(r2s, ddof=1)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    a = agg.loc[2.0]
    assert a["n_seeds"] == 3
    assert a["r2_euclid_centred_mean"] == pytest.approx(mean)
    assert a["r2_euclid_centred_lo"] == pytest.approx(mean - half)
    assert a["r2_euclid_centred_hi"] == pytest.approx(mean + half)
    one = agg.loc[4.0]
    assert one["n_seeds"] == 1 and one["r2_euclid_centred_mean"] == 0.9
    assert math.isnan(one["r2_euclid_centred_lo"]) and math.isnan(one["r2_euclid_centred_hi"])
    assert "train_r2_euclid_centred_mean" not in agg  # only metrics present are aggregated
    assert {"q_star_pairwise_mean", "l0_mean_mean"} <= set(agg.columns)
    assert "mono_score" in METRICS


def test_headline_picks_largest_common_d_and_m():
    rows = [row("neurons", "neurons", "neurons", 1.0, r2=1.0, q=0.02)]
    rows += [row("random", "random", f"random-D{d}-s0", d, r2=-0.3, q=0.3 + d) for d in (1, 2, 4)]
    for d in (1, 2, 4):
        for m in (100, 400):
            rows.append(row("tsae", "atoms", f"tsae-D{d}-M{m}-s0", d, m, 0, 0.2,
                            r2=0.5 + d / 10 + m / 10000, q=0.4))
    rows += [row("relu", "relu_features", f"relu-D{d}-M400-s0", d, 400, 0, 0.3, r2=0.6 + d / 10)
             for d in (1, 2)]
    rows.append(row("pretrained", "gemmascope", "pretrained-gemmascope", 2, r2=0.7))
    rows.append({**row("tsae", "atoms", "tsae-D4-M400-s0", 4, 400, 0, 0.0), "status": "diverged"})
    h = headline(table(rows))
    assert list(h["unit_set"]) == ["neurons", "relu_features", "atoms", "random", "gemmascope"]
    by = h.set_index("unit_set")
    assert by.loc["atoms", "d_sae_over_h"] == 2 and by.loc["atoms", "train_rows"] == 400
    assert by.loc["atoms", "r2_mean"] == pytest.approx(0.5 + 0.2 + 0.04)
    assert by.loc["relu_features", "r2_mean"] == pytest.approx(0.8)
    assert by.loc["random", "d_sae_over_h"] == 2 and by.loc["random", "q_star_mean"] == 2.3
    assert by.loc["neurons", "r2_mean"] == 1.0
    assert {"r2_lo", "r2_hi", "q_star_lo", "uniqueness_pct", "l0", "dead_fraction",
            "n_seeds"} <= set(h.columns)


def test_headline_falls_back_without_features():
    rows = [row("tsae", "atoms", f"tsae-D{d}-M{m}-s0", d, m, 0, 0.2, r2=d + m)
            for d in (1, 2) for m in (10, 20)]
    rows += [row("random", "random", f"random-D{d}-s0", d, r2=d) for d in (1, 8)]
    by = headline(table(rows)).set_index("unit_set")
    assert by.loc["atoms", "r2_mean"] == 22
    assert by.loc["random", "d_sae_over_h"] == 1  # nearest to the atoms' |D| = 2H in log scale


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    table(rows).to_parquet(path, index=False)


def test_load_results_from_study_folders_and_row_files(tmp_path):
    write(tmp_path / "all" / "a" / "results.parquet",
          [row("neurons", "neurons", "neurons", 1.0), row("random", "random", "r", 1.0)])
    write(tmp_path / "all" / "deep" / "b" / "rows" / "t1.parquet",
          [row("tsae", "atoms", "c1", 1, 10, 0, 0.1)])
    write(tmp_path / "all" / "deep" / "b" / "rows" / "t2.parquet",
          [row("tsae", "atoms", "c2", 2, 10, 0, 0.1)])
    t = load_results(tmp_path / "all")
    assert len(t) == 4
    assert t["source"].value_counts().to_dict() == {str(tmp_path / "all" / "a"): 2,
                                                    str(tmp_path / "all" / "deep" / "b"): 2}
    assert len(load_results(tmp_path / "all" / "deep" / "b")) == 2
    assert len(load_results([tmp_path / "all" / "a" / "results.parquet",
                             tmp_path / "all" / "deep" / "b"])) == 4


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"), ("empty", "no results found"), ("corrupt", "not a readable"),
    ("no_column", "'unit_set'")])
def test_load_results_errors_are_one_line(tmp_path, case, needle):
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
    elif case == "corrupt":
        target.mkdir()
        (target / "results.parquet").write_bytes(b"not parquet at all")
    elif case == "no_column":
        write(target / "results.parquet", [row("tsae", "atoms", "c", 1, 10)])
        pd.read_parquet(target / "results.parquet").drop(columns="unit_set").to_parquet(
            target / "results.parquet")
    with pytest.raises(InputError) as e:
        load_results(target)
    assert needle in str(e.value) and str(target) in str(e.value)
    assert "\n" not in str(e.value)
