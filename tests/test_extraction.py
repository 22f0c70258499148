"""Ray Data extraction into shards: exact values, resume, damage detection, AIP over shards."""

import os

import numpy as np
import pytest
import torch

from atoms.aip.metric import SecondMoment
from atoms.aip.ray_moment import fit_second_moment
from atoms.core.errors import ConfigError, InputError
from atoms.extract.extraction import ExtractConfig, build_windows
from atoms.extract.models import ModelNotAvailable, load_model, transformer_layers
from atoms.extract.ray_extract import run_extraction
from atoms.extract.shards import ShardSet, layer_folder, read_shard, shard_name


def config(tmp_path, **kw):
    base = dict(model="tiny-random", corpus="pydoc", sites=["resid_post", "mlp_key"],
                layers=[0, 2], positions="no_bos", context_len=16, max_tokens=16 * 20,
                windows_per_shard=6, batch_windows=4, out=str(tmp_path / "acts"))
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, ray_session):
    cfg = config(tmp_path_factory.mktemp("x"))
    manifests = run_extraction(cfg, progress=False)
    return cfg, manifests


def test_manifests_and_shard_layout(extracted):
    cfg, manifests = extracted
    assert len(manifests) == 4
    sets = {(s, layer): ShardSet.open(layer_folder(cfg.out, s, layer))
            for s in cfg.sites for layer in cfg.layers}
    for (site, layer), ss in sets.items():
        m = ss.manifest
        assert (m.site, m.layer, m.model, m.positions) == (site, layer, "tiny-random", "no_bos")
        assert m.d == (64 if site == "resid_post" else 128)
        assert len(m.shards) == 4  # 20 windows, 6 per shard
        assert m.rows == 20 * 15 and m.tokens_seen == 20 * 16
        assert m.revision.startswith("builtin:")


def test_shards_equal_a_direct_forward(extracted):
    cfg, _ = extracted
    loaded = load_model("tiny-random")
    windows = build_windows(cfg, loaded.tokenizer)
    ids = torch.as_tensor(windows.input_ids)
    with torch.no_grad():
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    keys = {}
    block = transformer_layers(loaded.model)[2]
    handle = block.mlp.down_proj.register_forward_pre_hook(
        lambda m, a: keys.setdefault("k", a[0].detach()))
    with torch.no_grad():
        loaded.model(input_ids=ids)
    handle.remove()
    resid = ShardSet.open(layer_folder(cfg.out, "resid_post", 2)).read_all()
    assert torch.equal(resid, hidden[3][:, 1:].reshape(-1, 64))
    key = ShardSet.open(layer_folder(cfg.out, "mlp_key", 2)).read_all()
    assert torch.equal(key, keys["k"][:, 1:].reshape(-1, 128))
    first = read_shard(layer_folder(cfg.out, "resid_post", 0) / shard_name(0))
    assert np.array_equal(first["token_id"], windows.input_ids[:6, 1:].reshape(-1))
    assert np.array_equal(first["position"], np.tile(np.arange(1, 16), 6))
    assert np.array_equal(first["doc_id"], np.repeat(windows.doc_ids[:6], 15))


def test_rerun_resumes_and_redoes_only_damaged_shards(tmp_path, ray_session):
    cfg = config(tmp_path, sites=["resid_post"], layers=[1])
    run_extraction(cfg, progress=False)
    folder = layer_folder(cfg.out, "resid_post", 1)
    before = ShardSet.open(folder).read_all()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    # A killed run: shard 1 never got its sidecar; shard 2 was damaged on disk.
    (folder / "shard-00001.json").unlink()
    with open(folder / shard_name(2), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff\x00")
    (folder / "manifest.json").unlink()
    run_extraction(cfg, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    redone = {name for name in after if after[name] != stamps[name]}
    assert redone == {shard_name(1), shard_name(2)}
    assert torch.equal(ShardSet.open(folder).read_all(), before)


def test_rerun_with_another_config_is_refused(extracted, ray_session):
    cfg, _ = extracted
    other = ExtractConfig(**{**cfg.__dict__, "context_len": 32})
    with pytest.raises(ConfigError, match="context_len=16, not 32"):
        run_extraction(other, progress=False)


def test_second_moment_over_shards_with_ray(extracted):
    cfg, _ = extracted
    folder = layer_folder(cfg.out, "resid_post", 2)
    direct = SecondMoment(64).update(ShardSet.open(folder).read_all())
    assert torch.allclose(fit_second_moment(folder, progress=False).matrix(), direct.matrix(),
                          rtol=1e-10)


@pytest.mark.parametrize(
    "kw, error, message",
    [
        ({"layers": [4]}, InputError, r"layer 4 out of range: tiny-random has 4 layers \(0..3\)"),
        ({"model": "no-org/no-such-model"}, ModelNotAvailable, "no-org/no-such-model"),
        ({"corpus": "empty.txt"}, InputError, "no documents"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, monkeypatch, kw, error, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if kw.get("corpus") == "empty.txt":
        (tmp_path / "empty.txt").write_text("   \n")
        kw = {"corpus": str(tmp_path / "empty.txt")}
    with pytest.raises(error, match=message):
        run_extraction(config(tmp_path, **kw), progress=False)
    assert not os.path.exists(tmp_path / "acts" / "resid_post")
