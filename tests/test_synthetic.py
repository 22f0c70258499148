import numpy as np
import pytest
import torch

from atoms.core.errors import ConfigError, InputError
from atoms.evaluate.synthetic import (
    SyntheticConfig,
    make_atom_set,
    match_atoms,
    welch_bound,
    whitened_atoms,
)


@pytest.mark.parametrize("d, n, eps", [(16, 16, 0.0), (16, 8, 0.3), (16, 32, 0.35), (32, 64, 0.25)])
def test_whitened_atoms_hit_the_target_coherence(d, n, eps):
    w = whitened_atoms(d, n, eps, torch.Generator().manual_seed(0))
    assert torch.allclose(w.norm(dim=1), torch.ones(n, dtype=torch.float64))
    g = (w @ w.T).abs().fill_diagonal_(0)
    assert float(g.max()) == pytest.approx(eps, abs=1e-3)


def test_unreachable_coherence_names_the_welch_bound():
    with pytest.raises(InputError, match="Welch bound 0.108"):
        whitened_atoms(64, 256, 0.05, torch.Generator().manual_seed(0))
    assert welch_bound(64, 256) == pytest.approx(0.10847, abs=1e-5)


def test_atom_set_properties():
    s = make_atom_set(
        SyntheticConfig(
            d=16, n_atoms=24, coherence=0.4, k=3, n_samples=500, exact_k=True, condition=50
        )
    )
    assert torch.allclose(s.aip.norm(s.atoms), torch.ones(24, dtype=torch.float64), atol=1e-8)
    assert s.aip.gram(s.atoms).fill_diagonal_(0).abs().max() == pytest.approx(0.4, abs=1e-3)
    assert ((s.codes > 0).sum(1) == 3).all()
    active = s.codes[s.codes > 0]
    assert float(active.min()) >= 1.0 and float(active.max()) <= 2.0
    assert torch.allclose(s.activations, s.codes @ s.atoms)
    # Euclidean geometry differs from the AIP: the Euclidean coherence is larger.
    w = s.atoms / s.atoms.norm(dim=1, keepdim=True)
    assert float((w @ w.T).abs().fill_diagonal_(0).max()) > 0.5


def test_match_atoms_finds_a_permuted_noisy_copy():
    true = torch.randn(20, 10, dtype=torch.float64)
    perm = torch.randperm(20)
    learned = -3.0 * true[perm] + 1e-4 * torch.randn(20, 10, dtype=torch.float64)
    m = match_atoms(torch.cat([learned, torch.randn(5, 10, dtype=torch.float64)]), true)
    assert m.recovery_rate(0.99) == 1.0
    assert np.array_equal(perm[m.assignment].numpy(), np.arange(20))
    assert match_atoms(torch.randn(20, 10), true).recovery_rate(0.99) == 0.0


def test_invalid_synthetic_config():
    with pytest.raises(ConfigError, match="^coherence:"):
        SyntheticConfig(coherence=1.2)
    with pytest.raises(ConfigError, match="^k:"):
        SyntheticConfig(n_atoms=4, k=5)
