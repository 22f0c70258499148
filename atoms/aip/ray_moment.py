"""The second moment E[mmᵀ] of a layer's shards on Ray: one task per shard, partial sums merged.

A stored layer folder (a storage URI) is read on each task's own node: the task pulls its shard
into that node's mirror and checks it against the manifest's sha256.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from atoms.aip.metric import SecondMoment
from atoms.core.errors import InputError
from atoms.extract.shard_store import layer_name, load_layer_manifest, pull_shard, shard_uris
from atoms.extract.shards import ShardSet, read_shard
from atoms.store.ray_env import ensure_ray, worker_env
from atoms.store.storage import is_remote, redact


def _shard_moment(path: str, centred: bool, sha256: str | None = None, chunk: int = 65536
                  ) -> tuple:
    if sha256 is not None:  # a stored shard: pulled to this node's mirror and checked
        path = pull_shard(path, sha256)
    x = torch.from_numpy(read_shard(path)["activation"])
    moment = SecondMoment(x.shape[1], centred)
    for r0 in range(0, len(x), chunk):
        moment.update(x[r0 : r0 + chunk])
    return moment.n, moment.shift.numpy(), moment.total.numpy(), moment.outer.numpy()


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
        n, shift, s, outer = ray.get(ready[0])
        part = SecondMoment(d, centred)
        part.n, part.shift = n, torch.tensor(shift)
        part.total, part.outer = torch.tensor(s), torch.tensor(outer)
        total.merge(part)
        bar.update(1)
    bar.close()
    if total.n != rows:
        raise InputError(f"{redact(folder)}: read {total.n} rows but the manifest says {rows}")
    return total
