"""Shard sets the training tests write themselves: known atoms, sparse codes, Parquet shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set
from atoms.extract.shards import Manifest, write_manifest, write_shard


def write_shard_set(folder, x: torch.Tensor, shards: int) -> Path:
    """Split the rows of ``x`` into ``shards`` equal shards plus a manifest in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    infos, start = [], 0
    for i, part in enumerate(torch.tensor_split(x, shards)):
        ids = np.arange(start, start + len(part))  # every row its own document
        infos.append(write_shard(folder, i, part.numpy(), ids % 50000, ids, ids % 64))
        start += len(part)
    write_manifest(folder, Manifest(
        model="synthetic", revision="0", site="resid_post", layer=0, positions="all",
        d=x.shape[1], dtype="float32", rows=len(x), tokens_seen=len(x), shards=infos,
        context_len=64, corpus="synthetic", config={}))
    return folder


def synthetic_shard_set(folder, d: int = 32, n_atoms: int = 64, rows: int = 12288,
                        shards: int = 6, seed: int = 0) -> Path:
    """Sparse sums (K ≤ 3) of ``n_atoms`` atoms of AIP coherence 0.2 in ``d`` dimensions."""
    s = make_atom_set(SyntheticConfig(d=d, n_atoms=n_atoms, coherence=0.2, k=3, exact_k=False,
                                      n_samples=rows, seed=seed))
    return write_shard_set(folder, s.activations.float(), shards)
