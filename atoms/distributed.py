"""Ray glue: start or join Ray, extract shards with Ray Data, sum second moments with tasks.

Embedded: ``ensure_ray()`` starts a local Ray. Inside ``ray job submit`` (RAY_ADDRESS set) it
joins the cluster with a bare ``ray.init()``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from atoms.aip import SecondMoment
from atoms.config import from_dict, to_dict
from atoms.errors import InputError
from atoms.extraction import (
    ExtractConfig,
    ShardExtractor,
    build_windows,
    claim_output,
    pending_shards,
    write_manifests,
)
from atoms.models import load_tokenizer, model_revision, num_layers
from atoms.shards import ShardSet, read_shard


def ensure_ray(progress: bool = True) -> None:
    """Join the running Ray (a job, or one this process started) or start a local one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(log_to_driver=progress)
    ray.data.DataContext.get_current().enable_progress_bars = progress


class _ExtractActor:
    """A Ray Data actor holding one model replica; each batch is one shard."""

    def __init__(self, cfg: dict):
        self.extractor = ShardExtractor(from_dict(ExtractConfig, cfg))

    def __call__(self, batch: dict) -> dict:
        out = [self.extractor.write(int(i), ids, docs)
               for i, ids, docs in zip(batch["index"], batch["input_ids"], batch["doc_ids"],
                                       strict=True)]
        return {k: np.array([o[k] for o in out]) for k in ("index", "rows", "tokens")}


def run_extraction(cfg: ExtractConfig, progress: bool = True) -> list[Path]:
    """Extract every pending shard on a pool of model actors; write the manifests.

    Finished shards (sidecar present, checksum verified) are skipped, so a killed run resumes.
    Returns the manifest paths, one per (site, layer).
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
            num_gpus=gpus,
        )
        bar = tqdm(total=len(todo), desc="extract shards", disable=not progress)
        for _ in results.iter_rows():
            bar.update(1)
        bar.close()
    return write_manifests(cfg, model_revision(cfg.model, cfg.revision), n_shards)


def _shard_moment(path: str, centred: bool, chunk: int = 65536) -> tuple:
    x = torch.from_numpy(read_shard(path)["activation"])
    moment = SecondMoment(x.shape[1], centred)
    for r0 in range(0, len(x), chunk):
        moment.update(x[r0 : r0 + chunk])
    return moment.n, moment.total.numpy(), moment.outer.numpy()


def fit_second_moment(folder: str | Path, centred: bool = False, progress: bool = True):
    """E[mmᵀ] over a verified shard folder: one Ray task per shard, partial sums merged."""
    import ray

    shards = ShardSet.open(folder)
    ensure_ray(progress)
    task = ray.remote(_shard_moment)
    pending = [task.remote(str(p), centred) for p in shards.paths]
    total = SecondMoment(shards.d, centred)
    bar = tqdm(total=len(pending), desc=f"second moment {Path(folder).name}",
               disable=not progress)
    while pending:
        ready, pending = ray.wait(pending)
        n, s, outer = ray.get(ready[0])
        part = SecondMoment(shards.d, centred)
        part.n, part.total, part.outer = n, torch.tensor(s), torch.tensor(outer)
        total.merge(part)
        bar.update(1)
    bar.close()
    return total
