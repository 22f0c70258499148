"""``converge``: train until the MSE stops improving (with a step cap), then a final phase."""

import pytest

from atoms.evaluate.evaluator import evaluate_sae
from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set
from atoms.sae.model import SAEConfig, build_sae
from atoms.train.batches import TensorBatches
from atoms.train.loop import TrainConfig, Trainer, schedule, train_epochs


@pytest.fixture(scope="module")
def planted():
    syn = make_atom_set(SyntheticConfig(d=32, n_atoms=96, k=6, exact_k=False, n_samples=9000,
                                        coherence=0.3))
    return syn.activations.float()


def _train(planted, **train):
    sae = build_sae(SAEConfig(d_in=32, d_sae=192, seed=0))
    cfg = TrainConfig(**{"steps": 4000, "batch_size": 256, "lr": 2e-3, "sparsity_coeff": 1e-3,
                         "sparsity_warmup_steps": 50, "lr_warmup_steps": 20, "converge": True,
                         "converge_window": 100, "log_every": 25, **train})
    trainer = Trainer(sae, cfg)
    sae.fit_input_scale(planted[:8000])
    train_epochs(trainer, TensorBatches(planted[:8000], cfg.batch_size, 0))
    return sae, trainer, cfg


def test_a_converging_run_stops_once_the_mse_is_flat(planted):
    sae, trainer, cfg = _train(planted, converge_tol=0.02)
    s = trainer.state
    assert s.converged_at is not None and s.step == s.stop_at < cfg.steps
    assert s.stop_at - s.converged_at == cfg.converge_window
    h = s.history
    last = [r["mse"] for r in h if s.converged_at - 2 * cfg.converge_window < r["step"]
            <= s.converged_at]
    prev, cur = sum(last[:4]) / 4, sum(last[4:]) / 4
    assert abs(prev - cur) <= 0.02 * prev
    assert h[-1]["lr"] < 0.05 * cfg.lr  # the final phase decays the learning rate to 0


def test_a_tighter_tolerance_trains_longer(planted):
    loose = _train(planted, converge_tol=0.05)[1].state.step
    tight = _train(planted, converge_tol=0.005)[1].state.step
    assert tight > loose


def test_a_steered_run_converges_only_at_its_target_l0(planted):
    sae, trainer, cfg = _train(planted, target_l0=8.0, converge_tol=0.02)
    s = trainer.state
    assert s.converged_at is not None and s.step < cfg.steps
    assert abs(s.probe_l0 / 8.0 - 1) <= 0.1
    assert abs(evaluate_sae(sae, planted[8000:])["eval_l0_mean"] / 8.0 - 1) <= 0.1
    frozen = {r["sparsity_coeff"] for r in s.history if r["step"] > s.converged_at}
    assert len(frozen) == 1  # λ fixed in the final phase


def test_a_run_that_never_flattens_stops_at_the_cap_unconverged(planted):
    sae, trainer, cfg = _train(planted, steps=300, converge_tol=1e-7)
    assert trainer.state.converged_at is None and trainer.state.step == 300


def test_the_final_phase_schedule_decays_to_zero():
    cfg = TrainConfig(steps=1000, lr=1.0, lr_warmup_steps=0, sparsity_warmup_steps=0)
    assert schedule(500, cfg, final=(400, 600))[0] == pytest.approx(0.5)
    assert schedule(600, cfg, final=(400, 600))[0] == 0.0
    assert schedule(300, cfg, final=(400, 600))[0] == 1.0
