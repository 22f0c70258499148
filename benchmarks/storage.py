"""Shard folders through the storage layer: publish to and mirror from an S3 store.

    python -m benchmarks.storage

A real S3 server (SeaweedFS, loopback) and a shard folder of 8 × 4096 rows at d = 2304
(float32, the Gemma2-2B width). Publishing (``put_tree``) and mirroring into an empty node cache
(``pull``) one file at a time and with ``TRANSFERS`` files at once, a second ``pull`` with
nothing to copy, and the sha256 check a consumer runs on the mirror, each against a local
``copytree`` of the same folder in the same process. Loopback has no network, so this measures
the layer's own overhead and the server, not a cloud link.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import atoms.store.storage
from atoms.extract.shards import MANIFEST, ShardSet
from atoms.store.storage import Storage, pull
from benchmarks.common import record
from tests.s3server import S3Server
from tests.shardsets import write_shard_set

SHARDS, ROWS, D = 8, 4096, 2304


def shard_folder(folder: Path) -> int:
    write_shard_set(folder, torch.randn(SHARDS * ROWS, D, generator=torch.Generator()
                                        .manual_seed(0)), SHARDS)
    return sum(p.stat().st_size for p in folder.iterdir())


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = shard_folder(tmp / "shards")
        server = S3Server(tmp / "s3")
        try:
            copy = timed(lambda: shutil.copytree(tmp / "shards", tmp / "copy"))
            steps = [("local copytree (baseline)", copy)]
            parallel = atoms.storage.TRANSFERS
            for transfers in (1, parallel):
                atoms.storage.TRANSFERS = transfers
                os.environ["ATOMS_STORAGE_CACHE"] = str(tmp / f"cache-{transfers}")
                store = Storage(server.uri(f"bench-{transfers}"))
                steps += [
                    (f"put_tree to S3, {transfers} at once",
                     timed(store.put_tree, tmp / "shards", "", last=(MANIFEST,))),
                    (f"pull into an empty mirror, {transfers} at once", timed(pull, store.uri))]
            steps += [("pull again (nothing to copy)", timed(pull, store.uri)),
                      ("pull again + sha256 of every shard",
                       timed(lambda: ShardSet.open(pull(store.uri), verify=True)))]
        finally:
            server.stop()
    mb = size / 2**20
    rows = [[name, f"{seconds:.2f}", f"{mb / seconds:,.0f}", f"{seconds / copy:.1f}"]
            for name, seconds in steps]
    record("Storage: a shard folder to and from S3 (benchmarks/storage.py)",
           ["step", "s", "MB/s", "vs local copy"], rows,
           f"{SHARDS} shards × {ROWS} rows × d={D} float32 = {mb:.0f} MB; SeaweedFS 4.48 on "
           "loopback (no network in the figures).")


if __name__ == "__main__":
    main()
