"""Training batches, epoch by epoch, deterministic in (seed, epoch, rank).

A batch source has one method, ``epoch(e)``, yielding full (batch_size, d) float32 batches. The
same (seed, epoch, rank, world) always yields the same batches, so a run resumed at
(epoch, batch) continues exactly where it stopped.

- ``TensorBatches``: rows in memory (any device), a fresh permutation every epoch.
- ``ShardBatches``: Parquet shards streamed with pyarrow; file order permuted every epoch,
  files dealt to ranks round-robin, rows shuffled within a buffer of ``shuffle_rows``.
- ``DataSplit``: the held-out shards (the last ones: later documents) and the training shards;
  held-out rows are only those of documents that no training shard holds (``unseen_rows``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from atoms.aip.metric import Whitening
from atoms.core.errors import InputError
from atoms.core.validation import as_rows, check_finite
from atoms.extract.shards import (
    ShardSet,
    doc_range_overlaps,
    iter_activation_chunks,
    iter_chunks_with_doc_ids,
    read_doc_ids,
)


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator for one (seed, epoch, rank); independent streams for each triple."""
    return torch.Generator().manual_seed(hash((int(seed), int(epoch), int(rank))) & (2**62 - 1))


class TensorBatches:
    """Rows of an in-memory tensor; each epoch is one random permutation, remainder dropped."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0):
        self.data = as_rows(data, "activations").float()
        if batch_size > len(self.data):
            raise InputError(f"batch_size: {batch_size} is more than the {len(self.data)} rows")
        self.batch_size, self.seed, self.rank = batch_size, seed, rank

    @property
    def d(self) -> int:
        return self.data.shape[1]

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        gen = epoch_generator(self.seed, epoch, self.rank)
        order = torch.randperm(len(self.data), generator=gen).to(self.data.device)
        b = self.batch_size
        for start in range(0, len(order) - b + 1, b):
            yield self.data[order[start:start + b]]


class MappedBatches:
    """Another source's batches, each mapped to the training geometry, (x − c)P, on the fly."""

    def __init__(self, source, whitening: Whitening):
        self.source, self.whitening = source, whitening
        self._cast: dict = {}
        """The map in each (device, dtype) the batches come in, cast once."""

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        for batch in self.source.epoch(epoch):
            key = (batch.device, batch.dtype)
            if key not in self._cast:
                self._cast[key] = self.whitening.to(batch)
            yield self._cast[key].apply(batch)


def in_geometry(source, whitening: Whitening | None):
    """``source`` with rows in the training geometry: unchanged when Euclidean (None), an
    in-memory tensor mapped once, a stream mapped batch by batch."""
    if whitening is None:
        return source
    if isinstance(source, TensorBatches):
        data = whitening.to(source.data).apply(source.data)
        return TensorBatches(data, source.batch_size, source.seed, source.rank)
    return MappedBatches(source, whitening)


def epoch_files(paths: list[Path], seed: int, epoch: int, rank: int, world: int) -> list[Path]:
    """This rank's files for this epoch: the epoch's permutation of ``paths``, every world-th."""
    order = torch.randperm(len(paths), generator=epoch_generator(seed, epoch, -1)).tolist()
    return [paths[i] for i in order[rank::world]]


class ShardBatches:
    """Stream full batches from Parquet shards without loading the set into memory."""

    def __init__(self, paths: list[Path], d: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle_rows: int = 65536):
        if len(paths) < world:
            raise InputError(f"data: {len(paths)} training shards for {world} workers; "
                             "each worker needs at least one")
        self.paths, self.d, self.batch_size = list(paths), d, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_rows = max(shuffle_rows, batch_size)

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        files = epoch_files(self.paths, self.seed, epoch, self.rank, self.world)
        gen = epoch_generator(self.seed, epoch, self.rank)
        b, pending, held = self.batch_size, [], 0
        for chunk in (c for f in files for c in iter_activation_chunks(f, self.d, 8192)):
            pending.append(chunk)
            held += len(chunk)
            if held >= self.shuffle_rows:
                rest = yield from self._emit(np.concatenate(pending), gen)
                pending, held = [rest], len(rest)
        if held >= b:
            yield from self._emit(np.concatenate(pending), gen)

    def _emit(self, rows: np.ndarray, gen: torch.Generator):
        """Yield shuffled full batches of ``rows``; return the unused remainder."""
        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        x = x[torch.randperm(len(x), generator=gen)]
        b = self.batch_size
        full = len(x) // b * b
        for start in range(0, full, b):
            yield x[start:start + b]
        return x[full:].numpy()


