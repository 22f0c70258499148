"""Training in the AIP geometry: whitened rows, the theorem's encoder, folding into raw weights."""

import dataclasses

import pytest
import torch

from atoms.aip.metric import AIP, SecondMoment, Whitening
from atoms.core.errors import ConfigError, InputError
from atoms.sae.model import SAEConfig, build_sae
from atoms.sae.saelens import load_sae, save_sae
from atoms.train.loop import TrainConfig, train_sae


def correlated_rows(n=2000, d=8, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, 1, d)[:, None]
    return torch.randn(n, d, generator=g) @ mix + offset


def whitening(x, centred):
    return AIP.from_moment(SecondMoment(x.shape[1], centred=centred).update(x))


def trained(cfg, x, aip, steps=60, step="auto"):
    sae = build_sae(cfg)
    train = TrainConfig(steps=steps, batch_size=200, lr=3e-3, sparsity_coeff=1e-3,
                        lr_warmup_steps=5, sparsity_warmup_steps=10, seed=0, step=step)
    train_sae(sae, x, train, aip=aip, progress=False)
    return sae


@pytest.mark.parametrize("kind,step", [("threshold", "auto"), ("threshold", "reference"),
                                       ("relu", "reference")])
def test_aip_geometry_with_identity_metric_is_euclidean_training(kind, step):
    x = correlated_rows()
    base = SAEConfig(d_in=8, d_sae=16, kind=kind, seed=3)
    euclid = trained(base, x, None, step=step)
    aip = trained(dataclasses.replace(base, geometry="aip"), x, AIP.euclidean(8), step=step)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(aip, name), getattr(euclid, name), rtol=1e-6,
                                   atol=1e-7)
    folded = aip.folded()
    torch.testing.assert_close(folded.W_enc, euclid.W_enc, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("centred", [False, True])
def test_folded_forward_equals_the_whitened_forward(centred, tmp_path):
    x = correlated_rows()
    aip = whitening(x, centred)
    cfg = SAEConfig(d_in=8, d_sae=16, geometry="aip", whitening="centred" if centred
                    else "uncentred", seed=1)
    sae = trained(cfg, x, aip)
    assert sae.whiten is not None
    rows = correlated_rows(300, seed=5)
    want = sae(rows)
    folded = sae.folded()
    assert folded.whiten is None and folded.cfg.geometry == "euclidean"
    got = folded(rows)
    rel = (got.recon - want.recon).norm() / want.recon.norm()
    assert rel <= 1e-5
    torch.testing.assert_close(got.pre, want.pre, rtol=1e-4, atol=1e-4)
    # Saved folded: raw weights in SAELens's forward, pre = (x − b_dec) W_enc + b_enc.
    loaded = load_sae(save_sae(folded, tmp_path / "sae"))
    assert loaded.trained_geometry == {"geometry": "aip", "whitening": cfg.whitening}
    w = {k: getattr(loaded, k).detach() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    s = float(loaded.input_scale)
    pre = (rows - w["b_dec"] / s) @ w["W_enc"] + w["b_enc"] / s
    codes = pre * (pre > loaded.threshold.detach() / s)
    recon = codes @ w["W_dec"] + w["b_dec"] / s
    assert (recon - want.recon).norm() / want.recon.norm() <= 1e-5


def test_aip_geometry_loss_is_the_aip_norm_and_atoms_have_unit_aip_norm():
    x = correlated_rows()
    aip = whitening(x, False)
    sae = trained(SAEConfig(d_in=8, d_sae=16, geometry="aip", seed=2), x, aip)
    out = sae(x[:100])
    s = float(sae.input_scale)
    mse = sae.loss(out, 0.0).mse / s**2
    want = aip.norm((x[:100] - out.recon).double()).pow(2).mean()
    torch.testing.assert_close(mse.double(), want, rtol=1e-4, atol=0)
    folded = sae.folded()
    norms = aip.norm(folded.W_dec.detach().double())
    torch.testing.assert_close(norms, torch.ones(16, dtype=torch.float64), rtol=1e-5, atol=0)


def test_theorem_init_is_dt_s_on_raw_rows_and_random_init_is_not():
    aip = AIP.from_moment(torch.diag(torch.tensor([4.0, 1.0, 0.25])))
    sae = build_sae(SAEConfig(d_in=3, d_sae=5, geometry="aip"))
    sae.set_whitening(Whitening.of(aip))
    folded = sae.folded()
    want = aip.S.float() @ folded.W_dec.detach().T
    torch.testing.assert_close(folded.W_enc.detach(), want, rtol=1e-5, atol=1e-6)
    rand = build_sae(SAEConfig(d_in=3, d_sae=5, init="random"))
    assert not torch.allclose(rand.W_enc, rand.W_dec.T)
    torch.testing.assert_close(rand.W_enc.norm(dim=0), torch.ones(5))


def test_checkpoint_form_keeps_the_whitening(tmp_path):
    x = correlated_rows()
    sae = trained(SAEConfig(d_in=8, d_sae=16, geometry="aip", seed=4), x, whitening(x, True))
    back = load_sae(save_sae(sae, tmp_path / "ckpt"), expect=sae.cfg)
    assert torch.equal(back.whiten, sae.whiten) and torch.equal(back.centre, sae.centre)
    torch.testing.assert_close(back(x[:50]).recon, sae(x[:50]).recon, rtol=1e-6, atol=1e-5)


def test_geometry_errors_are_one_line():
    with pytest.raises(ConfigError, match="decoder_norm"):
        SAEConfig(geometry="aip", decoder_norm="aip")
    sae = build_sae(SAEConfig(d_in=4, d_sae=4, geometry="aip"))
    with pytest.raises(InputError, match="needs S̃"):
        train_sae(sae, torch.randn(100, 4), TrainConfig(steps=2, batch_size=10), progress=False)


def test_batchtopk_keeps_k_per_row_on_average_and_becomes_its_jumprelu(tmp_path):
    x = correlated_rows(3000)
    cfg = SAEConfig(d_in=8, d_sae=32, kind="batchtopk", k=3, seed=0)
    sae = trained(cfg, x, None, steps=150)
    out = sae(x[:400])
    assert float(out.l0.mean()) == pytest.approx(3.0)
    jump = sae.inference_form()
    assert jump.cfg.kind == "threshold" and torch.equal(jump.threshold, sae.threshold)
    with torch.no_grad():
        assert 1.5 < float(jump(x[:400]).l0.mean()) < 6  # the learned θ keeps about k per row
    back = load_sae(save_sae(jump, tmp_path / "sae"))
    torch.testing.assert_close(back(x[:50]).recon, jump(x[:50]).recon, rtol=1e-5, atol=1e-4)
    again = load_sae(save_sae(sae, tmp_path / "ckpt"), expect=sae.cfg)  # the training form
    assert again.cfg.kind == "batchtopk" and torch.equal(again.threshold, sae.threshold)
