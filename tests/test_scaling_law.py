import math

import numpy as np
import pandas as pd
import pytest

from analysis.scaling_law import critical_capacity, fit_power_law, gao_fit, law_summary

H = 64
C, ALPHA = 1.5, 0.5
MS = [1024, 4096, 16384, 65536]
DS = [int(round(16 * 2 ** (i / 2))) for i in range(15)]  # 16 … 2048, steps of √2


def grid(r2_of, seeds=3, noise=0.005, worse_lambda=True) -> pd.DataFrame:
    """A tsae |M| × |D| grid, R² = r2_of(d, m) + N(0, noise) per seed; each cell also holds a
    second λ with a worse objective and a wrong R² that best-λ selection must drop."""
    rng = np.random.default_rng(1)
    rows = []
    for m in MS:
        for d in DS:
            for s in range(seeds):
                cell = f"tsae-D{d}-M{m}-s{s}"
                base = {"model": "m", "site": "resid_post", "layer": 2, "family": "tsae",
                        "unit_set": "atoms", "status": "finished", "cell": cell, "d_sae": d,
                        "d_sae_over_h": d / H, "h": H, "train_rows": float(m), "seed": s}
                if worse_lambda:
                    rows.append({**base, "objective": 0.5, "r2_euclid_centred": 0.0})
                rows.append({**base, "objective": 0.1,
                             "r2_euclid_centred": r2_of(d, m) + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def planted(d, m):
    centre = C * m**ALPHA
    return 0.3 + 0.6 / (1 + math.exp(-3 * (math.log(d) - math.log(centre))))


def test_planted_transition_and_power_law_are_recovered():
    dstar = critical_capacity(grid(planted))
    assert list(dstar["status"]) == ["transition"] * len(MS)
    for _, r in dstar.iterrows():
        true = C * r["train_rows"] ** ALPHA
        assert r["d_star_lo"] <= true <= r["d_star_hi"]
        assert abs(math.log(r["d_star"] / true)) < math.log(2) / 4  # within half a grid step
        assert r["d_star_hi"] / r["d_star_lo"] < 2.5  # an interval, not the whole grid
        assert r["d_star_over_h"] == pytest.approx(r["d_star"] / H)
        assert 0.55 < r["level"] < 0.65 and r["largest_rise"] >= 0.1
    fit = fit_power_law(dstar)
    assert fit["supported"], fit["reason"]
    assert fit["alpha_lo"] <= ALPHA <= fit["alpha_hi"]
    assert fit["alpha_hi"] - fit["alpha_lo"] < 0.5 and not fit["alpha_lo"] <= 1.0 <= fit["alpha_hi"]
    assert fit["a"] == pytest.approx(math.log(C), abs=0.5)
    assert fit["n_points"] == len(MS)
    lines = law_summary(grid(planted))
    assert sum("transition, |D|*" in x for x in lines) == len(MS)
    assert any("α = 0.5" in x or "α = 0.4" in x for x in lines)


def test_explicit_level_moves_the_crossing():
    low = critical_capacity(grid(planted), level=0.4)
    mid = critical_capacity(grid(planted))
    assert (low["level"] == 0.4).all()
    assert (low["d_star"] < mid["d_star"]).all()


def test_smooth_curves_have_no_transition_and_no_law():
    def smooth(d, m):
        return 0.6 + 0.02 * math.log2(d / 16) + 0.01 * math.log2(m / 1024)

    dstar = critical_capacity(grid(smooth))
    assert list(dstar["status"]) == ["no transition"] * len(MS)
    assert dstar["d_star"].isna().all()
    fit = fit_power_law(dstar)
    assert not fit["supported"] and "transition" in fit["reason"]
    assert math.isnan(fit["alpha"])
    assert any("no scaling law fitted" in x for x in law_summary(grid(smooth)))


def test_a_rise_within_seed_noise_is_not_a_transition():
    def step(d, m):
        return 0.5 + (0.12 if d >= 256 else 0.0)

    clean = critical_capacity(grid(step, noise=0.005))
    noisy = critical_capacity(grid(step, noise=0.2))
    assert (clean["status"] == "transition").all()
    assert (noisy["status"] == "no transition").all()


def test_single_d_and_too_few_points():
    one = grid(planted)
    one = one[one["d_sae"] == 64]
    assert (critical_capacity(one)["status"] == "one |D| only").all()
    dstar = critical_capacity(grid(planted)).iloc[:2]
    fit = fit_power_law(dstar)
    assert not fit["supported"] and "2" in fit["reason"] and math.isnan(fit["alpha"])


def test_gao_exponent():
    beta, c = 0.3, 2.0
    g = gao_fit(grid(lambda d, m: 1 - c * d**-beta, noise=0.0))
    assert (g["n_points"] == len(DS)).all()
    assert g["beta"].to_numpy() == pytest.approx(beta)
    assert g["c"].to_numpy() == pytest.approx(c)
    few = gao_fit(grid(lambda d, m: 1 - c * d**-beta)[lambda t: t["d_sae"] <= 23])
    assert few["beta"].isna().all() and (few["n_points"] == 2).all()
