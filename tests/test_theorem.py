"""The identifiability theorem (paper §4.11) on synthetic atoms with known coherence."""

import math

import pytest
import torch

from atoms.evaluate.metrics import l0_per_row, theorem_interval, threshold_interval_check
from atoms.evaluate.recovery import support_agreement
from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set
from atoms.sae.model import ThresholdSAE


def closed_form(eps, k, n_atoms=96, seed=0, threshold=None, n=3000):
    s = make_atom_set(
        SyntheticConfig(
            d=48,
            n_atoms=n_atoms,
            coherence=eps,
            k=k,
            n_samples=n,
            delta_min=1.0,
            delta_max=2.0,
            seed=seed,
        )
    )
    lo, hi = theorem_interval(s.coherence, k, 1.0, 2.0)
    tau = (lo + hi) / 2 if threshold is None else threshold
    sae = ThresholdSAE.from_dictionary(s.atoms, s.aip, tau)
    with torch.no_grad():
        out = sae(s.activations.float())
    return s, sae, out


@pytest.mark.parametrize(
    "eps, k, n_atoms", [(0.0, 4, 48), (0.1, 3, 48), (0.15, 2, 96), (0.18, 1, 96)]
)
def test_closed_form_recovers_every_support_inside_the_condition(eps, k, n_atoms):
    s, sae, out = closed_form(eps, k, n_atoms)
    assert s.theorem_holds
    assert support_agreement(out.codes, s.codes)["support_exact"] == 1.0
    # Reconstruction error obeys the O(Kε) bounds (paper notes §11.1), row by row.
    err = s.activations - out.recon.double()
    aip_bound = math.sqrt(1 + (k - 1) * s.coherence) * (k - 1) * s.coherence * math.sqrt(k) * 2.0
    euclid_bound = k * (k - 1) * s.coherence * 2.0 * float(s.atoms.norm(dim=1).max())
    tol = 1e-4 * float(s.activations.norm(dim=1).max())  # fp32 forward
    assert float(s.aip.norm(err).max()) <= aip_bound + tol
    assert float(err.norm(dim=1).max()) <= euclid_bound + tol
    if eps == 0.0:
        assert float(err.abs().max()) < tol  # exact when the atoms are AIP-orthogonal


def test_threshold_interval_check_on_the_closed_form():
    """Codes of AIP-orthogonal atoms are the true δ, so the empirical interval is the true one."""
    s, sae, out = closed_form(0.0, 2, n_atoms=48)
    check = threshold_interval_check(sae.threshold.detach(), out.codes, sae.W_dec.detach(), s.aip)
    assert check["interval_feasible"] and check["thresholds_inside"] == 1.0
    assert check["eps"] == pytest.approx(0.0, abs=1e-6) and check["k"] == 2
    zero = torch.zeros_like(sae.threshold)
    assert (
        threshold_interval_check(zero, out.codes, sae.W_dec.detach(), s.aip)["thresholds_inside"]
        == 0.0
    )


def test_failures_appear_outside_the_condition():
    s, _, out = closed_form(0.45, 3, n_atoms=96)
    assert not s.theorem_holds
    assert support_agreement(out.codes, s.codes)["support_exact"] < 0.9


def test_relu_leaks_when_the_threshold_is_zero():
    s, _, out = closed_form(0.15, 2, n_atoms=96, threshold=0.0)
    true_l0 = float(l0_per_row(s.codes).double().mean())
    assert float(out.l0.mean()) > true_l0 + 5  # cross-talk survives as extra active units
    assert support_agreement(out.codes, s.codes)["support_exact"] == 0.0
