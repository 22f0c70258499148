"""The second moment E[mmᵀ] of a layer's shards on Ray: one task per shard, partial sums merged.

A stored layer folder (a storage URI) is read on each task's own node: the task pulls its shard
into that node's mirror and checks it against the manifest's sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from atoms.aip.metric import SecondMoment
from atoms.core.errors import InputError
from atoms.extract.shard_store import layer_name, load_layer_manifest, pull_shard, shard_uris
from atoms.extract.shards import ShardSet, read_shard
from atoms.store.ray_env import ensure_ray, worker_env
from atoms.store.storage import is_remote, redact

EXCLUDES = ("bos", "sinks")


@dataclass(frozen=True)
class RowFilter:
    """Rows left out of the second moment: ``bos`` drops position-0 rows of an extraction that
    prepended BOS; ``sinks`` drops rows whose norm exceeds ``sink_factor`` × the median row
    norm of their shard (attention-sink rows, whose norm dwarfs the rest)."""

    bos: bool = False
    sinks: bool = False
    sink_factor: float = 10.0

    def keep(self, x: torch.Tensor, position) -> tuple[torch.Tensor, int, int]:
        """(kept rows, BOS rows dropped, sink rows dropped)."""
        mask = torch.ones(len(x), dtype=torch.bool)
        if self.bos:
            mask &= torch.as_tensor(position) != 0
        bos = int((~mask).sum())
        if self.sinks and mask.any():
            norms = torch.linalg.vector_norm(x.double(), dim=1)
            mask &= norms <= self.sink_factor * norms[mask].median()
        return x[mask], bos, int((~mask).sum()) - bos


def _shard_moment(path: str, centred: bool, sha256: str | None = None, chunk: int = 65536,
                  rows: RowFilter = RowFilter()) -> tuple:
    if sha256 is not None:  # a stored shard: pulled to this node's mirror and checked
        path = pull_shard(path, sha256)
    shard = read_shard(path)
    x, bos, sinks = rows.keep(torch.from_numpy(shard["activation"]), shard["position"])
    moment = SecondMoment(x.shape[1], centred)
    for r0 in range(0, len(x), chunk):
        moment.update(x[r0 : r0 + chunk])
    return (moment.n, moment.shift.numpy(), moment.total.numpy(), moment.outer.numpy(),
            bos, sinks)


def fit_second_moment(folder: str | Path, centred: bool = False, progress: bool = True,
                      rows: RowFilter = RowFilter(), dropped: dict | None = None):
    """E[mmᵀ] over a verified shard folder: one Ray task per shard, partial sums merged; the
    rows ``rows`` leaves out are counted into ``dropped`` ({"bos": n, "sinks": n}).

    ``folder`` may be a stored layer folder's URI: each task then pulls its shard on its own
    node and checks it against the manifest's sha256.
    """
    import ray

    if is_remote(folder):
        manifest = load_layer_manifest(folder)
        d, expected = manifest.d, manifest.rows
        args = [(uri, s.sha256) for uri, s in
                zip(shard_uris(str(folder), manifest), manifest.shards, strict=True)]
    else:
        shards = ShardSet.open(folder)
        d, expected, args = shards.d, shards.rows, [(str(p), None) for p in shards.paths]
    ensure_ray(progress)
    task = ray.remote(_shard_moment).options(runtime_env=worker_env() or None)
    pending = [task.remote(path, centred, sha, rows=rows) for path, sha in args]
    counts = {"bos": 0, "sinks": 0} if dropped is None else dropped
    counts.update(bos=0, sinks=0)
    total = SecondMoment(d, centred)
    bar = tqdm(total=len(pending), desc=f"second moment {layer_name(folder)}",
               disable=not progress)
    while pending:
        ready, pending = ray.wait(pending)
        n, shift, s, outer, bos, sinks = ray.get(ready[0])
        counts["bos"] += bos
        counts["sinks"] += sinks
        part = SecondMoment(d, centred)
        part.n, part.shift = n, torch.tensor(shift)
        part.total, part.outer = torch.tensor(s), torch.tensor(outer)
        total.merge(part)
        bar.update(1)
    bar.close()
    if total.n + counts["bos"] + counts["sinks"] != expected:
        raise InputError(f"{redact(folder)}: read {total.n + counts['bos'] + counts['sinks']} "
                         f"rows but the manifest says {expected}")
    return total
