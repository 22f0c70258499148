"""Hooked, truncated forwards agree bit for bit with plain forwards, for every block layout."""

import pytest
import torch

from atoms.core.errors import InputError
from atoms.extract.hooks import HookPoint, extract_rows, hooked_forward, position_mask
from atoms.extract.models import load_model, transformer_layers

LAYOUTS = ["tiny-random", "tiny-random-gemma2", "tiny-random-gpt2", "tiny-random-neox"]


@pytest.fixture(scope="module", params=LAYOUTS)
def tiny(request):
    return load_model(request.param)


def ids(loaded, b=3, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, loaded.tokenizer.vocab_size, (b, t), generator=g)


def test_resid_post_matches_output_hidden_states(tiny):
    x = ids(tiny)
    with torch.no_grad():
        hidden = tiny.model(input_ids=x, output_hidden_states=True).hidden_states
    points = [HookPoint("resid_post", layer) for layer in (0, 1, 2)]
    got = hooked_forward(tiny.model, x, points)
    for p in points:
        assert torch.equal(got[p], hidden[p.layer + 1]), p


def test_mlp_key_matches_a_hook_on_the_down_projection(tiny):
    x = ids(tiny)
    block = transformer_layers(tiny.model)[2]
    down = next(getattr(block.mlp, n) for n in ("down_proj", "c_proj", "dense_4h_to_h")
                if hasattr(block.mlp, n))
    seen = {}
    handle = down.register_forward_pre_hook(lambda m, a: seen.setdefault("k", a[0].detach()))
    with torch.no_grad():
        tiny.model(input_ids=x)
    handle.remove()
    got = hooked_forward(tiny.model, x, [HookPoint("mlp_key", 2), HookPoint("mlp_out", 2)])
    assert torch.equal(got[HookPoint("mlp_key", 2)], seen["k"])
    assert got[HookPoint("mlp_key", 2)].shape[-1] == 128  # the MLP width, not d_model
    assert got[HookPoint("mlp_out", 2)].shape[-1] == 64


def test_forward_stops_after_the_deepest_hooked_layer(tiny):
    blocks = transformer_layers(tiny.model)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
               for i, b in enumerate(blocks)]
    try:
        hooked_forward(tiny.model, ids(tiny), [HookPoint("resid_post", 1)])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]


def test_position_selection():
    x = torch.tensor([[1, 5, 6], [1, 7, 8]])
    assert position_mask(x, "all", 1).all()
    assert position_mask(x, "no_bos", 1).tolist() == [[False, True, True]] * 2
    assert position_mask(x, "no_bos", None).all()
    assert position_mask(x, "last", 1).tolist() == [[False, False, True]] * 2
    with pytest.raises(InputError, match="positions 'first' is unknown"):
        position_mask(x, "first", 1)


def test_extract_rows_flattens_in_window_order(tiny):
    x = ids(tiny, b=2, t=5)
    x[:, 0] = tiny.tokenizer.bos_token_id
    rows = extract_rows(tiny.model, x, [HookPoint("resid_post", 0)], "no_bos",
                        tiny.tokenizer.bos_token_id)
    assert rows.token_ids.tolist() == x[:, 1:].reshape(-1).tolist()
    assert rows.window_index.tolist() == [0] * 4 + [1] * 4
    assert rows.positions.tolist() == [1, 2, 3, 4] * 2
    assert rows.activations[HookPoint("resid_post", 0)].shape == (8, 64)


def test_bad_hook_points(tiny):
    x = ids(tiny)
    with pytest.raises(InputError, match=r"layer 4 out of range: the model has 4 layers \(0..3\)"):
        hooked_forward(tiny.model, x, [HookPoint("resid_post", 4)])
    with pytest.raises(InputError, match="site 'attn_out' is unknown"):
        hooked_forward(tiny.model, x, [HookPoint("attn_out", 0)])
