"""The hand-written threshold-SAE step against autograd through the module."""

import pytest
import torch

from atoms.core.errors import InputError
from atoms.sae.model import SAEConfig, ThresholdSAE
from atoms.train.fast_step import FastThresholdStep
from atoms.train.loop import SAEObjective, TrainConfig, Trainer


def random_sae(bias: bool, seed: int = 0, d: int = 24, n: int = 80) -> ThresholdSAE:
    torch.manual_seed(seed)
    sae = ThresholdSAE(SAEConfig(d_in=d, d_sae=n, bandwidth=0.05, bias=bias, seed=seed))
    with torch.no_grad():
        if bias:
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.1)
        sae.threshold.uniform_(0.0, 0.5)
        sae.input_scale.fill_(0.8)
    return sae


def reference(sae: ThresholdSAE, x: torch.Tensor, coeff: float):
    sae.zero_grad(set_to_none=True)
    loss, mse, l0, fired = SAEObjective(sae)(x, coeff)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad(set_to_none=True)
    return (loss.detach(), mse, l0, fired), grads


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_step_gives_autograds_loss_and_gradients(mode, bias):
    sae = random_sae(bias)
    x = torch.randn(64, 24) * 1.5
    (loss, mse, l0, fired), grads = reference(sae, x, 0.3)
    got = FastThresholdStep(sae, mode)(x, 0.3)
    assert got[0].item() == pytest.approx(loss.item(), rel=1e-5)
    assert got[1].item() == pytest.approx(mse.item(), rel=1e-5)
    assert got[2].item() == l0.item()
    assert torch.equal(got[3], fired)
    params = dict(sae.named_parameters())
    assert set(grads) == {k for k, p in params.items() if p.grad is not None}
    assert grads["threshold"].abs().sum() > 0  # the STE window holds entries
    for name, g in grads.items():
        torch.testing.assert_close(params[name].grad, g, rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_and_dense_paths_agree_at_a_trained_sparsity():
    sae = random_sae(True, seed=3, d=32, n=512)
    x = torch.randn(256, 32)
    with torch.no_grad():  # each latent fires on about 2% of rows
        sae.threshold.copy_(torch.quantile(sae.pre_activations(x * sae.input_scale), 0.98, 0))
    dense = FastThresholdStep(sae, "dense")(x, 0.1)
    dense_grads = {k: p.grad.clone() for k, p in sae.named_parameters()}
    sparse = FastThresholdStep(sae, "sparse")(x, 0.1)
    assert 5 < dense[2].item() < 20 and sparse[2].item() == dense[2].item()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, dense_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_mode_switches_to_sparse_once_codes_are_sparse():
    sae = random_sae(True, d=16, n=200)
    x = torch.randn(128, 16)
    step = FastThresholdStep(sae, "auto", sparse_below=0.1)
    step(x, 0.0)
    assert step.last_path == "dense" and step.density > 0.1
    with torch.no_grad():
        sae.threshold.fill_(10.0)  # nothing fires
    step(x, 0.0)
    step(x, 0.0)
    assert step.last_path == "sparse"


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_a_nan_pre_activation_reaches_the_loss(mode):
    sae = random_sae(True)
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    assert not torch.isfinite(FastThresholdStep(sae, mode)(torch.randn(8, 24), 0.1)[0])


def test_other_saes_are_refused_and_trainer_falls_back():
    relu = ThresholdSAE(SAEConfig(d_in=8, d_sae=16, sparsity_loss="tanh"))
    with pytest.raises(InputError, match="sparsity_loss 'l0'"):
        FastThresholdStep(relu)
    assert Trainer(relu, TrainConfig(steps=1)).fast is None


def test_trainer_steps_match_the_reference_trainer():
    x = torch.randn(96, 24)
    runs = {}
    for step in ("auto", "reference"):
        sae = random_sae(True, seed=1)
        trainer = Trainer(sae, TrainConfig(steps=5, batch_size=96, lr=1e-2, lr_warmup_steps=0,
                                           sparsity_coeff=0.05, sparsity_warmup_steps=0,
                                           step=step))
        for _ in range(5):
            trainer.step(x)
        runs[step] = {k: p.detach().clone() for k, p in sae.named_parameters()}
    for name, value in runs["reference"].items():
        torch.testing.assert_close(runs["auto"][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_dense_function_gives_autograds_gradients(bias, monkeypatch):
    import atoms.train.fast_step as fast_step
    from atoms.train.fused_step import dense_step

    monkeypatch.setattr(fast_step, "compiled_dense_step", lambda: dense_step)  # eager here
    sae = random_sae(bias)
    x = torch.randn(64, 24) * 1.5
    (loss, _, l0, fired), grads = reference(sae, x, 0.3)
    step = FastThresholdStep(sae, "dense", compiled=True)
    got = step(x, 0.3)
    assert step.last_path == "dense (compiled)"
    assert got[0].item() == pytest.approx(loss.item(), rel=1e-5) and got[2].item() == l0.item()
    assert torch.equal(got[3], fired)
    params = dict(sae.named_parameters())
    for name, g in grads.items():
        torch.testing.assert_close(params[name].grad, g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_pre_activation_loss_gradient_is_autograds(bias):
    """The dead latents' pre-activation loss c·(1/B) Σᵢ Σⱼ∈dead ReLU(θⱼ − zᵢⱼ)·‖dⱼ‖."""
    sae = random_sae(bias, seed=3)
    trainer = Trainer(sae, TrainConfig(steps=10, pre_act_coeff=0.7,
                                       pre_act_window_rows=5 * 1024))
    trainer.state.step = 20
    dead = torch.zeros(80, dtype=torch.bool)
    dead[[3, 17, 40, 79]] = True
    trainer.state.last_fired = torch.where(dead, 2, 19)
    x = torch.randn(32, 24)
    params = dict(sae.named_parameters())
    for p in params.values():
        p.grad = torch.zeros_like(p)
    trainer._pre_act_grad(x)
    got = {k: p.grad.clone() for k, p in params.items()}
    sae.zero_grad(set_to_none=True)
    z = sae.pre_activations(x * sae.input_scale)
    norms = torch.linalg.vector_norm(sae.W_dec, dim=1)
    loss = 0.7 / len(x) * ((sae.threshold - z).relu() * dead * norms.detach()).sum()
    loss.backward()
    for k, p in params.items():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-7)
    assert got["threshold"][dead].gt(0).any() and got["threshold"][~dead].eq(0).all()


def test_pre_activation_loss_revives_a_dead_latent():
    x = torch.randn(4096, 24)

    def train(coeff):
        sae = random_sae(True, seed=4)
        with torch.no_grad():
            sae.threshold[5] = 50.0  # far above every pre-activation: dead from the start
        trainer = Trainer(sae, TrainConfig(steps=300, batch_size=64, lr=1e-2,
                                           pre_act_window_rows=20 * 64, pre_act_coeff=coeff,
                                           log_every=50))
        for step in range(300):
            trainer.step(x[(step * 64) % 4096:][:64])
        return bool(trainer.state.last_fired[5] >= 0)

    assert not train(0.0) and train(1e-3)


def test_the_dead_window_is_rows_and_leaves_resampling_its_dead_latents():
    sae = random_sae(True, seed=5)
    assert Trainer(sae, TrainConfig(batch_size=1024)).pre_act_steps == 25
    assert Trainer(sae, TrainConfig(batch_size=256)).pre_act_steps == 100
    assert Trainer(sae, TrainConfig(batch_size=1024, resample_every=250)).pre_act_steps == 250
