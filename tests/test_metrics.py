import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from atoms.aip.metric import AIP
from atoms.core.errors import InputError
from atoms.evaluate.metrics import (
    ExactSample,
    LogHistogram,
    coherence,
    dead_fraction,
    l0_per_row,
    l0_summary,
    local_coherence,
    q_star,
    q_star_crossing,
    r2_scores,
    rip_bound,
    theorem_interval,
    uniqueness_satisfied,
    uniqueness_threshold,
)
from atoms.evaluate.synthetic import whitened_atoms

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
X_HAT = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)


def test_r2_hand_computed_four_variants():
    # Residual Σ‖x − x̂‖² = 1; mean (2/3, 2/3); Σ‖x − x̄‖² = 4/3; Σ‖x‖² = 4.
    # Under S̃ = diag(2, 1): residual 1; centred 2; uncentred 6.
    aip = AIP.from_moment(torch.diag(torch.tensor([0.5, 1.0])))
    r2 = r2_scores(X, X_HAT, aip)
    assert r2["euclid_centred"] == pytest.approx(1 - 1 / (4 / 3))
    assert r2["euclid_uncentred"] == pytest.approx(1 - 1 / 4)
    assert r2["aip_centred"] == pytest.approx(1 - 1 / 2)
    assert r2["aip_uncentred"] == pytest.approx(1 - 1 / 6)


def test_r2_predicting_the_mean_scores_zero():
    x = torch.randn(100, 3, dtype=torch.float64)
    r2 = r2_scores(x, x.mean(0).expand_as(x))
    assert r2["euclid_centred"] == pytest.approx(0.0, abs=1e-12)


@given(
    arrays(
        np.float64,
        st.tuples(st.integers(2, 20), st.integers(1, 5)),
        elements=st.floats(-100, 100, allow_nan=False),
    )
)
@settings(max_examples=50, deadline=None)
def test_r2_is_one_for_identity_reconstruction(x):
    # Centred R² needs variance that float64 can resolve next to the mean.
    assume(((x - x.mean(0)) ** 2).sum() > 1e-9 * (x**2).sum() + 1e-100)
    r2 = r2_scores(x, x)
    assert r2["euclid_centred"] == 1.0 and r2["euclid_uncentred"] == 1.0


def test_r2_bad_input():
    with pytest.raises(InputError, match="NaN"):
        r2_scores(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))
    with pytest.raises(InputError, match="expected width d=2"):
        r2_scores(torch.ones(3, 2), torch.ones(3, 4))


def test_l0_and_dead_fraction_hand_computed():
    codes = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert l0_per_row(codes).tolist() == [1, 2, 0]
    s = l0_summary(l0_per_row(codes))
    assert (
        s["l0_mean"] == pytest.approx(1.0)
        and s["l0_max"] == 2
        and s["empty_fraction"] == pytest.approx(1 / 3)
    )
    assert dead_fraction((codes != 0).sum(0)) == pytest.approx(1 / 3)


def test_coherence_hand_computed():
    # Unit rows e1, (e1 + e2)/√2, e2: pairwise |cos| = {1/√2, 0, 1/√2}.
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    coh = coherence(d)
    assert sorted(coh.pairwise.values) == pytest.approx([0.0, 2**-0.5, 2**-0.5])
    assert coh.mu == pytest.approx(2**-0.5)
    assert coh.per_unit == pytest.approx([2**-0.5, 2**-0.5, 2**-0.5])


def test_coherence_uses_the_aip():
    # Euclidean-parallel-ish rows that are orthogonal under S̃ = (A Aᵀ)⁻¹.
    a = torch.tensor([[1.0, 0.9], [0.0, 0.1]], dtype=torch.float64)
    aip = AIP.from_moment(a @ a.T)
    atoms = torch.eye(2, dtype=torch.float64) @ a.T
    assert coherence(atoms).mu > 0.9
    assert coherence(atoms, aip).mu == pytest.approx(0.0, abs=1e-9)


def test_streaming_histogram_matches_exact():
    d = torch.randn(300, 40)
    exact = coherence(d, exact_max_n=10_000)
    streamed = coherence(d, exact_max_n=10, block=64)
    assert not streamed.exact and streamed.pairwise.n == 300 * 299 // 2
    qs = np.array([0.01, 0.1, 0.5, 0.9, 0.999])
    assert streamed.pairwise.quantile(qs) == pytest.approx(exact.pairwise.quantile(qs), rel=5e-3)
    assert streamed.per_unit == pytest.approx(exact.per_unit)
    assert streamed.mu == pytest.approx(exact.mu)


