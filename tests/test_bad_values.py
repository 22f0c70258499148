"""Bad values get a one-line InputError naming the argument, never a silent or foreign answer."""

import numpy as np
import pytest
import torch

from atoms.aip.metric import AIP
from atoms.core.errors import InputError
from atoms.evaluate.evaluator import UnitEvalConfig, evaluate_unit_set
from atoms.evaluate.metrics import coherence, l0_summary, local_coherence, q_star
from atoms.evaluate.recovery import basis_pursuit, omp
from atoms.evaluate.synthetic import match_atoms
from atoms.evaluate.units import UnitSet
from atoms.sae.model import SAEConfig, ThresholdSAE
from tests.checks import one_line_error

NAN = float("nan")


def atoms(n=6, d=4, seed=0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = NAN
    return x


def with_zero_row(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[2] = 0.0
    return x


AIP4 = AIP.euclidean(4)
COH = coherence(atoms(), AIP4)

CASES = {
    "q_star, NaN in the L0 sample": (lambda: q_star(COH, [2.0, NAN, 1.0]), "l0: 1 NaN/Inf"),
    "q_star, negative L0": (lambda: q_star(COH, [2.0, -1.0, 1.0]), "l0: 1 negative"),
    "l0_summary, empty": (lambda: l0_summary([]), "l0: empty sample"),
    "omp, NaN signal": (lambda: omp(with_nan(atoms(3)), atoms()), "signals: 1 NaN/Inf"),
    "omp, NaN atom": (lambda: omp(atoms(3), with_nan(atoms())), "directions: 1 NaN/Inf"),
    "basis_pursuit, NaN signal": (lambda: basis_pursuit(with_nan(atoms(3)), atoms()),
                                  "signals: 1 NaN/Inf"),
    "match_atoms, zero direction": (lambda: match_atoms(with_zero_row(atoms()), atoms()),
                                    "match_atoms: learned: row 2 is zero"),
    "match_atoms, NaN direction": (lambda: match_atoms(atoms(), with_nan(atoms())),
                                   "match_atoms: true: 1 NaN/Inf"),
    "local_coherence, NaN codes": (lambda: local_coherence(with_nan(atoms(5, 6)), atoms()),
                                   "codes: 1 NaN/Inf"),
    "local_coherence, NaN directions": (
        lambda: local_coherence(atoms(5, 6), with_nan(atoms())), "directions: 1 NaN/Inf"),
    "AIP.gram, NaN": (lambda: AIP4.gram(with_nan(atoms())), "directions: 1 NaN/Inf"),
    "AIP.normalise, NaN": (lambda: AIP4.normalise(with_nan(atoms())),
                           "AIP.normalise: directions: 1 NaN/Inf"),
    "AIP.inner, mismatched shapes": (lambda: AIP4.inner(atoms(3), atoms(5)),
                                     "AIP.inner: shapes (3, 4) and (5, 4) do not broadcast"),
    "AIP.inner, wrong width": (lambda: AIP4.inner(atoms(3, 5), atoms(3, 5)),
                               "AIP.inner: rows of width d=4"),
    "from_dictionary, NaN atom": (
        lambda: ThresholdSAE.from_dictionary(with_nan(atoms()), AIP4, 0.1), "atoms: 1 NaN/Inf"),
    "from_dictionary, NaN threshold": (
        lambda: ThresholdSAE.from_dictionary(atoms(), AIP4, NAN), "threshold: 1 NaN/Inf"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_value_is_a_one_line_error_naming_it(case):
    call, message = CASES[case]
    one_line_error(call, message)


def test_nan_in_an_l0_sample_never_reads_as_full_stability():
    assert q_star(COH, [1.0, 1.0, 1.0]) == pytest.approx(1.0)  # the sane case still works
    with pytest.raises(InputError):
        q_star(COH, np.array([1.0, NAN]))


def test_recovery_rows_zero_switches_recovery_off():
    sae = ThresholdSAE(SAEConfig(d_in=4, d_sae=6, init_threshold=0.0))
    units = UnitSet.from_sae(sae, "atoms", "atoms")
    row = evaluate_unit_set(units, atoms(64).float(), None, UnitEvalConfig(recovery_rows=0),
                            sae=sae)
    assert np.isnan(row["recovery_support_exact"]) and np.isnan(row["recovery_support_jaccard"])
    assert np.isfinite(row["r2_euclid_centred"])
