import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save

from atoms.core.errors import InputError
from atoms.evaluate.units import UnitSet, load_unit_set
from atoms.sae.formats import export_sparsify
from atoms.sae.model import SAEConfig, ThresholdSAE, TopKSAE
from atoms.sae.saelens import save_sae

D, N = 8, 20


def test_neurons_are_the_identity():
    u = UnitSet.neurons(D)
    assert (u.name, u.kind, u.n, u.d) == ("neurons", "neurons", D, D)
    torch.testing.assert_close(u.directions, torch.eye(D))
    x = torch.randn(5, D)
    torch.testing.assert_close(u.encode(x), x)


def test_random_directions_are_unit_seeded_and_project():
    a, b, c = UnitSet.random(D, N, seed=1), UnitSet.random(D, N, seed=1), UnitSet.random(D, N, 2)
    assert a.kind == "random" and a.directions.shape == (N, D)
    assert a.directions.dtype == torch.float32
    torch.testing.assert_close(a.directions.norm(dim=1), torch.ones(N))
    assert torch.equal(a.directions, b.directions) and not torch.equal(a.directions, c.directions)
    x = torch.randn(5, D)
    torch.testing.assert_close(a.encode(x), x @ a.directions.T)


def test_from_sae_uses_normalised_decoder_rows_and_sae_codes():
    sae = ThresholdSAE(SAEConfig(d_in=D, d_sae=N, decoder_norm="none", init_threshold=0.0))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1) + 0.5)
    u = UnitSet.from_sae(sae, "tsae", kind="atoms", source="mem")
    assert (u.name, u.kind, u.source, u.n) == ("tsae", "atoms", "mem", N)
    torch.testing.assert_close(u.directions, sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True))
    x = torch.randn(5, D)
    torch.testing.assert_close(u.encode(x), sae.encode(x)[0])


def test_bad_unit_sets_are_one_line_errors():
    with pytest.raises(InputError, match="row 1 is zero"):
        UnitSet("z", "atoms", torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(InputError, match="kind='cells'"):
        UnitSet("z", "cells", torch.eye(2))


def _gemma(rng):
    return {"W_enc": rng.normal(size=(D, N)), "W_dec": rng.normal(size=(N, D)),
            "b_enc": rng.normal(size=N), "b_dec": rng.normal(size=D), "threshold": rng.random(N)}


def _write_all(root):
    """One SAE in every layout load_unit_set detects; returns {layout: path}."""
    rng = np.random.default_rng(0)
    paths = {"saelens": save_sae(ThresholdSAE(SAEConfig(d_in=D, d_sae=N)), root / "ours")}
    sae = TopKSAE(SAEConfig(d_in=D, d_sae=N, kind="topk", k=3))
    paths["sparsify"] = export_sparsify(sae, root / "sparsify")
    w = {k: np.asarray(v, np.float32) for k, v in _gemma(rng).items()}
    np.savez(root / "params.npz", **w)
    np_save(w, root / "gemma.safetensors")
    paths["gemma_scope"] = root / "params.npz"
    paths["gemma_scope_st"] = root / "gemma.safetensors"
    ls = root / "llama"
    (ls / "checkpoints").mkdir(parents=True)
    hp = {"d_model": D, "d_sae": N, "act_fn": "jumprelu", "jump_relu_threshold": 0.1,
          "norm_activation": "dataset-wise", "apply_decoder_bias_to_pre_encoder": False,
          "dataset_average_activation_norm": {"in": math.sqrt(D), "out": math.sqrt(D)}}
    (ls / "hyperparams.json").write_text(json.dumps(hp))
    np_save({"encoder.weight": rng.normal(size=(N, D)).astype(np.float32),
             "encoder.bias": np.zeros(N, np.float32),
             "decoder.weight": rng.normal(size=(D, N)).astype(np.float32),
             "decoder.bias": np.zeros(D, np.float32)}, ls / "checkpoints" / "final.safetensors")
    paths["llama_scope"] = ls
    return paths


def test_load_unit_set_detects_every_layout(tmp_path):
    x = torch.randn(6, D)
    for layout, path in _write_all(tmp_path).items():
        u = load_unit_set(path, kind="features")
        assert (u.n, u.d, u.kind) == (N, D, "features"), layout
        assert u.source.startswith(layout.removesuffix("_st") + ":"), u.source
        torch.testing.assert_close(u.directions.norm(dim=1), torch.ones(N))
        assert u.encode(x).shape == (6, N)
    assert load_unit_set(tmp_path / "params.npz").name == "params"


def test_unrecognised_paths_list_what_was_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    for path in (tmp_path / "empty", tmp_path / "notes.txt", tmp_path / "missing"):
        with pytest.raises(InputError) as e:
            load_unit_set(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg
        assert "cfg.json + sae_weights.safetensors" in msg and "hyperparams.json" in msg
