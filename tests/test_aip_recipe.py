"""S̃ the paper's way: rows left out (BOS, high-norm sinks), counted and recorded; another
corpus as S̃'s source in a study config."""

import numpy as np
import pytest
import torch

from atoms.aip.fit import AIPFitConfig, ensure_layer_aip, fit_layer_aip, load_aip_once
from atoms.aip.metric import AIP, SecondMoment
from atoms.core.config import from_dict
from atoms.core.errors import ConfigError
from atoms.extract.shards import Manifest, write_manifest, write_shard
from atoms.study.config import StudyConfig


def shard_set(folder, x: torch.Tensor, positions: np.ndarray, shards: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, (part, pos) in enumerate(zip(torch.tensor_split(x, shards),
                                        np.array_split(positions, shards), strict=True)):
        ids = np.arange(len(part))
        infos.append(write_shard(folder, i, part.numpy(), ids, ids // 16, pos))
    write_manifest(folder, Manifest(
        model="synthetic", revision="0", site="resid_post", layer=0, positions="all",
        d=x.shape[1], dtype="float32", rows=len(x), tokens_seen=len(x), shards=infos,
        context_len=16, corpus="planted", config={"prepend_bos": True}))
    return folder


def rows(n=3000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)).float()


def expected_s(x: torch.Tensor) -> torch.Tensor:
    return AIP.from_moment(SecondMoment(x.shape[1]).update(x)).S


def test_sinks_left_out_equal_the_rows_without_them(tmp_path, ray_session):
    x = rows()
    positions = np.arange(len(x)) % 16 + 1  # no BOS rows
    sinks = torch.tensor([5, 1200, 2999])  # one in every shard
    planted = x.clone()
    planted[sinks] *= 200.0
    folder = shard_set(tmp_path / "planted", planted, positions)
    _, with_sinks, _ = fit_layer_aip(folder, AIPFitConfig())
    path, left_out, n = fit_layer_aip(folder, AIPFitConfig(exclude=["sinks"]))
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[sinks] = False
    assert n == len(x) - 3
    torch.testing.assert_close(left_out.S, expected_s(x[keep]), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(with_sinks.S, left_out.S, rtol=1e-2)
    _, meta = load_aip_once(path)
    assert (meta["dropped_sinks"], meta["dropped_bos"], meta["exclude"]) == (3, 0, ["sinks"])
    assert meta["rows"] == len(x) - 3 and meta["sink_factor"] == 10.0


def test_bos_rows_left_out_and_a_changed_recipe_refits(tmp_path, ray_session):
    x = rows(seed=1)
    positions = np.arange(len(x)) % 16  # every 16th row sits at position 0: a BOS
    folder = shard_set(tmp_path / "bos", x, positions)
    uri = ensure_layer_aip(folder, AIPFitConfig(), progress=False)
    assert load_aip_once(uri)[1]["dropped_bos"] == 0
    uri = ensure_layer_aip(folder, AIPFitConfig(exclude=["bos"]), progress=False)
    aip, meta = load_aip_once(uri)
    assert meta["dropped_bos"] == int((positions == 0).sum())
    torch.testing.assert_close(aip.S, expected_s(x[torch.as_tensor(positions) != 0]),
                               rtol=1e-6, atol=1e-9)


def test_unknown_exclusion_is_one_line():
    with pytest.raises(ConfigError, match="exclude: 'eos' is unknown"):
        AIPFitConfig(exclude=["eos"])


def test_study_aip_source_takes_the_extraction_layer():
    cfg = from_dict(StudyConfig, {"data": {
        "extract": {"model": "tiny-random", "sites": ["mlp_key"], "layers": [2],
                    "out": "results/a"},
        "aip": {"source": {"corpus": "wiki-sample", "max_documents": 50, "windows_per_doc": 1,
                           "positions": "all", "out": "results/wiki"},
                "exclude": ["bos", "sinks"]}}})
    src = cfg.data.aip.source
    assert (src.model, src.sites, src.layers, src.max_documents) == ("tiny-random", ["mlp_key"],
                                                                      [2], 50)
    with pytest.raises(ConfigError, match="aip.source: needs data.extract"):
        from_dict(StudyConfig, {"data": {"shards": "x", "aip": {"source": {"out": "w"}}}})
