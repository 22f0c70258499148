"""Each format is written here with numpy/safetensors from known weights and run through that
format's own forward pass, written in numpy from the format's source (cited per helper)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save

from atoms.core.errors import ConfigError
from atoms.sae.formats import (
    export_sparsify,
    import_gemma_scope,
    import_llama_scope,
    import_saelens,
    import_sparsify,
)
from atoms.sae.model import SAEConfig, ThresholdSAE, TopKSAE, build_sae
from tests.checks import one_line_error

D, N, K = 16, 40, 6
RNG = np.random.default_rng(0)


def f32(a):
    return np.asarray(a, np.float32)


def x_rows(n=80, scale=1.0, seed=3):
    return f32(np.random.default_rng(seed).normal(size=(n, D)) * scale)


def run(sae, x):
    with torch.no_grad():
        out = sae(torch.from_numpy(x))
    return out.codes.numpy(), out.recon.numpy()


def close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def topk_scatter(values, k):
    idx = np.argsort(-values, axis=1)[:, :k]
    out = np.zeros_like(values)
    np.put_along_axis(out, idx, np.take_along_axis(values, idx, 1), 1)
    return out


# -- TopKSAE -----------------------------------------------------------------------------------
def test_topk_keeps_the_k_largest_rectified_pre_activations():
    sae = TopKSAE(SAEConfig(d_in=4, d_sae=5, kind="topk", k=2))
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5, 1.0], [-1.0, -2.0, 0.3, -0.5, -4.0]])
    codes, l0 = sae.activate(pre)
    assert codes.tolist() == [[3.0, 0.0, 2.0, 0.0, 0.0], [0.0, 0.0, pytest.approx(0.3), 0.0, 0.0]]
    assert l0.tolist() == [2.0, 1.0]
    with torch.no_grad():
        out = sae(torch.randn(7, 4))
        terms = sae.loss(out, 5.0)
    assert sae.sparsity_penalty(out).tolist() == [0.0] * 7
    assert float(terms.total) == pytest.approx(float(terms.mse))


def test_topk_config_requires_k_and_uses_no_sparsity_loss():
    cfg = SAEConfig(d_in=4, d_sae=8, kind="topk", k=3)
    assert cfg.sparsity_loss == "none" and isinstance(build_sae(cfg), TopKSAE)
    with pytest.raises(ConfigError, match="k: must be in"):
        SAEConfig(d_in=4, d_sae=8, kind="topk")
    with pytest.raises(ConfigError, match="sparsity_loss"):
        SAEConfig(d_in=4, d_sae=8, kind="topk", k=3, sparsity_loss="l1")


# -- sparsify ------------------------------------------------------------------------------------
def sparsify_forward(w, x, k):
    """sparsify SparseCoder.encode/decode (sparse_coder.py, fused_encoder.py)."""
    pre = np.maximum((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
    acts = topk_scatter(pre, k)
    return acts, acts @ w["W_dec"] + w["b_dec"]


def write_sparsify(folder, w=None, **cfg):
    folder.mkdir()
    w = w or {"encoder.weight": f32(RNG.normal(size=(N, D))),
              "encoder.bias": f32(RNG.normal(size=N)),
              "W_dec": f32(RNG.normal(size=(N, D))), "b_dec": f32(RNG.normal(size=D))}
    base = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": False,
            "num_latents": N, "k": K, "multi_topk": False, "skip_connection": False, "d_in": D}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    np_save(w, folder / "sae.safetensors")
    return w


def test_import_sparsify_reproduces_its_forward(tmp_path):
    w = write_sparsify(tmp_path / "sp")
    sae = import_sparsify(tmp_path / "sp")
    assert isinstance(sae, TopKSAE) and sae.cfg.k == K
    x = x_rows()
    codes, recon = run(sae, x)
    ref_codes, ref_recon = sparsify_forward(w, x, K)
    close(codes, ref_codes)
    close(recon, ref_recon)


def scaled_topk_sae(s=2.5):
    sae = TopKSAE(SAEConfig(d_in=D, d_sae=N, kind="topk", k=K, seed=4))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(N) * 0.2)
        sae.b_dec.copy_(torch.randn(D) * 0.2)
        sae.input_scale.fill_(s)
    return sae


def test_sparsify_round_trip_keeps_the_topk_reconstruction(tmp_path):
    sae = scaled_topk_sae()
    export_sparsify(sae, tmp_path / "sp")
    back = import_sparsify(tmp_path / "sp")
    x = x_rows()
    codes, recon = run(sae, x)
    codes2, recon2 = run(back, x)
    close(recon2, recon)
    close(codes2, codes / 2.5)  # exported codes are in input units


def test_exported_threshold_sae_runs_as_topk_in_sparsify_formula(tmp_path):
    sae = ThresholdSAE(SAEConfig(d_in=D, d_sae=N, seed=1))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(N) * 0.2)
        sae.input_scale.fill_(0.5)
    x = x_rows()
    export_sparsify(sae, tmp_path / "sp", approximate_with_topk=K, sample=torch.from_numpy(x))
    from safetensors.numpy import load_file

    w = load_file(tmp_path / "sp" / "sae.safetensors")
    with torch.no_grad():
        pre = sae.encode(torch.from_numpy(x))[1].numpy()
    codes, _ = sparsify_forward(w, x, K)
    close(codes, topk_scatter(np.maximum(pre, 0), K) / 0.5)
    one_line_error(lambda: export_sparsify(sae, tmp_path / "sp2"), "not a TopK coder",
                   "approximate_with_topk")
    assert not (tmp_path / "sp2").exists()


def test_a_threshold_sae_exports_to_sparsify_only_as_a_measured_approximation(tmp_path, capsys):
    sae = ThresholdSAE(SAEConfig(d_in=D, d_sae=N, seed=1, init_threshold=0.05))
    x = torch.from_numpy(x_rows())
    one_line_error(lambda: export_sparsify(sae, tmp_path / "a", approximate_with_topk=K),
                   "needs sample=")
    one_line_error(lambda: export_sparsify(sae, tmp_path / "a", approximate_with_topk=0,
                                           sample=x), "approximate_with_topk=0")
    assert not (tmp_path / "a").exists()
    export_sparsify(sae, tmp_path / "b", approximate_with_topk=K, sample=x)
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "b" / "atoms_approximation.json").read_text())
    codes, pre = sae.encode(x.float())
    l0 = (codes != 0).sum(1)
    kept = float((l0 == K).float().mean())  # only rows with exactly K active keep their set
    assert report["active_set_kept"] <= kept + 1e-9 and report["rows"] == len(x)
    assert 0.0 <= report["active_set_jaccard"] <= 1.0
    assert report["r2_original"] != report["r2_topk"]
    assert f"{report['active_set_kept']:.1%} of {len(x)} rows keep their active set" in printed
    assert import_sparsify(tmp_path / "b").cfg.k == K


def test_sparsify_bad_inputs(tmp_path):
    good = {"encoder.weight": f32(np.ones((N, D))), "encoder.bias": f32(np.ones(N)),
            "W_dec": f32(np.ones((N, D))), "b_dec": f32(np.ones(D))}
    write_sparsify(tmp_path / "a", {k: v for k, v in good.items() if k != "b_dec"})
    one_line_error(lambda: import_sparsify(tmp_path / "a"), "a/sae.safetensors", "'b_dec'")
    write_sparsify(tmp_path / "b", {**good, "W_dec": f32(np.ones((N, D + 1)))})
    one_line_error(lambda: import_sparsify(tmp_path / "b"), "W_dec has shape", f"d_in={D}")
    write_sparsify(tmp_path / "c", good, activation="groupmax")
    one_line_error(lambda: import_sparsify(tmp_path / "c"), "c/cfg.json", "activation='groupmax'")
    write_sparsify(tmp_path / "d", good, skip_connection=True)
    one_line_error(lambda: import_sparsify(tmp_path / "d"), "skip_connection")
    export_sparsify(scaled_topk_sae(), tmp_path / "e")
    path = tmp_path / "e" / "sae.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    one_line_error(lambda: import_sparsify(tmp_path / "e"), "sae.safetensors", "sha256")


# -- SAELens (plain folders) -----------------------------------------------------------------------
def saelens_forward(w, x, cfg):
    """SAELens v6 SAE.process_sae_in + {jumprelu,standard,topk}_sae.py encode/decode."""
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    norms = np.linalg.norm(w["W_dec"], axis=1)
    if cfg["architecture"] == "jumprelu":
        f = np.maximum(pre, 0) * (pre > np.maximum(w["threshold"], 0))
    elif cfg["architecture"] == "standard":
        f = np.maximum(pre, 0)
    else:
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * norms
        f = np.maximum(topk_scatter(pre, cfg["k"]), 0)
        if cfg.get("rescale_acts_by_decoder_norm"):
            return f, (f / norms) @ w["W_dec"] + w["b_dec"]
    return f, f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("cfg", [
    {"architecture": "jumprelu", "apply_b_dec_to_input": False},
    {"architecture": "standard", "apply_b_dec_to_input": True},
    {"architecture": "topk", "apply_b_dec_to_input": True, "k": K,
     "rescale_acts_by_decoder_norm": True},
])
def test_import_saelens_reproduces_its_forward(tmp_path, cfg):
    w = {"W_enc": f32(RNG.normal(size=(D, N))), "W_dec": f32(RNG.normal(size=(N, D))),
         "b_enc": f32(RNG.normal(size=N)), "b_dec": f32(RNG.normal(size=D))}
    if cfg["architecture"] == "jumprelu":
        w["threshold"] = f32(RNG.uniform(-0.5, 1.5, size=N))  # SAELens gates on relu(θ)
    folder = tmp_path / "sl"
    folder.mkdir()
    full = {"d_in": D, "d_sae": N, "dtype": "float32", "normalize_activations": "none",
            "metadata": {"sae_lens_version": "6.5.0"}, **cfg}
    (folder / "cfg.json").write_text(json.dumps(full))
    np_save(w, folder / "sae_weights.safetensors")
    sae = import_saelens(folder)
    assert float(sae.input_scale) == 1.0
    x = x_rows()
    codes, recon = run(sae, x)
    ref_codes, ref_recon = saelens_forward(w, x, full)
    # rescale_acts_by_decoder_norm folds to W_enc·‖d‖, W_dec/‖d‖: codes stay SAELens's f.
    assert (ref_codes > 0).mean() > 0.05
    close(codes, ref_codes, atol=1e-4)
    close(recon, ref_recon, atol=1e-4)


# -- Gemma Scope -----------------------------------------------------------------------------------
def gemma_weights():
    return {"W_enc": f32(RNG.normal(size=(D, N))), "W_dec": f32(RNG.normal(size=(N, D))),
            "b_enc": f32(RNG.normal(size=N)), "b_dec": f32(RNG.normal(size=D)),
            "threshold": f32(RNG.uniform(-0.2, 2.0, size=N))}


def gemma_forward(w, x):
    """Gemma Scope tutorial JumpReLUSAE: mask = pre > θ, acts = mask·ReLU(pre), x̂ = acts W_dec+b."""
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = (pre > w["threshold"]) * np.maximum(pre, 0)
    return acts, acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("layout", ["npz", "safetensors-lowercase", "folder"])
def test_import_gemma_scope_reproduces_its_forward(tmp_path, layout):
    w = gemma_weights()
    if layout == "safetensors-lowercase":  # Gemma Scope 2 params.safetensors spells w_enc
        path = tmp_path / "params.safetensors"
        np_save({k.replace("W_", "w_"): v for k, v in w.items()}, path)
    else:
        path = tmp_path / "params.npz"
        np.savez(path, **w)
    sae = import_gemma_scope(tmp_path if layout == "folder" else path)
    x = x_rows()
    codes, recon = run(sae, x)
    ref_codes, ref_recon = gemma_forward(w, x)
    assert 0.05 < (ref_codes > 0).mean() < 0.95
    close(codes, ref_codes, atol=1e-4)
    close(recon, ref_recon, atol=1e-4)


def test_gemma_scope_bad_inputs(tmp_path):
    w = gemma_weights()
    np.savez(tmp_path / "a.npz", **{k: v for k, v in w.items() if k != "threshold"})
    one_line_error(lambda: import_gemma_scope(tmp_path / "a.npz"), "a.npz", "'threshold'")
    np.savez(tmp_path / "b.npz", **{**w, "W_dec": w["W_dec"][:, :-1]})
    one_line_error(lambda: import_gemma_scope(tmp_path / "b.npz"), "b.npz", "W_dec has shape")
    np.savez(tmp_path / "c.npz", **w, affine_skip_connection=f32(np.eye(D)))
    one_line_error(lambda: import_gemma_scope(tmp_path / "c.npz"), "affine_skip_connection")
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    one_line_error(lambda: import_gemma_scope(tmp_path / "d.npz"), "d.npz", "not a readable")


# -- Llama Scope (lm-saes) -----------------------------------------------------------------------
def lm_saes_forward(hp, w, x, mode):
    """lm-saes SparseAutoEncoder (src/lm_saes/sae.py) encode/decode; 'inference' first applies
    Initializer(state='inference'): standardize_parameters_of_dataset_norm, then
    transform_to_unit_decoder_norm when sparsity_include_decoder_norm.

    Returns (codes, x̂ in input units, decoder (d, N) in raw output units)."""
    E, b_E = w["encoder.weight"], w["encoder.bias"]
    D_, b_D = w["decoder.weight"], w["decoder.bias"]
    norm = hp["dataset_average_activation_norm"]
    f_in, f_out = math.sqrt(hp["d_model"]) / norm["in"], math.sqrt(hp["d_model"]) / norm["out"]
    include = hp["sparsity_include_decoder_norm"]
    if mode == "inference":
        b_E, b_D, D_ = b_E / f_in, b_D / f_out, D_ * f_in / f_out
        if include:
            n = np.linalg.norm(D_, axis=0)
            D_, E, b_E = D_ / n, E * n[:, None], b_E * n
        f_in = f_out = 1.0  # norm_activation becomes 'inference'
    xs = x * f_in
    if hp["apply_decoder_bias_to_pre_encoder"]:
        xs = xs - b_D
    h = xs @ E.T + b_E
    score = h * np.linalg.norm(D_, axis=0) if include else h
    codes = h * (score > hp["jump_relu_threshold"])
    return codes, (codes @ D_.T + b_D) / f_out, D_ / f_out


def llama_hp(**kw):
    hp = {"d_model": D, "d_sae": N, "act_fn": "jumprelu", "jump_relu_threshold": 0.4,
          "norm_activation": "dataset-wise", "dataset_average_activation_norm":
          {"in": 8.0, "out": 8.0}, "sparsity_include_decoder_norm": True,
          "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True,
          "hook_point_in": "blocks.3.hook_resid_post", "hook_point_out": "blocks.3.hook_resid_post",
          "top_k": 50}
    hp.update(kw)
    return hp


def write_llama(folder, hp, w=None, top_level=False):
    w = w or {"encoder.weight": f32(RNG.normal(size=(N, D)) / math.sqrt(D)),
              "encoder.bias": f32(RNG.normal(size=N) * 0.3),
              "decoder.weight": f32(RNG.normal(size=(D, N)) * 0.3),
              "decoder.bias": f32(RNG.normal(size=D) * 0.3)}
    weights = folder if top_level else folder / "checkpoints"
    weights.mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    np_save(w, weights / "final.safetensors")
    return w


@pytest.mark.parametrize("mode,kw", [
    ("inference", {}),
    ("inference", {"apply_decoder_bias_to_pre_encoder": True,
                   "dataset_average_activation_norm": {"in": 8.0, "out": 5.0}}),
    ("inference", {"sparsity_include_decoder_norm": False}),
    ("training", {}),
    ("training", {"sparsity_include_decoder_norm": False,
                  "apply_decoder_bias_to_pre_encoder": True}),
])
def test_import_llama_scope_reproduces_lm_saes(tmp_path, mode, kw):
    hp = llama_hp(**kw)
    w = write_llama(tmp_path / "ls", hp, top_level=mode == "training")
    sae = import_llama_scope(tmp_path / "ls", mode=mode)
    s = math.sqrt(D) / hp["dataset_average_activation_norm"]["in"]
    assert float(sae.input_scale) == pytest.approx(s)  # dataset-wise norm = our input scale
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))
    x = x_rows(scale=8.0 / math.sqrt(D))  # ‖x‖ ≈ dataset_average_activation_norm
    codes, recon = run(sae, x)
    ref_codes, ref_recon, dec = lm_saes_forward(hp, w, x, mode)
    assert 0.05 < (ref_codes != 0).mean() < 0.95
    close(recon, ref_recon, atol=1e-4)
    # Ours are coefficients of unit decoder rows in s-scaled units: c = s·‖decoder column‖.
    close(codes, ref_codes * s * np.linalg.norm(dec, axis=0), atol=1e-4)


def test_llama_scope_bad_inputs(tmp_path):
    write_llama(tmp_path / "a", llama_hp(act_fn="topk"))
    one_line_error(lambda: import_llama_scope(tmp_path / "a"), "a/hyperparams.json",
                   "act_fn='topk'")
    write_llama(tmp_path / "b", llama_hp(norm_activation="token-wise"))
    one_line_error(lambda: import_llama_scope(tmp_path / "b"), "norm_activation='token-wise'")
    hp = llama_hp()
    del hp["apply_decoder_bias_to_pre_encoder"]
    write_llama(tmp_path / "c", hp)
    one_line_error(lambda: import_llama_scope(tmp_path / "c"), "apply_decoder_bias_to_pre_encoder")
    w = {"encoder.weight": f32(np.ones((N, D))), "encoder.bias": f32(np.ones(N)),
         "decoder.bias": f32(np.ones(D))}
    write_llama(tmp_path / "d", llama_hp(), w)
    one_line_error(lambda: import_llama_scope(tmp_path / "d"), "final.safetensors",
                   "'decoder.weight'")
    write_llama(tmp_path / "e", llama_hp(), {**w, "decoder.weight": f32(np.ones((N, D)))})
    one_line_error(lambda: import_llama_scope(tmp_path / "e"), "decoder.weight has shape",
             f"d_model={D}, d_sae={N}")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "hyperparams.json").write_text(json.dumps(llama_hp()))
    one_line_error(lambda: import_llama_scope(tmp_path / "f"), "checkpoints/final.safetensors")
