"""Extraction on Ray: a Ray Data pool of model actors, each batch one shard.

Finished shards are skipped (``atoms.extract.extraction``), so a killed run resumes; shards may
be written under a storage URI, each actor publishing from its own node's mirror.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from atoms.core.config import from_dict, to_dict
from atoms.extract.extraction import (
    ExtractConfig,
    ShardExtractor,
    build_windows,
    check_model_layers,
    claim_output,
    pending_shards,
    write_manifests,
)
from atoms.extract.models import load_tokenizer, model_revision
from atoms.store.ray_env import ensure_ray, worker_env


class _ExtractActor:
    """A Ray Data actor holding one model replica; each batch is one shard."""

    def __init__(self, cfg: dict):
        self.extractor = ShardExtractor(from_dict(ExtractConfig, cfg))

    def __call__(self, batch: dict) -> dict:
        arrays = [k for k in ("input_ids", "doc_ids", "keep", "lengths") if k in batch]
        out = [self.extractor.write(int(i), **{k: batch[k][j] for k in arrays})
               for j, i in enumerate(batch["index"])]
        return {k: np.array([o[k] for o in out]) for k in ("index", "rows", "tokens")}


def run_extraction(cfg: ExtractConfig, progress: bool = True) -> list[Path | str]:
    """Extract every pending shard on a pool of model actors; write the manifests.

    Finished shards (sidecar present, checksum verified) are skipped, so a killed run resumes.
    Returns the manifest paths, one per (site, layer) (stored URIs when ``out`` is a URI).
    """
    check_model_layers(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    windows = build_windows(cfg, tokenizer)  # bad input fails here, before out is touched
    claim_output(cfg)
    n_shards = windows.n_shards(cfg.windows_per_shard)
    todo = pending_shards(cfg, n_shards)
    if todo:
        import ray

        ensure_ray(progress)
        items = []
        for i in todo:
            items.append({"index": i, **windows.shard(i, cfg.windows_per_shard)})
        gpus = cfg.actor_gpus if cfg.actor_gpus is not None else float(torch.cuda.is_available())
        results = ray.data.from_items(items).map_batches(
            _ExtractActor, fn_constructor_kwargs={"cfg": to_dict(cfg)}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.actor_cpus,
            num_gpus=gpus, runtime_env=worker_env() or None,
        )
        bar = tqdm(total=len(todo), desc="extract shards", disable=not progress)
        for _ in results.iter_rows():
            bar.update(1)
        bar.close()
    return write_manifests(cfg, model_revision(cfg.model, cfg.revision), n_shards,
                           windows.selection)
