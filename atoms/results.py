"""A study's result rows: one Parquet file per finished trial, written atomically.

``<out>/rows/<trial key>.parquet`` holds one row per unit set the trial measured. A file exists
only once its trial finished, so a rerun skips exactly those trials, and the study table
(``<out>/results.parquet``, rebuilt from the row files) has one row per (trial, unit set).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from atoms.errors import InputError
from atoms.io import atomic_path

ROWS = "rows"
TABLE = "results.parquet"


def _column_safe(value):
    """Parquet-friendly scalars: nested values become JSON text."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return value


class ResultStore:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.rows_dir = self.out / ROWS

    def path(self, key: str) -> Path:
        return self.rows_dir / f"{key}.parquet"

    def write(self, key: str, rows: list[dict]) -> Path:
        """All rows of one trial, atomically (renamed into place once complete)."""
        if not rows:
            raise InputError(f"trial {key}: no result rows to write")
        table = pa.Table.from_pylist([{k: _column_safe(v) for k, v in r.items()} for r in rows])
        with atomic_path(self.path(key)) as tmp:
            pq.write_table(table, tmp)
        return self.path(key)

    def finished(self) -> dict[str, pd.DataFrame]:
        """Rows of every finished trial, by key (unfinished temp files are ignored)."""
        if not self.rows_dir.is_dir():
            return {}
        return {p.stem: pd.read_parquet(p) for p in sorted(self.rows_dir.glob("*.parquet"))}

    def table(self) -> pd.DataFrame:
        frames = [f for f in self.finished().values() if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def write_table(self) -> Path:
        """``results.parquet``: every finished trial's rows, sorted by trial and unit set."""
        table = self.table()
        if len(table):
            table = table.sort_values(["trial_key", "unit_set"], kind="stable")
        with atomic_path(self.out / TABLE) as tmp:
            table.to_parquet(tmp, index=False)
        return self.out / TABLE
