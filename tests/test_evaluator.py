import math

import pytest
import torch

from atoms.aip.metric import AIP, SecondMoment
from atoms.core.errors import ConfigError, InputError
from atoms.evaluate.evaluator import UnitEvalConfig, evaluate_unit_set
from atoms.evaluate.metrics import theorem_interval
from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set
from atoms.evaluate.units import UnitSet
from atoms.sae.model import SAEConfig, ThresholdSAE

K = 3


@pytest.fixture(scope="module")
def identifiable():
    """48 AIP-unit atoms with coherence ε = 0.15 and K = 3, δ ∈ [1, 1.2]: δ_min > ε(2K−1)δ_max,
    so the closed-form TSAE with τ inside (εKδ_max, δ_min − ε(K−1)δ_max) recovers supports."""
    s = make_atom_set(SyntheticConfig(d=48, n_atoms=48, coherence=0.15, k=K, delta_min=1.0,
                                      delta_max=1.2, n_samples=800, condition=10.0))
    assert s.theorem_holds
    lo, hi = theorem_interval(s.coherence, K, 1.0, 1.2)
    sae = ThresholdSAE.from_dictionary(s.atoms, s.aip, (lo + hi) / 2)
    return s, sae, s.activations.float()


def _fitted_aip(x):
    return AIP.from_moment(SecondMoment(x.shape[1]).update(x))


def test_neurons_reconstruct_exactly_and_count_active_with_the_tolerance():
    x = torch.randn(300, 16)
    x[:100, 0] = 1e-8  # below neuron_tol = 1e-6 but non-zero
    for aip in (None, _fitted_aip(x)):
        row = evaluate_unit_set(UnitSet.neurons(16), x, aip)
        for v in ("euclid_centred", "euclid_uncentred", "aip_centred", "aip_uncentred"):
            assert row[f"r2_{v}"] == pytest.approx(1.0, abs=1e-12)
        assert row["l0_mean"] == pytest.approx(16 - 100 / 300)
        assert row["l0_mean_tol0"] == 16.0 and row["l0_max"] == 16.0
        assert row["dead_fraction"] == 0.0
        assert math.isnan(row["recovery_support_exact"]) and math.isnan(row["omp_k"])
    # Euclidean neurons are orthonormal: μ = 0 < 1/(2K − 1) for every K.
    row = evaluate_unit_set(UnitSet.neurons(16), x, None)
    assert row["coherence_max"] == 0.0 and row["rip_bound"] == 0.0
    assert row["q_star_pairwise"] == row["q_star_per_unit"] == row["q_star_per_activation"] == 1.0
    assert row["uniqueness_pct"] == 100.0


def test_closed_form_tsae_in_its_identifiable_regime(identifiable):
    s, sae, x = identifiable
    units = UnitSet.from_sae(sae, "closed", "atoms")
    cfg = UnitEvalConfig(sparsity_rows=512)
    row = evaluate_unit_set(units, x[:600], s.aip, cfg, sae=sae, train_rows=x[600:])
    assert row["eval_rows"] == 512.0
    # Codes are δⱼ plus interference Σₖ δₖ Gⱼₖ (|G| ≤ ε), so R² is near but below 1.
    for prefix in ("r2_", "train_r2_"):
        for v in ("euclid_centred", "aip_centred", "aip_uncentred"):
            assert 0.95 < row[prefix + v] < 1.0
    assert row["l0_mean"] == row["l0_max"] == K and row["dead_fraction"] == 0.0
    assert row["coherence_max"] == pytest.approx(0.15, abs=1e-6)
    assert row["q_star_pairwise"] == row["q_star_per_unit"] == row["q_star_per_activation"] == 1.0
    assert row["uniqueness_pct"] == 100.0 and row["rip_holds"] == 1.0
    assert row["rip_bound"] == pytest.approx((K - 1) * 0.15, abs=1e-6)
    assert row["recovery_support_exact"] == row["recovery_support_jaccard"] == 1.0
    bp = evaluate_unit_set(units, x[:200], s.aip, UnitEvalConfig(recovery_rows=4,
                           recovery_method="basis_pursuit"), sae=sae)
    assert bp["recovery_support_exact"] == 1.0
    assert math.isnan(bp["train_r2_aip_centred"])  # no train_rows given


def test_random_directions_have_lower_q_star_than_atoms_at_the_same_k(identifiable):
    s, sae, x = identifiable
    atoms = evaluate_unit_set(UnitSet.from_sae(sae, "closed", "atoms"), x, s.aip, sae=sae)
    rand = evaluate_unit_set(UnitSet.random(48, 48, seed=1), x, s.aip, random_k=K)
    assert rand["l0_max"] == K and rand["omp_k"] == K
    assert rand["eval_rows"] == UnitEvalConfig().local_rows
    assert rand["q_star_pairwise"] < 0.8 < atoms["q_star_pairwise"]
    assert rand["q_star_per_unit"] < 0.1 and rand["q_star_per_activation"] < 0.5
    assert rand["uniqueness_pct"] < 5.0 and rand["rip_holds"] == 0.0
    assert rand["r2_aip_centred"] < 0.5  # K = 3 random directions explain little


