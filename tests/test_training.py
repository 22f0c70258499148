"""A trained TSAE identifies known atoms, and its thresholds learn."""

import math

import pytest
import torch

from atoms.core.errors import ConfigError, InputError, TrainingDiverged
from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set, match_atoms
from atoms.sae.model import SAEConfig, ThresholdSAE
from atoms.train.loop import TrainConfig, schedule, train_sae


@pytest.fixture(scope="module")
def trained():
    # H=64, N=128 atoms at AIP coherence 0.15 (the Welch bound for this size is 0.089), K ≤ 3.
    s = make_atom_set(
        SyntheticConfig(
            d=64, n_atoms=128, coherence=0.15, k=3, exact_k=False, n_samples=30000, seed=0
        )
    )
    sae = ThresholdSAE(
        SAEConfig(d_in=64, d_sae=256, bandwidth=0.1, init_threshold=0.3, bias=False)
    )
    cfg = TrainConfig(
        steps=2500, batch_size=1024, sparsity_coeff=0.06, sparsity_warmup_steps=0,
        resample_every=250,
    )
    result = train_sae(sae, s.activations.float(), cfg, progress=False)
    return s, sae, result


def test_trained_tsae_recovers_the_true_atoms(trained):
    s, sae, _ = trained
    assert match_atoms(sae.directions, s.atoms).recovery_rate(0.99) >= 0.95


def test_thresholds_move_during_training(trained):
    _, _, result = trained
    moved = (result.threshold_end - result.threshold_start).abs()
    assert float(moved.mean()) > 0.05, "thresholds stayed at their initial value"
    assert float(moved.min()) > 0.0


def test_codes_become_as_sparse_as_the_truth(trained):
    s, sae, _ = trained
    with torch.no_grad():
        out = sae(s.activations[:2000].float())
    true_l0 = float((s.codes[:2000] > 0).sum(1).double().mean())
    assert abs(float(out.l0.mean()) - true_l0) < 0.3


def test_schedule_warmups_and_decay():
    cfg = TrainConfig(
        steps=100,
        lr=1.0,
        lr_warmup_steps=10,
        lr_decay_fraction=0.5,
        sparsity_coeff=2.0,
        sparsity_warmup_steps=20,
    )
    assert schedule(0, cfg) == pytest.approx((0.1, 0.1))
    assert schedule(30, cfg) == pytest.approx((1.0, 2.0))
    assert schedule(75, cfg)[0] == pytest.approx(0.5)


def test_training_rejects_bad_data():
    sae = ThresholdSAE(SAEConfig(d_in=4, d_sae=8))
    with pytest.raises(InputError, match="expected width d=4"):
        train_sae(sae, torch.randn(100, 5), TrainConfig(steps=1), progress=False)
    bad = torch.randn(100, 4)
    bad[7, 2] = float("nan")
    with pytest.raises(InputError, match=r"NaN/Inf values \(first at index \(7, 2\)\)"):
        train_sae(sae, bad, TrainConfig(steps=1), progress=False)


def test_divergence_stops_with_the_step():
    sae = ThresholdSAE(SAEConfig(d_in=4, d_sae=8))
    with pytest.raises(TrainingDiverged, match="non-finite loss at step [0-9]"):
        cfg = TrainConfig(steps=3, lr=1e30, lr_warmup_steps=0)
        train_sae(sae, torch.randn(64, 4), cfg, progress=False)


def test_invalid_train_config():
    with pytest.raises(ConfigError, match="^lr:"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="^batch_size:"):
        TrainConfig(batch_size=0)
    assert math.isfinite(TrainConfig().lr)


def test_a_16x_dictionary_recovers_every_atom_once():
    """A 16×H dictionary (1024 latents, H = 64) on 128 planted atoms: it recovers ≥ 95% of the
    atoms at |cos| > 0.99 with no pair of latents at AIP |cos| > 0.99, while the same run
    without duplicate resampling keeps hundreds of such pairs."""
    from atoms.evaluate.metrics import duplicates

    s = make_atom_set(SyntheticConfig(d=64, n_atoms=128, coherence=0.15, k=3, exact_k=False,
                                      n_samples=60000, seed=0))
    found = {}
    for on in (True, False):
        sae = ThresholdSAE(SAEConfig(d_in=64, d_sae=1024, bandwidth=0.1, init_threshold=0.3,
                                     bias=False))
        cfg = TrainConfig(steps=5000, batch_size=1024, sparsity_coeff=0.06,
                          sparsity_warmup_steps=0, resample_every=250,
                          resample_duplicates=on)
        train_sae(sae, s.activations.float(), cfg, progress=False)
        found[on] = (match_atoms(sae.directions, s.atoms).recovery_rate(0.99),
                     duplicates(sae.W_dec, s.aip.S)[0])
    assert found[True][0] >= 0.95 and found[True][1] == 0, found
    assert found[False][1] > 50, found
