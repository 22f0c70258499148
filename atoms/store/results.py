"""A study's result rows: one Parquet file per finished trial, written atomically.

``<out>/rows/<trial key>.parquet`` holds one row per unit set the trial measured. A file exists
only once its trial finished, so a rerun skips exactly those trials, and the study table
(``<out>/results.parquet``, rebuilt from the row files) has one row per (trial, unit set).
``out`` is a folder or a storage URI (``atoms.store.storage``): every node of a cluster writes its
rows there, each as one atomic write.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load, save

from atoms.core.errors import InputError
from atoms.store.storage import Storage, pull

ROWS = "rows"
UNITS = "units"
TABLE = "results.parquet"
MONOSEMANTICITY = "monosemanticity"
STUDY_FILES = (TABLE, "study.json", "summary.md")


def _column_safe(value):
    """Parquet-friendly scalars: nested values become JSON text."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class ResultStore:
    def __init__(self, out: str | Path):
        self.storage = Storage(out)
        self.out = self.storage.uri

    def path(self, key: str) -> str:
        """The URI (or local path) of trial ``key``'s row file."""
        return self.storage.uri_of(f"{ROWS}/{key}.parquet")

    def write(self, key: str, rows: list[dict]) -> str:
        """All rows of one trial, in one atomic write."""
        if not rows:
            raise InputError(f"trial {key}: no result rows to write")
        table = pa.Table.from_pylist([{k: _column_safe(v) for k, v in r.items()} for r in rows])
        return self.storage.write_bytes(f"{ROWS}/{key}.parquet", _parquet_bytes(table))

    def write_units(self, key: str, name: str, directions) -> str:
        """The unit directions (N, H) of unit set ``name`` of trial ``key``, as float16
        safetensors ``<out>/units/<key>/<name>.safetensors`` (cross-seed stability reads them);
        written before the trial's rows, so a finished trial always has them."""
        data = save({"directions": torch.as_tensor(directions).detach().cpu().half()
                     .contiguous()})
        return self.storage.write_bytes(f"{UNITS}/{key}/{name}.safetensors", data)

    def read_units(self, key: str, name: str):
        """The float32 (N, H) directions ``write_units`` stored."""
        rel = f"{UNITS}/{key}/{name}.safetensors"
        if self.storage.size(rel) is None:
            raise InputError(f"{self.storage.show(rel)}: unit directions missing")
        return load(self.storage.read_bytes(rel))["directions"].float()

    def finished(self) -> dict[str, pd.DataFrame]:
        """Rows of every finished trial, by key (unfinished temp files are ignored)."""
        found = self.storage.files(ROWS, "*.parquet")
        return {Path(rel).stem: pq.read_table(io.BytesIO(self.storage.read_bytes(rel))
                                              ).to_pandas() for rel in found}

    def table(self) -> pd.DataFrame:
        frames = [f for f in self.finished().values() if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def write_table(self, table: pd.DataFrame | None = None) -> tuple[str, pd.DataFrame]:
        """``results.parquet``: ``table`` (default: every finished trial's rows), sorted by
        trial and unit set; returns (its path or URI, the table)."""
        table = self.table() if table is None else table
        if len(table):
            table = table.sort_values(["trial_key", "unit_set"], kind="stable")
        return self.storage.write_bytes(TABLE, _parquet_bytes(
            pa.Table.from_pandas(table, preserve_index=False))), table


def pull_results(out: str | Path) -> Path:
    """A local folder with a study's results (the study files, ``rows/`` and
    ``monosemanticity/``, not the trial folders): ``out`` itself when local, else its node
    mirror brought up to date."""
    local = pull(out, recursive=False)
    for sub in (ROWS, MONOSEMANTICITY):
        pull(Storage(out).uri_of(sub))
    return local


def publish_results(local: Path, out: str | Path, names: tuple[str, ...]) -> list[str]:
    """Copy the named files and folders of the local study folder ``local`` to ``out`` (a
    storage URI); missing names are skipped. Returns the URIs written."""
    store, written = Storage(out), []
    for name in names:
        if (local / name).is_dir():
            written += store.put_tree(local / name, name)
        elif (local / name).is_file():
            written.append(store.put_file(local / name, name))
    return written
