"""Held-out rows come only from documents that no training shard holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atoms.core.errors import InputError
from atoms.extract.shards import Manifest, write_manifest, write_shard
from atoms.train.batches import DataSplit, held_out_rows, shared_documents, unseen_rows

ROWS, SHARDS, DOC_LEN = 600, 5, 70
"""600 rows in 5 shards of 120; documents of 70 rows, so shard boundaries cut documents."""


def _shard_set(folder, doc_len: int = DOC_LEN):
    """Row i: first coordinate i (so a row names itself), doc_id i // doc_len."""
    x = torch.randn(ROWS, 8)
    x[:, 0] = torch.arange(ROWS, dtype=torch.float32)
    infos = []
    for i, idx in enumerate(torch.arange(ROWS).tensor_split(SHARDS)):
        ids = idx.numpy()
        infos.append(write_shard(folder, i, x[idx].numpy(), ids, ids // doc_len, ids % 64))
    write_manifest(folder, Manifest(
        model="synthetic", revision="0", site="resid_post", layer=0, positions="all", d=8,
        dtype="float32", rows=ROWS, tokens_seen=ROWS, shards=infos, context_len=64,
        corpus="synthetic", config={}))
    return folder


@pytest.mark.parametrize("holdout", [1, 2])
def test_held_out_rows_share_no_document_with_training(tmp_path, holdout):
    split = DataSplit.of(_shard_set(tmp_path), holdout)
    cut = ROWS - holdout * ROWS // SHARDS  # first held-out row
    train_docs = set((np.arange(cut) // DOC_LEN).tolist())
    assert list(shared_documents(split)) == [(cut - 1) // DOC_LEN]
    pool = ROWS - cut - (DOC_LEN - cut % DOC_LEN)  # the boundary document's held-out rows go
    x = unseen_rows(split, pool)
    rows = x[:, 0].long().numpy()
    assert not set(rows // DOC_LEN) & train_docs
    assert rows.tolist() == list(range(ROWS - pool, ROWS))
    with pytest.raises(InputError, match=f"{pool + 1} held-out rows asked for.*{pool} rows"):
        unseen_rows(split, pool + 1)
    sample = held_out_rows(split, 50, pool)  # a permutation of the same unseen rows
    assert set(sample[:, 0].long().tolist()) <= set(rows.tolist())


def test_a_limited_split_still_avoids_every_training_document(tmp_path):
    split = DataSplit.of(_shard_set(tmp_path), 1).limit(100)  # trains on shard 0 only
    assert list(shared_documents(split)) == [(ROWS - ROWS // SHARDS - 1) // DOC_LEN]


def test_documents_aligned_with_shards_lose_no_rows(tmp_path):
    split = DataSplit.of(_shard_set(tmp_path, doc_len=ROWS // SHARDS), 1)
    assert len(shared_documents(split)) == 0
    assert len(unseen_rows(split, ROWS // SHARDS)) == ROWS // SHARDS
