"""Cross-seed stability and ground-truth scores against hand-made cases."""

import math

import pytest
import torch

from atoms.aip.metric import AIP
from atoms.evaluate.ground_truth import ground_truth_scores
from atoms.evaluate.stability import interval, pair_stability, random_baseline, seed_stability


def test_two_copies_of_one_set_are_perfectly_stable():
    a = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    signs = torch.where(torch.rand(40, generator=torch.Generator().manual_seed(2)) > 0.5, 1, -1)
    s = pair_stability(a, 3.0 * a[perm] * signs[:, None])
    assert s == {"matched_fraction": 1.0, "pw_mcc": pytest.approx(1.0, abs=1e-12)}


def test_independent_random_sets_sit_at_the_random_baseline():
    sets = {seed: torch.randn(64, 32, generator=torch.Generator().manual_seed(seed))
            for seed in (0, 1, 2)}
    got = seed_stability(sets)
    base = random_baseline(64, 32)
    assert got["stability_pairs"] == 3
    assert got["stability_matched_fraction"] == base["matched_fraction"] == 0.0
    assert abs(got["stability_pw_mcc"] - base["pw_mcc"]) < 0.03
    assert got["stability_pw_mcc_lo"] <= got["stability_pw_mcc"] <= got["stability_pw_mcc_hi"]


def test_stability_uses_the_aip_cosine():
    aip = AIP.from_moment(torch.diag(torch.tensor([100.0, 1.0])))
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.3], [0.0, 1.0]])  # tilted towards the high-variance axis
    assert pair_stability(a, b)["matched_fraction"] == 1.0  # Euclidean cos 0.958
    assert pair_stability(a, b, aip)["matched_fraction"] == 0.5  # AIP: cos(b₀, a₀) = 0.32


def test_interval_of_one_value_has_no_bounds():
    assert math.isnan(interval([0.5])[1])
    mean, lo, hi = interval([0.4, 0.5, 0.6])
    assert lo < mean < hi and mean == pytest.approx(0.5)


def test_ground_truth_scores_of_a_perfect_and_a_shrunk_dictionary():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(6, 10, generator=g, dtype=torch.float64)
    codes = torch.rand(200, 6, generator=g, dtype=torch.float64) * (
        torch.rand(200, 6, generator=g) > 0.6)
    x = codes @ true
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    learned = true[perm] * 2.0  # rescaled, reordered
    coded = codes[:, perm] * 0.25  # coefficients along the rescaled atoms: shrinkage ½
    s = ground_truth_scores(learned, true, coded, codes, decoder_vectors=learned,
                            recon=coded @ learned, x=x)
    assert s["mcc"] == pytest.approx(1.0) and s["recovery_099"] == 1.0
    assert s["uniqueness"] == 1.0 and s["f1"] == pytest.approx(1.0)
    assert s["shrinkage"] == pytest.approx(0.5)
    assert s["norm_ratio"] == pytest.approx(0.5)
    never = ground_truth_scores(learned, true, torch.zeros_like(coded), codes)
    assert never["f1"] == 0.0 and never["recall"] == 0.0