def test_log_histogram_edges():
    h = LogHistogram(bins=100, low=1e-6)
    h.add(torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert h.quantile(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_uniqueness_threshold():
    assert uniqueness_threshold([0, 1, 2, 3]).tolist() == [np.inf, 1.0, 1 / 3, 1 / 5]


def test_q_star_hand_computed():
    coh = ExactSample([0.1, 0.2, 0.3])  # linear quantiles: μ_q = 0.1 + 0.2q
    assert q_star_crossing(coh, [1, 1, 1]) == 1.0  # t = 1
    assert q_star_crossing(coh, [2, 2, 2]) == 1.0  # t = 1/3 > 0.3
    # K = 3: t = 0.2, so μ_q < 0.2 ⟺ q < 0.5.
    assert q_star_crossing(coh, [3, 3]) == pytest.approx(0.5, abs=2e-4)
    assert q_star_crossing(coh, [3, 3]) < 0.5
    assert q_star_crossing(ExactSample([0.5, 0.6]), [4]) == 0.0  # g(0) ≥ 0
    assert q_star_crossing(ExactSample([0.5]), [0, 0]) == 1.0  # empty codes are unique


def test_q_star_is_one_for_orthogonal_atoms_with_k1():
    coh = coherence(torch.eye(16))
    for reading in ("pairwise", "per_unit"):
        assert q_star(coh, torch.ones(100), reading) == 1.0


def test_q_star_falls_as_coherence_rises():
    k = torch.randint(1, 4, (500,))
    values = []
    for eps in (0.0, 0.1, 0.2, 0.3, 0.45):
        w = whitened_atoms(16, 16, eps, torch.Generator().manual_seed(1))
        values.append(q_star(coherence(w), k))
    assert all(a >= b for a, b in zip(values, values[1:], strict=False)), values
    assert values[0] == 1.0 and values[-1] < 0.7, values


def test_per_activation_reading_and_uniqueness():
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # |G| = 1/√2 between neighbours
    codes = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    local = local_coherence(codes, d)
    assert local == pytest.approx([0.0, 0.0, 2**-0.5])
    k = l0_per_row(codes)  # [1, 2, 2]: t = [1, 1/3, 1/3]
    coh = coherence(d)
    assert q_star(coh, k, "per_activation", local) == pytest.approx(2 / 3)
    assert uniqueness_satisfied(coh.mu, k) == pytest.approx(1 / 3)
    with pytest.raises(InputError, match="unknown reading"):
        q_star(coh, k, "bogus")


def test_rip_and_theorem_interval():
    assert rip_bound(0.1, 4) == pytest.approx(0.3)
    assert rip_bound(0.5, 1) == 0.0
    lo, hi = theorem_interval(0.1, 2, 1.0, 2.0)
    assert (lo, hi) == pytest.approx((0.4, 0.8))
    lo, hi = theorem_interval(0.3, 3, 1.0, 2.0)
    assert lo > hi  # δ_min = 1 < ε(2K−1)δ_max = 3: infeasible


def test_coherence_rejects_bad_directions():
    with pytest.raises(InputError, match="at least two"):
        coherence(torch.ones(1, 3))
    with pytest.raises(InputError, match="NaN"):
        coherence(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(InputError, match="zero-norm"):
        coherence(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


@given(d=st.integers(2, 12), seed=st.integers(0, 10_000), n=st.integers(1, 50))
@settings(max_examples=30, deadline=None)
def test_q_star_is_one_for_aip_orthonormal_atoms_with_k1_property(d, seed, n):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64)
    aip = AIP.from_moment(a @ a.T, allow_floor=True)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    coh = coherence(q.T @ a.T, aip)  # orthonormal under S̃ = (A Aᵀ)⁻¹
    k = torch.ones(n)
    assert q_star(coh, k, "pairwise") == 1.0 and q_star(coh, k, "per_unit") == 1.0


@given(seed=st.integers(0, 10_000), low=st.floats(0.0, 0.2), high=st.floats(0.25, 0.6))
@settings(max_examples=15, deadline=None, derandomize=True)
def test_q_star_never_rises_with_coherence_property(seed, low, high):
    k = torch.randint(1, 4, (300,), generator=torch.Generator().manual_seed(seed))
    q = [q_star(coherence(whitened_atoms(12, 12, eps, torch.Generator().manual_seed(seed))), k)
         for eps in (low, high)]
    assert q[0] >= q[1]