@dataclass
class DataSplit:
    """Training and held-out shards of one shard set (held-out = the last shards)."""

    folder: Path
    d: int
    train: list[Path]
    train_rows: int
    holdout: list[Path]
    holdout_rows: int
    row_limit: int = 0
    """Set by ``limit``: train on the first this-many rows only (0: all)."""
    train_all: list[Path] = dataclasses.field(default_factory=list)
    """Every training shard, also after ``limit``: the documents held-out rows must avoid."""

    @classmethod
    def of(cls, folder, holdout_shards: int = 1, verify: bool = True) -> DataSplit:
        shards = ShardSet.open(folder, verify=verify)
        train, held = split_rows(shards.manifest, holdout_shards, folder)
        cut = len(shards.paths) - holdout_shards
        return cls(Path(folder), shards.d, shards.paths[:cut], train, shards.paths[cut:], held,
                   train_all=shards.paths[:cut])

    def limit(self, rows: int, field: str = "run.train_rows") -> DataSplit:
        """The first ``rows`` training rows (in document order): the shard prefix that holds
        them, with ``train_rows`` = ``rows``; readers in memory stop there exactly, streaming
        readers use the whole prefix (recorded as ``parquet_rows(train)``)."""
        if not 1 <= rows <= self.train_rows:
            raise InputError(f"{field}: {rows} rows asked for but {self.folder} has "
                             f"{self.train_rows} training rows (after holding out "
                             f"{len(self.holdout)} shards)")
        paths, have = [], 0
        for path in self.train:
            if have >= rows:
                break
            paths.append(path)
            have += parquet_rows([path])
        return dataclasses.replace(self, train=paths, train_rows=rows, row_limit=rows)

    def check_d(self, d_in: int, field: str = "sae.d_in") -> None:
        if d_in != self.d:
            raise InputError(f"{self.folder}: the shard set has d={self.d} but {field}={d_in}")


def split_rows(manifest, holdout_shards: int, where) -> tuple[int, int]:
    """(training rows, held-out rows) of a manifest whose last ``holdout_shards`` are held out."""
    rows = [i.rows for i in manifest.shards]
    if not 1 <= holdout_shards < len(rows):
        raise InputError(f"holdout_shards: {holdout_shards} of the {len(rows)} shards in "
                         f"{where}; need 1 ≤ holdout_shards < shards")
    cut = len(rows) - holdout_shards
    return sum(rows[:cut]), sum(rows[cut:])


def parquet_rows(paths: list[Path]) -> int:
    """Total rows of Parquet files, from their footers."""
    total = 0
    for path in paths:
        with pq.ParquetFile(path) as pf:
            total += pf.metadata.num_rows
    return total


def read_rows(paths: list[Path], d: int, max_rows: int) -> torch.Tensor:
    """The first ``max_rows`` rows of ``paths`` read in order, as float32 (checked finite)."""
    out, have = [], 0
    chunks = (c for path in paths for c in iter_activation_chunks(path, d))
    while have < max_rows and (chunk := next(chunks, None)) is not None:
        out.append(torch.from_numpy(chunk.astype(np.float32, copy=False)))
        have += len(chunk)
    x = torch.cat(out)[:max_rows]
    check_finite(x, str(paths[0].parent))
    return x


HELD_OUT_SEED = 0


def shared_documents(split: DataSplit) -> np.ndarray:
    """doc_ids found both in a held-out shard and in a training shard (every training shard,
    also when ``limit`` trains on fewer): a document cut by the shard boundary. Training shards
    whose doc_id statistics miss the held-out range are not read."""
    held = np.unique(np.concatenate([read_doc_ids(p) for p in split.holdout]))
    if not len(held):
        return held
    lo, hi = int(held[0]), int(held[-1])
    seen = [read_doc_ids(p) for p in (split.train_all or split.train)
            if doc_range_overlaps(p, lo, hi)]
    return np.intersect1d(held, np.concatenate(seen)) if seen else held[:0]


def unseen_rows(split: DataSplit, max_rows: int, exact: bool = True) -> torch.Tensor:
    """The first ``max_rows`` held-out rows (in order) of documents no training shard holds;
    when fewer exist, all of them (``exact`` False) or an InputError naming the folder."""
    shared = shared_documents(split)
    out, have = [], 0
    chunks = (c for path in split.holdout for c in iter_chunks_with_doc_ids(path, split.d, 8192))
    while have < max_rows and (chunk := next(chunks, None)) is not None:
        rows = chunk[0][~np.isin(chunk[1], shared)]
        out.append(torch.from_numpy(rows.astype(np.float32)))
        have += len(rows)
    if have < max_rows and (exact or not have):
        raise InputError(f"{split.folder}: {max_rows} held-out rows asked for but its "
                         f"{len(split.holdout)} held-out shards hold {have} rows of documents "
                         f"unseen in training ({len(shared)} documents shared with training "
                         "shards are left out); hold out more shards or ask for fewer rows")
    x = torch.cat(out)[:max_rows]
    check_finite(x, str(split.folder))
    return x


def held_out_rows(split: DataSplit, rows: int, pool: int = 0) -> torch.Tensor:
    """``rows`` held-out rows of unseen documents (``unseen_rows``): the first in order, or
    all there are when fewer (``pool`` 0); or the first of a permutation (seed
    ``HELD_OUT_SEED``) of exactly the first ``pool`` of them, so that the first ``rows`` and the
    rest of the pool are two random samples of the same documents."""
    if not pool:
        return unseen_rows(split, rows, exact=False)
    x = unseen_rows(split, pool)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    return x[order][:rows]


def fits_in_memory(rows: int, d: int, gb: float) -> bool:
    """Whether ``rows`` float32 rows of width ``d`` fit in ``gb`` GB (``run.in_memory_gb``)."""
    return rows * d * 4 <= gb * 2**30
