"""Our side of ``benchmarks/synthetic_peers.py`` on a tiny planted setting: the project's default
threshold SAE, steered to the true L0, learns the planted dictionary in both geometries."""

import pytest
import torch

from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set, match_atoms
from atoms.train.batches import TensorBatches
from benchmarks.synthetic_peers import our_configs, train_ours


@pytest.mark.parametrize("geometry", ["euclidean", "aip"])
def test_our_side_matches_the_true_l0_and_learns_the_planted_atoms(geometry):
    planted = make_atom_set(SyntheticConfig(d=32, n_atoms=48, k=3, coherence=0.2,
                                            n_samples=12_000, condition=4.0, seed=3))
    rows = planted.activations.float()
    train, probe = rows[:10_000], rows[10_000:]
    sae_cfg, train_cfg = our_configs(width=96, hidden=32, target_l0=3.0, samples=1_500 * 256,
                                     lr=1e-3, batch=256, geometry=geometry, seed=0)
    sae, trainer, _ = train_ours(TensorBatches(train, 256, seed=0), train, probe, sae_cfg,
                                 train_cfg)
    with torch.no_grad():
        l0 = float((sae.encode(probe)[0] != 0).sum(1).float().mean())
    assert abs(l0 / 3.0 - 1) <= 0.1, l0
    assert trainer.state.step == train_cfg.steps
    recovered = match_atoms(sae.directions, planted.atoms).cosines
    assert recovered.mean() >= 0.95, recovered.mean()
