"""The real model on real text: SmolLM2-135M + the Wikipedia sample, through Ray Data."""

import pytest
import torch

from atoms.aip.metric import AIP
from atoms.aip.ray_moment import fit_second_moment
from atoms.aip.shift import representation_shift
from atoms.extract.extraction import ExtractConfig, build_windows
from atoms.extract.models import load_model, transformer_layers
from atoms.extract.ray_extract import run_extraction
from atoms.extract.shards import ShardSet, layer_folder


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, ray_session):
    cfg = ExtractConfig(model="smollm2-135m", corpus="wiki-sample", sites=["resid_post", "mlp_key"],
                        layers=[5], positions="no_bos", context_len=64, max_tokens=64 * 64,
                        windows_per_shard=32, batch_windows=8, actor_cpus=2.0,
                        out=str(tmp_path_factory.mktemp("smollm2") / "acts"))
    run_extraction(cfg, progress=False)
    return cfg


def test_shards_round_trip_bit_exactly(smollm2_run):
    cfg = smollm2_run
    loaded = load_model("smollm2-135m")
    ids = torch.as_tensor(build_windows(cfg, loaded.tokenizer).input_ids[:16])
    keys = []
    down = transformer_layers(loaded.model)[5].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, a: keys.append(a[0].detach()))
    with torch.no_grad():
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    handle.remove()
    resid = ShardSet.open(layer_folder(cfg.out, "resid_post", 5)).read_all()
    key = ShardSet.open(layer_folder(cfg.out, "mlp_key", 5)).read_all()
    n = 16 * 63  # the first 16 windows, BOS dropped
    assert torch.equal(resid[:n], hidden[6][:, 1:].reshape(-1, 576))
    assert torch.equal(key[:n], keys[0][:, 1:].reshape(-1, 1536))


def test_aip_angles_centre_on_90_degrees_and_euclidean_ones_do_not(smollm2_run):
    folder = layer_folder(smollm2_run.out, "resid_post", 5)
    aip = AIP.from_moment(fit_second_moment(folder, progress=False))
    x = ShardSet.open(folder).read_all()
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:400]]
    shift = representation_shift(sample, aip)
    assert abs(shift["aip_mean"] - 90.0) < 1.0, shift
    assert shift["euclid_shift_deg"] > 10.0, shift
