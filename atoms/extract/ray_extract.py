"""Ray glue: start or join Ray, extract shards with Ray Data, sum second moments with tasks.

Embedded: ``ensure_ray()`` starts a local Ray. Inside ``ray job submit`` (RAY_ADDRESS set) it
joins the cluster with a bare ``ray.init()``. Shards may live under a storage URI; workers then
mirror them on their own node (ATOMS_STORAGE_CACHE, when the driver sets it, is passed on).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from atoms.aip.metric import SecondMoment
from atoms.core.config import from_dict, to_dict
from atoms.core.errors import InputError
from atoms.extract.extraction import (
    ExtractConfig,
    ShardExtractor,
    build_windows,
    claim_output,
    pending_shards,
    write_manifests,
)
from atoms.extract.models import load_tokenizer, model_revision, num_layers
from atoms.extract.shard_store import layer_name, load_layer_manifest, pull_shard, shard_uris
from atoms.extract.shards import ShardSet, read_shard
from atoms.store.storage import CACHE_ENV, is_remote, redact


def ensure_ray(progress: bool = True) -> None:
    """Join the running Ray (a job, or one this process started) or start a local one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(log_to_driver=progress)
    ray.data.DataContext.get_current().enable_progress_bars = progress


def worker_env() -> dict:
    """Ray ``runtime_env`` giving workers this process's ATOMS_STORAGE_CACHE (else none)."""
    cache = os.environ.get(CACHE_ENV)
    return {"env_vars": {CACHE_ENV: cache}} if cache else {}


class _ExtractActor:
    """A Ray Data actor holding one model replica; each batch is one shard."""

    def __init__(self, cfg: dict):
        self.extractor = ShardExtractor(from_dict(ExtractConfig, cfg))

    def __call__(self, batch: dict) -> dict:
        out = [self.extractor.write(int(i), ids, docs)
               for i, ids, docs in zip(batch["index"], batch["input_ids"], batch["doc_ids"],
                                       strict=True)]
        return {k: np.array([o[k] for o in out]) for k in ("index", "rows", "tokens")}


def run_extraction(cfg: ExtractConfig, progress: bool = True) -> list[Path | str]:
    """Extract every pending shard on a pool of model actors; write the manifests.

    Finished shards (sidecar present, checksum verified) are skipped, so a killed run resumes.
    Returns the manifest paths, one per (site, layer) (stored URIs when ``out`` is a URI).
    """
    depth = num_layers(cfg.model, cfg.revision)
    bad = [layer for layer in cfg.layers if layer >= depth]
    if bad:
        raise InputError(f"layer {bad[0]} out of range: {cfg.model} has {depth} layers "
                         f"(0..{depth - 1})")
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    claim_output(cfg)
    windows = build_windows(cfg, tokenizer)
    n_shards = windows.n_shards(cfg.windows_per_shard)
    todo = pending_shards(cfg, n_shards)
    if todo:
        import ray

        ensure_ray(progress)
        items = []
        for i in todo:
            ids, docs = windows.shard(i, cfg.windows_per_shard)
            items.append({"index": i, "input_ids": ids, "doc_ids": docs})
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
    return write_manifests(cfg, model_revision(cfg.model, cfg.revision), n_shards)


def _shard_moment(path: str, centred: bool, sha256: str | None = None, chunk: int = 65536
                  ) -> tuple:
    if sha256 is not None:  # a stored shard: pulled to this node's mirror and checked
        path = pull_shard(path, sha256)
    x = torch.from_numpy(read_shard(path)["activation"])
    moment = SecondMoment(x.shape[1], centred)
    for r0 in range(0, len(x), chunk):
        moment.update(x[r0 : r0 + chunk])
    return moment.n, moment.total.numpy(), moment.outer.numpy()


def fit_second_moment(folder: str | Path, centred: bool = False, progress: bool = True):
    """E[mmᵀ] over a verified shard folder: one Ray task per shard, partial sums merged.

    ``folder`` may be a stored layer folder's URI: each task then pulls its shard on its own
    node and checks it against the manifest's sha256.
    """
    import ray

    if is_remote(folder):
        manifest = load_layer_manifest(folder)
        d, rows = manifest.d, manifest.rows
        args = [(uri, s.sha256) for uri, s in
                zip(shard_uris(str(folder), manifest), manifest.shards, strict=True)]
    else:
        shards = ShardSet.open(folder)
        d, rows, args = shards.d, shards.rows, [(str(p), None) for p in shards.paths]
    ensure_ray(progress)
    task = ray.remote(_shard_moment).options(runtime_env=worker_env() or None)
    pending = [task.remote(path, centred, sha) for path, sha in args]
    total = SecondMoment(d, centred)
    bar = tqdm(total=len(pending), desc=f"second moment {layer_name(folder)}",
               disable=not progress)
    while pending:
        ready, pending = ray.wait(pending)
        n, s, outer = ray.get(ready[0])
        part = SecondMoment(d, centred)
        part.n, part.total, part.outer = n, torch.tensor(s), torch.tensor(outer)
        total.merge(part)
        bar.update(1)
    bar.close()
    if total.n != rows:
        raise InputError(f"{redact(folder)}: read {total.n} rows but the manifest says {rows}")
    return total