def test_omp_codes_are_mapped_back_to_input_units(identifiable):
    """Ground-truth atoms without an encoder are coded by OMP (exact here: μ < 1/(2K − 1)).
    Their Euclidean-unit directions are not AIP-unit under this ill-conditioned S̃, so R² = 1
    only if coefficients are put back on dⱼ / ‖dⱼ‖_S̃."""
    s, _, x = identifiable
    units = UnitSet("truth", "atoms", s.atoms.float())
    row = evaluate_unit_set(units, x, s.aip, UnitEvalConfig(local_rows=64), random_k=K)
    assert row["eval_rows"] == 64.0 and row["l0_mean"] == K
    for v in ("euclid_centred", "euclid_uncentred", "aip_centred", "aip_uncentred"):
        assert row[f"r2_{v}"] == pytest.approx(1.0, abs=1e-6)


def test_every_kind_returns_the_same_keys_as_floats(identifiable):
    s, sae, x = identifiable
    x = x[:100]
    rows = [
        evaluate_unit_set(UnitSet.neurons(48), x, s.aip),
        evaluate_unit_set(UnitSet.from_sae(sae, "f", "features"), x, s.aip, sae=sae,
                          train_rows=x),
        evaluate_unit_set(UnitSet.from_sae(sae, "f", "features"), x, s.aip),  # encoder only
        evaluate_unit_set(UnitSet.random(48, 60), x, s.aip, random_k=2),
        evaluate_unit_set(UnitSet("truth", "atoms", s.atoms.float()), x, None),
    ]
    keys = set(rows[0])
    assert {"r2_aip_centred", "train_r2_euclid_uncentred", "l0_p90", "q_star_per_activation",
            "uniqueness_pct", "rip_holds", "recovery_support_jaccard", "eval_seconds"} <= keys
    for row in rows:
        assert set(row) == keys
        assert all(isinstance(v, float) for v in row.values())


def test_hand_computed_encoder_set():
    """D = {e₁, e₂, (e₁+e₂)/√2}: μ = 1/√2. Codes (x₊, 0) give K = 1, 1, 2, 2."""
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    units = UnitSet("hand", "features", dirs,
                    lambda x: torch.cat([x.clamp_min(0), torch.zeros(len(x), 1)], 1))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 1.0]])
    row = evaluate_unit_set(units, x, None)
    mu = 1 / math.sqrt(2)
    assert row["r2_euclid_centred"] == pytest.approx(1.0)  # x̂ = codes · D = x
    assert row["coherence_max"] == pytest.approx(mu)
    assert row["l0_mean"] == 1.5 and row["l0_median"] == 1.5
    assert row["dead_fraction"] == pytest.approx(1 / 3)  # the diagonal never fires
    # μ < 1/(2K − 1): 1 for K = 1, 1/3 for K = 2 -> half the rows.
    assert row["uniqueness_pct"] == pytest.approx(50.0)
    assert row["rip_bound"] == pytest.approx(0.5 * mu) and row["rip_holds"] == 1.0
    # Locally each K = 2 support is {e₁, e₂} with |G| = 0, so every row is unique.
    assert row["q_star_per_activation"] == 1.0
    # per_unit: μⱼ = 1/√2 for all j; K_q = 1 + 3(q − ⅓) on [⅓, ⅔] stays below (√2 + 1)/2
    # while q < ⅓ + (√2 − 1)/6.
    assert row["q_star_per_unit"] == pytest.approx(1 / 3 + (math.sqrt(2) - 1) / 6, abs=2e-4)


def test_bad_input_is_a_one_line_error():
    units = UnitSet.random(16, 20)
    with pytest.raises(InputError, match="holdout: expected width d=16, got 8"):
        evaluate_unit_set(units, torch.randn(10, 8), None)
    with pytest.raises(InputError, match="NaN"):
        evaluate_unit_set(units, torch.full((4, 16), float("nan")), None)
    sae = ThresholdSAE(SAEConfig(d_in=16, d_sae=24))
    with pytest.raises(InputError, match="d_sae=24"):
        evaluate_unit_set(units, torch.randn(10, 16), None, sae=sae)
    with pytest.raises(InputError, match="K=17"):
        evaluate_unit_set(units, torch.randn(10, 16), None, random_k=17)
    with pytest.raises(ConfigError, match="recovery_method"):
        UnitEvalConfig(recovery_method="lasso")
    with pytest.raises(ConfigError, match="local_rows"):
        UnitEvalConfig(local_rows=0)


def test_duplicate_pairs_are_counted_in_the_aip_geometry():
    from atoms.evaluate.metrics import duplicates

    g = torch.Generator().manual_seed(3)
    d = torch.randn(6, 5, generator=g, dtype=torch.float64)
    d[4] = -2.0 * d[1]  # parallel (opposite sign) in every metric
    d[5] = d[2] + 1e-4 * torch.randn(5, generator=g, dtype=torch.float64)
    count, later = duplicates(d)
    assert count == 2 and later.tolist() == [False, False, False, False, True, True]
    stretch = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1e6], dtype=torch.float64))
    e = torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0.1], [0, 1.0, 0, 0, 0]])
    assert duplicates(e)[0] == 1 and duplicates(e, stretch)[0] == 0  # apart under S̃
    units = UnitSet("twins", "random", d.float())
    row = evaluate_unit_set(units, torch.randn(40, 5, generator=g), None,
                            UnitEvalConfig(local_rows=8, random_k=2))
    assert row["duplicate_pairs"] == 2.0
