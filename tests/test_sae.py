import pytest
import torch

from atoms.aip.metric import AIP
from atoms.core.errors import ConfigError
from atoms.sae.model import JumpReLUWithL0, ReLUSAE, SAEConfig, ThresholdSAE, build_sae


def test_jumprelu_forward_and_ste_backward_hand_computed():
    pre = torch.tensor([[0.5, 0.1, 0.3, 0.33]], requires_grad=True)
    theta = torch.full((4,), 0.3, requires_grad=True)
    codes, l0 = JumpReLUWithL0.apply(pre, theta, 0.1)
    assert codes.tolist() == [[0.5, 0.0, 0.0, pytest.approx(0.33)]]
    assert l0.tolist() == [2.0]
    (codes.sum() + l0.sum()).backward()
    # ∂/∂z = 1[z > θ]; ∂/∂θ = −(1/ε)K((z−θ)/ε)(θ·g_codes + g_l0), K = 1[|u| < ½]
    assert pre.grad.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    inside = -(1 / 0.1) * (0.3 + 1.0)
    assert theta.grad.tolist() == pytest.approx([0.0, 0.0, inside, inside])


def test_threshold_is_a_raw_fp32_parameter_and_moves_under_the_l0_loss():
    sae = ThresholdSAE(SAEConfig(d_in=8, d_sae=16, bandwidth=0.5, init_threshold=0.05))
    assert sae.threshold.dtype == torch.float32
    assert any(p is sae.threshold for p in sae.parameters())
    x = torch.randn(256, 8)
    before = sae.threshold.detach().clone()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        out = sae(x)
        loss = sae.loss(out, sparsity_coeff=10.0).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (sae.threshold.detach() - before).abs().max() > 0.01


def test_b_dec_is_folded_into_the_encoder_bias():
    sae = ThresholdSAE(SAEConfig(d_in=4, d_sae=6))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(5, 4)
    expected = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.allclose(sae.pre_activations(x), expected, atol=1e-6)


def test_input_scale_normalises_and_reconstruction_returns_to_input_units():
    sae = ThresholdSAE(SAEConfig(d_in=4, d_sae=4, bias=False))
    x = 50 * torch.randn(200, 4)
    s = sae.fit_input_scale(x)
    assert float((x * s).pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4))
        sae.W_enc.copy_(torch.eye(4))
        sae.threshold.fill_(-1e9)
    assert torch.allclose(sae(x).recon, x, rtol=1e-4, atol=1e-3)


def test_decoder_constraints():
    sae = ThresholdSAE(SAEConfig(d_in=3, d_sae=5))
    with torch.no_grad():
        sae.W_dec.mul_(7.0)
        sae.threshold.fill_(-0.2)
    sae.constrain_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(5), atol=1e-6)
    assert (sae.threshold == 0).all()

    aip_sae = ThresholdSAE(SAEConfig(d_in=3, d_sae=5, decoder_norm="aip"))
    aip = AIP.from_moment(torch.diag(torch.tensor([4.0, 1.0, 0.25])))
    aip_sae.set_metric(aip)
    norms = aip.norm(aip_sae.W_dec.detach().double())
    assert torch.allclose(norms, torch.ones(5, dtype=torch.float64), atol=1e-5)


def test_closed_form_constructor():
    atoms = torch.randn(6, 4, dtype=torch.float64)
    aip = AIP.from_moment(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    sae = ThresholdSAE.from_dictionary(atoms, aip, 0.25)
    assert torch.allclose(sae.W_dec, atoms.float())
    assert torch.allclose(sae.W_enc, (aip.S @ atoms.T).float())
    assert (sae.threshold == 0.25).all() and not sae.cfg.bias


def test_relu_sae_l1_penalty():
    sae = build_sae(SAEConfig(d_in=4, d_sae=3, kind="relu"))
    assert isinstance(sae, ReLUSAE) and sae.cfg.sparsity_loss == "l1"
    out = sae(torch.randn(10, 4))
    expected = out.codes @ sae.W_dec.norm(dim=1)
    assert torch.allclose(sae.sparsity_penalty(out), expected)
    assert (out.codes >= 0).all()


def test_tanh_sparsity_variant():
    sae = ThresholdSAE(SAEConfig(d_in=4, d_sae=3, sparsity_loss="tanh", init_threshold=0.0))
    out = sae(torch.randn(10, 4))
    expected = torch.tanh(4.0 * out.codes * sae.W_dec.norm(dim=1)).sum(-1)
    assert torch.allclose(sae.sparsity_penalty(out), expected)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d_sae": 0}, "d_sae"),
        ({"kind": "relu", "sparsity_loss": "tanh"}, "sparsity_loss"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"init_threshold": -1.0}, "init_threshold"),
    ],
)
def test_invalid_sae_configs(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        SAEConfig(**{"d_in": 4, "d_sae": 8, **kwargs})
