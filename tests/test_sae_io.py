import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load
from safetensors.numpy import save_file as np_save

from atoms.sae import saelens as sae_io
from atoms.sae.model import SAEConfig, build_sae
from atoms.sae.saelens import load_sae, read_sae_cfg, save_sae
from tests.checks import one_line_error

D, N, S = 12, 24, 3.7


def random_sae(kind="threshold", seed=0, s=S):
    cfg = SAEConfig(d_in=D, d_sae=N, kind=kind, k=5 if kind == "topk" else 0, seed=seed)
    sae = build_sae(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, N, generator=g))
        sae.W_dec.copy_(torch.randn(N, D, generator=g))
        sae.b_enc.copy_(0.3 * torch.randn(N, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g))
        if kind == "threshold":
            sae.threshold.copy_(0.5 * torch.rand(N, generator=g))
        sae.input_scale.fill_(s)
    return sae


def inputs(n=64, seed=2):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) / S


def saelens_forward(w, x, architecture, k=None):
    """SAELens v6 inference forward (sae_lens/saes/{jumprelu,standard,topk}_sae.py), numpy."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # apply_b_dec_to_input=True
    if architecture == "jumprelu":
        f = np.maximum(pre, 0) * (pre > np.maximum(w["threshold"], 0))
    elif architecture == "standard":
        f = np.maximum(pre, 0)
    else:  # TopK: top-k values of pre, then ReLU, scattered back
        idx = np.argsort(-pre, axis=1)[:, :k]
        f = np.zeros_like(pre)
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    return f, f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("kind", ["threshold", "relu", "topk"])
def test_round_trip_gives_identical_outputs_and_unfolded_weights(tmp_path, kind):
    sae = random_sae(kind)
    save_sae(sae, tmp_path / "ckpt")
    back = load_sae(tmp_path / "ckpt", expect=sae.cfg)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    x = inputs()
    with torch.no_grad():
        a, b = sae(x), back(x)
    assert a.codes.count_nonzero() > 0
    torch.testing.assert_close(b.codes, a.codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.recon, a.recon, rtol=1e-5, atol=1e-5)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "input_scale", "metric"):
        torch.testing.assert_close(getattr(back, name), getattr(sae, name), rtol=1e-6, atol=1e-6)
    if kind == "threshold":
        torch.testing.assert_close(back.threshold, sae.threshold, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,arch", [("threshold", "jumprelu"), ("relu", "standard"),
                                       ("topk", "topk")])
def test_saved_weights_work_on_raw_inputs_with_the_saelens_formula(tmp_path, kind, arch):
    sae = random_sae(kind)
    folder = save_sae(sae, tmp_path / "ckpt")
    w = np_load(folder / "sae_weights.safetensors")
    expected = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if arch == "jumprelu"
                                                       else set())
    assert set(w) == expected  # SAELens load_state_dict is strict
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch
    x = inputs()
    codes, recon = saelens_forward(w, x.numpy(), arch, cfg.get("k"))
    with torch.no_grad():
        out = sae(x)
    # Codes come back in input units: f' = f / s.
    np.testing.assert_allclose(codes, out.codes.numpy() / S, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recon, out.recon.numpy(), rtol=1e-5, atol=1e-5)


def test_cfg_json_has_saelens_keys_metadata_and_our_block(tmp_path):
    sae = random_sae()
    folder = save_sae(sae, tmp_path / "ckpt", metadata={"model_name": "m", "hook_name": "h"})
    cfg = read_sae_cfg(folder)
    for key, value in {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
                       "apply_b_dec_to_input": True, "normalize_activations": "none"}.items():
        assert cfg[key] == value
    assert cfg["metadata"]["model_name"] == "m" and cfg["metadata"]["hook_name"] == "h"
    assert cfg["atoms"]["input_scale"] == pytest.approx(S)
    assert cfg["atoms"]["sae_config"]["kind"] == "threshold"
    sums = json.loads((folder / "checksums.json").read_text())["sha256"]
    assert set(sums) == {"cfg.json", "sae_weights.safetensors"}  # identity metric: no file


def test_metric_is_saved_when_not_identity(tmp_path):
    sae = random_sae()
    a = torch.randn(D, D)
    sae.metric.copy_(a @ a.T + torch.eye(D))
    folder = save_sae(sae, tmp_path / "ckpt")
    assert (folder / "atoms_metric.safetensors").exists()
    torch.testing.assert_close(load_sae(folder).metric, sae.metric)


def test_overwrite_is_atomic_and_a_failed_write_keeps_the_old_folder(tmp_path, monkeypatch):
    folder = save_sae(random_sae(seed=0), tmp_path / "ckpt")
    second = random_sae(seed=5)
    save_sae(second, folder)
    torch.testing.assert_close(load_sae(folder).W_enc, second.W_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sae_io, "save_file", boom)
    with pytest.raises(OSError):
        save_sae(random_sae(seed=9), folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    torch.testing.assert_close(load_sae(folder).W_enc, second.W_enc)


def plain_saelens(folder, tensors, **cfg):
    folder.mkdir()
    base = {"architecture": "jumprelu", "d_in": D, "d_sae": N, "dtype": "float32",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": {}}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    np_save(tensors, folder / "sae_weights.safetensors")
    return folder


def weights(**override):
    rng = np.random.default_rng(0)
    w = {"W_enc": rng.normal(size=(D, N)), "W_dec": rng.normal(size=(N, D)),
         "b_enc": rng.normal(size=N), "b_dec": rng.normal(size=D), "threshold": rng.random(N)}
    w.update(override)
    return {k: np.asarray(v, np.float32) for k, v in w.items() if v is not None}


def test_truncated_weights_fail_the_checksum(tmp_path):
    folder = save_sae(random_sae(), tmp_path / "ckpt")
    path = folder / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    one_line_error(lambda: load_sae(folder), "sae_weights.safetensors", "sha256")


def test_corrupted_byte_fails_the_checksum(tmp_path):
    folder = save_sae(random_sae(), tmp_path / "ckpt")
    path = folder / "sae_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    one_line_error(lambda: load_sae(folder), "sae_weights.safetensors", "sha256")


def test_wrong_shape_names_file_tensor_and_cfg(tmp_path):
    folder = plain_saelens(tmp_path / "x", weights(W_enc=np.zeros((2 * D, N))))
    one_line_error(lambda: load_sae(folder), "x/sae_weights.safetensors",
                   f"W_enc has shape ({2 * D}, {N}) but cfg.json says d_in={D}, d_sae={N}")


def test_missing_key_is_named(tmp_path):
    folder = plain_saelens(tmp_path / "x", weights(threshold=None))
    one_line_error(lambda: load_sae(folder), "sae_weights.safetensors", "'threshold'")


def test_architecture_mismatch_against_expect(tmp_path):
    folder = save_sae(random_sae("relu"), tmp_path / "ckpt")
    one_line_error(lambda: load_sae(folder, expect=SAEConfig(d_in=D, d_sae=N)),
                   "ckpt/cfg.json: kind='relu' but the run expects kind='threshold'")
    one_line_error(lambda: load_sae(folder, expect=SAEConfig(d_in=D, d_sae=2 * N, kind="relu")),
                   f"d_sae={N} but the run expects d_sae={2 * N}")


def test_missing_cfg_and_unsupported_normalisation(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_sae(tmp_path / "empty"), "empty/cfg.json", "not found")
    one_line_error(lambda: load_sae(tmp_path / "nowhere"), "nowhere", "not a folder")
    folder = plain_saelens(tmp_path / "x", weights(), normalize_activations="layer_norm")
    one_line_error(lambda: load_sae(folder), "cfg.json", "normalize_activations='layer_norm'")


def test_negative_threshold_is_refused_on_save(tmp_path):
    sae = random_sae()
    with torch.no_grad():
        sae.threshold[0] = -0.1
    one_line_error(lambda: save_sae(sae, tmp_path / "ckpt"), "threshold")
    assert not (tmp_path / "ckpt").exists()
