"""Activation extraction without Ray: the config, the token windows, and one shard's work.

Shard i holds the activations of windows [i·W, (i+1)·W) (W = ``windows_per_shard``) at every
hook point, one Parquet file per (site, layer) folder. Ray glue lives in atoms/distributed.py.
``out`` may be a storage URI (s3://…): shards are then written into the node mirror and
published (atoms/shard_store.py).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from atoms.core.config import require, to_dict
from atoms.core.errors import ConfigError, InputError
from atoms.core.io import code_version
from atoms.extract.corpus import iter_documents, token_windows
from atoms.extract.counterfact import check_fields, fact_prompts, prompt_windows
from atoms.extract.hooks import SITES, HookPoint, check_hook_points, extract_rows
from atoms.extract.models import LoadedModel, load_model, num_layers
from atoms.extract.shard_store import (
    finished_layer_shards,
    layer_rel,
    publish_shard,
    save_layer_manifest,
    shard_width,
)
from atoms.extract.shards import Manifest, layer_folder, write_shard
from atoms.store.storage import Storage, is_remote, mirror_path, redact


@dataclass
class ExtractConfig:
    model: str = "smollm2-135m"
    """Hugging Face id, local folder, or a built-in name (smollm2-135m, tiny-random, …)."""
    revision: str | None = None
    dtype: str | None = None
    """Model dtype: float32 (CPU default), bfloat16 (GPU default) or float16."""
    corpus: str = "wiki-sample"
    """Built-in (wiki-sample, pydoc), local txt/jsonl/parquet, or a Hugging Face dataset;
    with ``corpus_format: counterfact`` a CounterFact .json/.jsonl file or dataset id."""
    corpus_format: Literal["text", "counterfact"] = "text"
    """'text': documents cut into ``context_len`` windows; 'counterfact': one window a fact
    prompt (ROME's records, ``atoms.extract.counterfact``), right-padded, record id as doc id."""
    counterfact_prompts: list[str] = field(default_factory=lambda: ["rewrite"])
    """counterfact: the prompt fields that become texts (rewrite, paraphrase, neighborhood,
    attribute, generation)."""
    corpus_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    sites: list[str] = field(default_factory=lambda: ["resid_post"])
    layers: list[int] = field(default_factory=lambda: [15])
    positions: Literal["all", "no_bos", "last", "subject_last"] = "no_bos"
    """Rows kept per window: every token, all but a BOS, the last token, or (counterfact) the
    last token of the subject span."""
    context_len: int = 128
    """text: tokens a window; counterfact: the longest prompt kept (longer ones are skipped and
    counted)."""
    prepend_bos: bool = True
    max_tokens: int = 65536
    """Tokens to run through the model (text: whole windows, the last partial one dropped;
    counterfact: prompts until their tokens reach it)."""
    max_documents: int = 0
    """text: read at most this many documents (0: no cap); with ``windows_per_doc: 1`` each
    one is truncated to its first window (the paper's S̃: 100K Wikipedia documents)."""
    windows_per_doc: int = 0
    """Keep only each document's first this-many windows (0: all); more documents for the
    same tokens, so a held-out split by document has documents to hold out."""
    windows_per_shard: int = 64
    batch_windows: int = 8
    """Windows per forward pass."""
    storage_dtype: Literal["float32", "float16"] = "float32"
    num_actors: int = 1
    """Model replicas (Ray actors); one per GPU on a cluster."""
    actor_cpus: float = 1.0
    actor_gpus: float | None = None
    """GPUs per actor (default: 1 when CUDA is available, else 0)."""
    out: str = "results/activations/smollm2-135m"
    """Output folder, or a storage URI such as s3://bucket/prefix."""

    def __post_init__(self):
        for s in self.sites:
            require(s in SITES, "sites", f"{s!r} is unknown (choose from {', '.join(SITES)})")
        require(len(self.sites) > 0, "sites", "must list at least one site")
        require(len(self.layers) > 0, "layers", "must list at least one layer")
        require(all(layer >= 0 for layer in self.layers), "layers", "must be non-negative")
        require(self.context_len >= 2, "context_len", "must be at least 2")
        require(self.positions != "subject_last" or self.corpus_format == "counterfact",
                "positions", "subject_last needs corpus_format: counterfact")
        if self.corpus_format == "counterfact":
            check_fields(self.counterfact_prompts)
        require(self.max_tokens >= self.context_len, "max_tokens", "must be ≥ context_len")
        require(self.windows_per_doc >= 0, "windows_per_doc", "must be ≥ 0")
        require(self.max_documents >= 0, "max_documents", "must be ≥ 0")
        require(self.windows_per_shard >= 1, "windows_per_shard", "must be positive")
        require(self.batch_windows >= 1, "batch_windows", "must be positive")
        require(self.num_actors >= 1, "num_actors", "must be positive")
        require(self.actor_cpus > 0, "actor_cpus", "must be positive")

    @property
    def hook_points(self) -> list[HookPoint]:
        return [HookPoint(s, layer) for s in self.sites for layer in self.layers]


@dataclass
class Windows:
    """All context windows of a run: ids (n, T) int64, each window's document index and, for
    fact prompts, ``keep`` (n, T) bool, the positions kept (None: ``positions`` decides), and
    each prompt's unpadded length, with the prompts kept and skipped in ``selection``."""

    input_ids: np.ndarray
    doc_ids: np.ndarray
    keep: np.ndarray | None = None
    lengths: np.ndarray | None = None
    selection: dict = field(default_factory=dict)

    def shard(self, index: int, per_shard: int) -> dict:
        """Shard ``index``'s arrays, as ``ShardExtractor.write`` takes them."""
        sl = slice(index * per_shard, (index + 1) * per_shard)
        return {"input_ids": self.input_ids[sl], "doc_ids": self.doc_ids[sl],
                **{k: getattr(self, k)[sl] for k in ("keep", "lengths")
                   if getattr(self, k) is not None}}

    def n_shards(self, per_shard: int) -> int:
        return -(-len(self.input_ids) // per_shard)


def build_windows(cfg: ExtractConfig, tokenizer) -> Windows:
    """Tokenise the corpus into ``max_tokens // context_len`` full windows, or (counterfact)
    into one right-padded window a kept prompt."""
    if cfg.corpus_format == "counterfact":
        prompts = fact_prompts(cfg.corpus, cfg.counterfact_prompts, cfg.split, cfg.corpus_config)
        batch = prompt_windows(prompts, tokenizer, cfg.positions, cfg.context_len,
                               cfg.prepend_bos, cfg.max_tokens)
        return Windows(batch.input_ids, batch.doc_ids, batch.keep, batch.lengths, batch.counts)
    docs = iter_documents(cfg.corpus, cfg.text_field, cfg.split, cfg.corpus_config,
                          cfg.max_documents or None)
    wanted = cfg.max_tokens // cfg.context_len
    windows = list(token_windows(docs, tokenizer, cfg.context_len, cfg.prepend_bos, wanted,
                                 cfg.windows_per_doc))
    if not windows:
        raise InputError(f"corpus {cfg.corpus!r} gave no window of {cfg.context_len} tokens")
    ids = np.array([w.input_ids for w in windows], dtype=np.int64)
    return Windows(ids, np.array([w.doc_id for w in windows], dtype=np.int64))


class ShardExtractor:
    """Holds one model replica and writes whole shards (used in-process and by Ray actors)."""

    def __init__(self, cfg: ExtractConfig, loaded: LoadedModel | None = None):
        self.cfg = cfg
        self.loaded = loaded or load_model(cfg.model, cfg.dtype, revision=cfg.revision)
        self.points = cfg.hook_points
        check_hook_points(self.loaded.model, self.points)
        self.bos_id = self.loaded.tokenizer.bos_token_id if cfg.prepend_bos else None
        self.store = Storage(cfg.out) if is_remote(cfg.out) else None
        self.root = mirror_path(cfg.out) if self.store else cfg.out

    def extract(self, input_ids: np.ndarray, keep: np.ndarray | None = None):
        """Rows of every hook point for these windows, batch by batch (a generator); ``keep``
        (fact prompts) marks the positions kept, else ``positions`` does."""
        ids = torch.tensor(input_ids, dtype=torch.long)  # a copy: Ray hands read-only arrays
        mask = None if keep is None else torch.tensor(keep, dtype=torch.bool)
        for b0 in range(0, len(ids), self.cfg.batch_windows):
            sl = slice(b0, b0 + self.cfg.batch_windows)
            rows = extract_rows(self.loaded.model, ids[sl], self.points, self.cfg.positions,
                                self.bos_id, None if mask is None else mask[sl])
            yield b0, rows

    def write(self, index: int, input_ids: np.ndarray, doc_ids: np.ndarray,
              keep: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict:
        """Extract one shard and write it to every hook point's folder (for a storage ``out``:
        into this node's mirror, then published)."""
        parts = {p: [] for p in self.points}
        token_ids, docs, positions = [], [], []
        window_docs = torch.tensor(doc_ids)
        for b0, rows in self.extract(input_ids, keep):
            for p in self.points:
                parts[p].append(rows.activations[p])
            token_ids.append(rows.token_ids)
            docs.append(window_docs[b0 + rows.window_index])
            positions.append(rows.positions)
        token_ids, docs, positions = (torch.cat(t).numpy() for t in (token_ids, docs, positions))
        tokens = int(input_ids.size if lengths is None else np.sum(lengths))
        for p in self.points:
            folder = layer_folder(self.root, p.site, p.layer)
            write_shard(folder, index, torch.cat(parts[p]).numpy(), token_ids, docs, positions,
                        dtype=self.cfg.storage_dtype, tokens=tokens)
            if self.store:
                publish_shard(self.store.child(layer_rel(p.site, p.layer)), folder, index)
        return {"index": index, "rows": len(token_ids), "tokens": tokens}


def pending_shards(cfg: ExtractConfig, n_shards: int) -> list[int]:
    """Shards not yet finished (sidecar + matching checksum; stored: sidecar + matching size)
    at every hook point."""
    done = None
    for p in cfg.hook_points:
        finished = set(finished_layer_shards(cfg.out, p.site, p.layer))
        done = finished if done is None else done & finished
    return [i for i in range(n_shards) if i not in (done or set())]


_RUN_FIELDS = ("model", "revision", "corpus", "corpus_config", "split", "text_field",
               "positions", "context_len", "prepend_bos", "windows_per_doc", "windows_per_shard",
               "storage_dtype", "corpus_format", "counterfact_prompts", "max_documents")
_RUN_FIELD_DEFAULTS = {"windows_per_doc": 0, "corpus_format": "text", "max_documents": 0,
                       "counterfact_prompts": ["rewrite"]}
"""What a recorded extraction from before a field existed did."""


def claim_output(cfg: ExtractConfig) -> None:
    """Record the run's config in ``out``; a rerun must match it field by field (resume)."""
    store, name = Storage(cfg.out), "extract_config.json"
    mine = {k: v for k, v in to_dict(cfg).items() if k in _RUN_FIELDS}
    if store.size(name) is not None:
        theirs = store.read_json(name)
        for key in _RUN_FIELDS:
            recorded = theirs.get(key, _RUN_FIELD_DEFAULTS.get(key))
            if recorded != mine[key]:
                raise ConfigError(
                    f"{redact(cfg.out)}: holds an extraction with {key}={recorded!r}, not "
                    f"{mine[key]!r}; choose another out folder"
                )
        return
    store.write_text(name, json.dumps(mine, indent=2))


def write_manifests(cfg: ExtractConfig, revision: str, n_shards: int,
                    selection: dict | None = None) -> list[Path | str]:
    """One manifest per hook point, listing its verified shards (and ``selection``: the fact
    prompts kept and skipped); returns the manifest paths (for a storage ``out``: the stored
    URIs, the manifests also written to the mirror)."""
    written = []
    for p in cfg.hook_points:
        shards = finished_layer_shards(cfg.out, p.site, p.layer)
        missing = [i for i in range(n_shards) if i not in shards]
        if missing:
            where = redact(layer_folder(cfg.out, p.site, p.layer))
            raise InputError(f"{where}: shards {missing[:5]} "
                             "are not finished")
        infos = [shards[i] for i in range(n_shards)]
        manifest = Manifest(
            model=cfg.model, revision=revision, site=p.site, layer=p.layer,
            positions=cfg.positions, d=shard_width(cfg.out, p.site, p.layer, infos[0].name),
            dtype=cfg.storage_dtype,
            rows=sum(s.rows for s in infos), tokens_seen=sum(s.tokens for s in infos),
            shards=infos, context_len=cfg.context_len, corpus=cfg.corpus, config=to_dict(cfg),
            code_version=code_version(),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            selection=dict(selection or {}),
        )
        written.append(save_layer_manifest(cfg.out, p.site, p.layer, manifest))
    return written


def check_model_layers(cfg: ExtractConfig) -> None:
    """The model exists and has every asked-for layer, read from its config file alone (no
    weights, no Ray): an unknown model or a layer out of range is one line."""
    depth = num_layers(cfg.model, cfg.revision)
    bad = [layer for layer in cfg.layers if layer >= depth]
    if bad:
        raise InputError(f"layer {bad[0]} out of range: {cfg.model} has {depth} layers "
                         f"(0..{depth - 1})")
