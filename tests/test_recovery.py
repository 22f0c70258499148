import numpy as np
import pytest
import torch

from atoms.core.errors import InputError
from atoms.evaluate.recovery import basis_pursuit, l1_recovery_agreement, omp, support_agreement
from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set
from atoms.sae.model import ThresholdSAE


@pytest.fixture(scope="module")
def incoherent():
    # μ = 0.1 < 1/(2K − 1) = 1/3 for K = 2: both OMP and basis pursuit must be exact.
    return make_atom_set(
        SyntheticConfig(d=32, n_atoms=32, coherence=0.1, k=2, n_samples=40, condition=30.0)
    )


def test_omp_recovers_codes_exactly(incoherent):
    s = incoherent
    found = omp(s.activations, s.atoms, s.aip, k=2)
    assert np.allclose(found, s.codes.numpy(), atol=1e-8)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_basis_pursuit_recovers_codes_exactly(incoherent, nonnegative):
    s = incoherent
    found = basis_pursuit(s.activations, s.atoms, s.aip, nonnegative=nonnegative)
    assert np.allclose(found, s.codes.numpy(), atol=1e-6)


def test_coefficients_are_those_of_aip_unit_atoms(incoherent):
    """Rescaling the atoms changes nothing: ℓ1 is taken over AIP-normalised atoms."""
    s = incoherent
    scales = torch.logspace(-2, 2, s.atoms.shape[0], dtype=torch.float64)[:, None]
    for solve in (basis_pursuit, lambda m, a, aip: omp(m, a, aip, k=2)):
        found = solve(s.activations, s.atoms * scales, s.aip)
        assert np.allclose(found, s.codes.numpy(), atol=1e-6)


def test_support_agreement_hand_computed():
    a = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    b = np.array([[3.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = support_agreement(a, b)
    assert out["support_exact"] == 0.5
    assert out["support_jaccard"] == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(InputError, match="differ"):
        support_agreement(a, b[:, :2])


def test_l1_recovery_agreement_of_closed_form_sae(incoherent):
    s = incoherent
    sae = ThresholdSAE.from_dictionary(s.atoms, s.aip, 0.6)
    for method in ("basis_pursuit", "omp"):
        out = l1_recovery_agreement(sae, s.activations.float(), s.aip, method=method)
        assert out["support_exact"] == 1.0


def test_infeasible_basis_pursuit_names_the_row():
    atoms = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # span misses e3
    with pytest.raises(InputError, match="row 0"):
        basis_pursuit(torch.tensor([[0.0, 0.0, 1.0]]), atoms)
