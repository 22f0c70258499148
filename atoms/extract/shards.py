"""Self-describing, checksummed Parquet shards of activations, one folder per (site, layer).

Layout: ``<root>/<site>/layer_<l>/shard-00000.parquet``, … each with a sidecar
``shard-00000.json`` once finished, and ``manifest.json`` once the extraction is done. Every file
is written atomically and a sidecar only after its parquet is in place, so "the sidecar exists and
the parquet's sha256 matches it" means "the shard is finished".
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from atoms.core.config import from_dict, require
from atoms.core.errors import ConfigError, InputError
from atoms.core.io import atomic_path, file_sha256
from atoms.core.io import code_version as current_code_version
from atoms.store.storage import Storage, is_remote, local_path

log = logging.getLogger(__name__)

SITES = ("resid_post", "mlp_key", "mlp_out")
TRANSFORMER_LENS_HOOKS = {"resid_post": "blocks.{layer}.hook_resid_post",
                          "mlp_key": "blocks.{layer}.mlp.hook_post",
                          "mlp_out": "blocks.{layer}.hook_mlp_out"}
"""Each site's hook in the TransformerLens naming that SAELens attaches SAEs by."""


def hook_name(site: str, layer: int) -> str:
    """The TransformerLens hook of (site, layer), e.g. ``blocks.5.hook_resid_post``."""
    if site not in TRANSFORMER_LENS_HOOKS:
        raise InputError(f"site {site!r} is unknown (choose from {', '.join(SITES)})")
    return TRANSFORMER_LENS_HOOKS[site].format(layer=int(layer))


DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
MANIFEST = "manifest.json"
OPTIONAL_MANIFEST_FIELDS = ("selection",)
"""Manifest fields newer than the format: absent in older manifests, their default then."""
INT_COLUMNS = {"token_id": pa.int32(), "doc_id": pa.int64(), "position": pa.int32()}

_SHARD_RE = re.compile(r"shard-(\d{5,})\.parquet")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_ROW_GROUP_BYTES = 64 << 20  # activation bytes per Parquet row group
_READ_ROWS = 65536  # rows per record batch when streaming shards back
# Float activations do not compress with snappy; storing them plain makes reads ~1.5x faster.
_COMPRESSION = {"activation": "none", **dict.fromkeys(INT_COLUMNS, "snappy")}


def _nonneg_int(value, name: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name}: expected a non-negative integer, got {value!r}") from None
    if value < 0:
        raise InputError(f"{name}: expected a non-negative integer, got {value}")
    return value


def layer_rel(site: str, layer: int) -> str:
    """``'<site>/layer_<layer>'``: a layer folder relative to the extraction's ``out``."""
    if site not in SITES:
        raise InputError(f"site: expected one of {list(SITES)}, got {site!r}")
    return f"{site}/layer_{_nonneg_int(layer, 'layer')}"


def layer_folder(root, site: str, layer: int) -> Path | str:
    """``<root>/<site>/layer_<layer>``: a Path under a local root, a URI under a stored one."""
    rel = layer_rel(site, layer)
    return Storage(root).uri_of(rel) if is_remote(root) else local_path(root) / rel


def is_shard_set(folder) -> bool:
    """Whether the local ``folder`` holds a shard set (its manifest is there)."""
    return (Path(folder) / MANIFEST).is_file()


def shard_name(index: int) -> str:
    """``'shard-00007.parquet'`` for index 7."""
    return f"shard-{_nonneg_int(index, 'index'):05d}.parquet"


def _sidecar(parquet: Path) -> Path:
    return parquet.with_suffix(".json")


@dataclass
class ShardInfo:
    """What a sidecar (and the manifest) records about one finished shard."""

    name: str
    rows: int
    sha256: str
    bytes: int
    tokens: int

    def __post_init__(self):
        require(bool(_SHARD_RE.fullmatch(self.name)), "name",
                f"expected 'shard-NNNNN.parquet', got {self.name!r}")
        require(bool(_SHA_RE.fullmatch(self.sha256)), "sha256",
                f"expected 64 lowercase hex digits, got {self.sha256!r}")
        for name in ("rows", "bytes", "tokens"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------- writing


def _activations(x, dtype: str) -> np.ndarray:
    """``x`` as a C-contiguous (rows, d) array of ``dtype``, finite after the cast."""
    if dtype not in DTYPES:
        raise InputError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if torch.is_tensor(x):
        if not x.is_floating_point():
            raise InputError(f"activations: expected floating point, got {x.dtype}")
        a = x.detach().to("cpu", getattr(torch, dtype)).contiguous().numpy()
    else:
        a = np.asarray(x)
        if a.dtype.kind != "f":
            raise InputError(f"activations: expected floating point, got {a.dtype}")
        with np.errstate(over="ignore"):
            a = np.ascontiguousarray(a, dtype=dtype)
    if a.ndim != 2 or 0 in a.shape:
        raise InputError(f"activations: expected a non-empty (rows, d) array, got {a.shape}")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        hint = " (|x| > 65504 overflows float16)" if dtype == "float16" else ""
        raise InputError(f"activations: {bad} NaN/Inf values as {dtype}{hint}")
    return a


def _int_column(x, name: str, rows: int, typ: pa.DataType) -> np.ndarray:
    """``x`` as a 1-D integer array of ``rows`` values that fit ``typ``."""
    a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if a.shape != (rows,):
        raise InputError(f"{name}: expected shape ({rows},), got {a.shape}")
    if a.dtype.kind not in "iu":
        raise InputError(f"{name}: expected integers, got dtype {a.dtype}")
    target = np.dtype(typ.to_pandas_dtype())
    lo, hi = np.iinfo(target).min, np.iinfo(target).max
    if int(a.min()) < lo or int(a.max()) > hi:
        raise InputError(f"{name}: values outside the {target} range [{lo}, {hi}]")
    return a.astype(target, copy=False)


def _table(acts: np.ndarray, columns: dict) -> pa.Table:
    """Arrow table of one shard; the activation column shares ``acts``' memory."""
    rows, d = acts.shape
    data = {"activation": pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), d)}
    for name, typ in INT_COLUMNS.items():
        data[name] = pa.array(_int_column(columns[name], name, rows, typ), type=typ)
    return pa.table(data)


def _write_json(path: Path, data) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path


def write_shard(folder, index: int, activations, token_ids, doc_ids, positions,
                dtype: str = "float32", tokens: int | None = None) -> ShardInfo:
    """Write shard ``index`` into ``folder``: the parquet, then its sidecar, each atomically.

    ``activations`` is (rows, d), numpy or torch, stored as ``dtype``; the id columns are 1-D of
    ``rows`` integers. ``tokens`` (tokens consumed for this shard) defaults to ``rows``.
    """
    acts = _activations(activations, dtype)
    cols = {"token_id": token_ids, "doc_id": doc_ids, "position": positions}
    table = _table(acts, cols)
    tokens = acts.shape[0] if tokens is None else _nonneg_int(tokens, "tokens")
    path = Path(folder) / shard_name(index)
    _sidecar(path).unlink(missing_ok=True)  # a stale sidecar must never vouch for new bytes
    group = max(1, _ROW_GROUP_BYTES // acts[0].nbytes)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=group, use_dictionary=list(INT_COLUMNS),
                       compression=_COMPRESSION)
        info = ShardInfo(path.name, acts.shape[0], file_sha256(tmp), tmp.stat().st_size, tokens)
    _write_json(_sidecar(path), dataclasses.asdict(info))
    return info


# ---------------------------------------------------------------------------- reading


def _schema_of(schema: pa.Schema, path: Path) -> tuple[int, str]:
    """(d, dtype) of a shard schema; InputError naming ``path`` if it is not a shard's."""
    for name in ("activation", *INT_COLUMNS):
        if name not in schema.names:
            raise InputError(f"{path}: missing column {name!r}")
    for name, typ in INT_COLUMNS.items():
        if schema.field(name).type != typ:
            raise InputError(f"{path}: column {name!r} is {schema.field(name).type}, "
                             f"expected {typ}")
    t = schema.field("activation").type
    dtype = next((k for k, v in DTYPES.items() if pa.types.is_fixed_size_list(t)
                  and t.value_type == v), None)
    if dtype is None:
        raise InputError(f"{path}: column 'activation' is {t}, "
                         "expected fixed_size_list<float32|float16>[d]")
    return t.list_size, dtype


def shard_schema(path, filesystem=None) -> tuple[int, str]:
    """(d, dtype) of a shard file, from its footer alone (on a pyarrow ``filesystem`` if given:
    ``path`` is then that filesystem's path)."""
    if filesystem is not None:
        return _schema_of(pq.read_schema(path, filesystem=filesystem), path)
    path = Path(path)
    return _schema_of(_open_parquet(path).schema_arrow, path)


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise InputError(f"{path}: shard file not found")
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable Parquet file ({first})") from None


def _numpy(arr: pa.Array) -> np.ndarray:
    """Writable numpy view of a null-free primitive Arrow array (a copy if Arrow's memory is
    immutable), so callers may wrap it with ``torch.from_numpy``."""
    buf, dtype = arr.buffers()[1], np.dtype(arr.type.to_pandas_dtype())
    if arr.null_count or buf is None or not buf.is_mutable:
        return arr.to_numpy(zero_copy_only=False, writable=True)
    return np.frombuffer(buf, dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def _column(arr) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        return arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    return arr


def _activation_numpy(arr, d: int) -> np.ndarray:
    """(rows, d) numpy view of a FixedSizeList activation (chunked) array."""
    return _numpy(_column(arr).flatten()).reshape(-1, d)


def iter_activation_chunks(path, d: int, rows: int = _READ_ROWS) -> Iterator[np.ndarray]:
    """One shard's activations as consecutive (≤ rows, d) arrays in its stored dtype."""
    with _open_parquet(Path(path)) as pf:
        for batch in pf.iter_batches(batch_size=rows, columns=["activation"]):
            yield _activation_numpy(batch.column(0), d)


def iter_chunks_with_doc_ids(path, d: int, rows: int = _READ_ROWS
                             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One shard's (activations, doc_ids) as consecutive chunks of ≤ ``rows`` rows."""
    with _open_parquet(Path(path)) as pf:
        for batch in pf.iter_batches(batch_size=rows, columns=["activation", "doc_id"]):
            yield _activation_numpy(batch.column(0), d), _numpy(_column(batch.column(1)))


def read_doc_ids(path) -> np.ndarray:
    """One shard's ``doc_id`` column."""
    with _open_parquet(Path(path)) as pf:
        return _numpy(_column(pf.read(columns=["doc_id"]).column(0)))


def doc_range_overlaps(path, lo: int, hi: int) -> bool:
    """Whether a shard may hold a doc_id in [lo, hi], from its row groups' statistics alone
    (True where a row group has none)."""
    with _open_parquet(Path(path)) as pf:
        col = pf.schema_arrow.get_field_index("doc_id")
        for i in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(i).column(col).statistics
            if st is None or not st.has_min_max or (st.min <= hi and st.max >= lo):
                return True
    return False


def read_shard(path) -> dict[str, np.ndarray]:
    """One shard's columns: ``activation`` (rows, d) in its stored dtype, ``token_id``,
    ``doc_id``, ``position``; zero-copy, writable views of the decoded Arrow memory."""
    path = Path(path)
    with _open_parquet(path) as pf:
        d, _ = _schema_of(pf.schema_arrow, path)
        table = pf.read()
    out = {"activation": _activation_numpy(table.column("activation"), d)}
    out.update({name: _numpy(_column(table.column(name))) for name in INT_COLUMNS})
    return out


# ---------------------------------------------------------------------------- resuming


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_info(path: Path) -> ShardInfo:
    try:
        return from_dict(ShardInfo, _load_json(path, "sidecar"))
    except ConfigError as e:
        raise InputError(f"{path}: {e}") from None


def _verified(sidecar: Path) -> ShardInfo:
    """The sidecar's info if its parquet is in place and matches; InputError saying why not."""
    info = _load_info(sidecar)
    parquet = sidecar.with_suffix(".parquet")
    if info.name != parquet.name:
        raise InputError(f"{sidecar}: name={info.name!r} but the sidecar is for {parquet.name}")
    if not parquet.is_file():
        raise InputError(f"{parquet}: missing although its sidecar exists")
    if parquet.stat().st_size != info.bytes:
        raise InputError(f"{parquet}: {parquet.stat().st_size} bytes but its sidecar says "
                         f"{info.bytes}")
    if file_sha256(parquet) != info.sha256:
        raise InputError(f"{parquet}: sha256 does not match its sidecar")
    return info


def _remove_temps(folder: Path) -> None:
    for tmp in [*folder.glob(".shard-*.tmp"), *folder.glob(f".{MANIFEST}.*.tmp")]:
        log.warning("%s: removing a temp file left by an interrupted write", tmp)
        tmp.unlink(missing_ok=True)


def finished_shards(folder) -> dict[int, ShardInfo]:
    """Index → info of the shards in ``folder`` that are finished (sidecar + matching sha256).

    Anything else is logged and deleted so it is redone: a sidecar without its parquet, a
    parquet that does not match its sidecar, a parquet without a sidecar, and temp files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    _remove_temps(folder)
    done = {}
    for sidecar in sorted(folder.glob("shard-*.json")):
        parquet = sidecar.with_suffix(".parquet")
        if not (m := _SHARD_RE.fullmatch(parquet.name)):
            continue
        try:
            done[int(m.group(1))] = _verified(sidecar)
        except InputError as e:
            log.warning("%s; deleting the shard so it is redone", e)
            parquet.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
    for parquet in sorted(folder.glob("shard-*.parquet")):
        m = _SHARD_RE.fullmatch(parquet.name)
        if m and int(m.group(1)) not in done:
            log.warning("%s: no sidecar (unfinished); deleting it so it is redone", parquet)
            parquet.unlink(missing_ok=True)
    return dict(sorted(done.items()))


# ---------------------------------------------------------------------------- manifest


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """What a finished (site, layer) folder holds and how it was made."""

    model: str
    revision: str
    site: str
    layer: int
    positions: str
    d: int
    dtype: str
    rows: int
    tokens_seen: int
    shards: list[ShardInfo]
    context_len: int
    corpus: str
    config: dict
    code_version: str = field(default_factory=current_code_version)
    created: str = field(default_factory=_now)
    selection: dict = field(default_factory=dict)
    """Fact prompts (counterfact): how many were kept, and skipped by reason."""

    def sae_metadata(self) -> dict:
        """What SAELens's ``metadata`` block says about where an SAE trained on these shards
        attaches: model, TransformerLens hook, context size, dataset, BOS (and our positions)."""
        return {"model_name": self.model, "hook_name": hook_name(self.site, self.layer),
                "hook_head_index": None, "context_size": self.context_len,
                "dataset_path": self.corpus,
                "prepend_bos": bool(self.config.get("prepend_bos", True)),
                "model_revision": self.revision, "positions": self.positions}

    def __post_init__(self):
        require(self.site in SITES, "site", f"expected one of {list(SITES)}, got {self.site!r}")
        require(self.dtype in DTYPES, "dtype",
                f"expected one of {list(DTYPES)}, got {self.dtype!r}")
        require(self.d > 0, "d", f"must be positive, got {self.d}")
        require(self.context_len > 0, "context_len", f"must be positive, got {self.context_len}")
        for name in ("layer", "rows", "tokens_seen"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(isinstance(self.config, dict), "config", f"expected a mapping, got {self.config!r}")
        seen: set[str] = set()
        for s in self.shards:
            require(s.name not in seen, "shards", f"{s.name} is listed twice")
            seen.add(s.name)


def write_manifest(folder, manifest: Manifest) -> Path:
    """Write ``folder/manifest.json`` atomically as pretty JSON; return its path."""
    return _write_json(Path(folder) / MANIFEST, dataclasses.asdict(manifest))


def load_manifest(folder) -> Manifest:
    """Read ``folder/manifest.json``; errors name the file and the field."""
    path = Path(folder) / MANIFEST
    return manifest_from_dict(_load_json(path, "manifest (is the extraction finished?)"), path)


def manifest_from_dict(data: dict, path) -> Manifest:
    """A manifest from its parsed JSON; errors name ``path`` (a file or URI) and the field."""
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [f.name for f in dataclasses.fields(Manifest)
               if f.name not in data and f.name not in OPTIONAL_MANIFEST_FIELDS]
    if missing:
        raise InputError(f"{path}: {missing[0]}: required field is missing")
    try:
        return from_dict(Manifest, data)
    except ConfigError as e:
        raise InputError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------- shard sets


def _check_float_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype: expected a torch floating-point dtype, got {dtype!r}")


class ShardSet:
    """An opened, verified shard folder."""

    def __init__(self, folder, manifest: Manifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self.paths = [self.folder / s.name for s in manifest.shards]

    @classmethod
    def open(cls, folder, verify: bool = True) -> ShardSet:
        """Load the manifest and check its shards: present, of its d and dtype, rows adding up,
        and (``verify``) byte size and sha256 matching. Any mismatch is a one-line InputError."""
        shards = cls(folder, load_manifest(folder))
        shards._check(verify)
        return shards

    def _check(self, verify: bool) -> None:
        m = self.manifest
        total = sum(s.rows for s in m.shards)
        if total != m.rows:
            raise InputError(f"{self.folder / MANIFEST}: rows={m.rows} but its shards list "
                             f"{total} rows")
        for info, path in zip(m.shards, self.paths, strict=True):
            self._check_shard(path, info, verify)

    def _check_shard(self, path: Path, info: ShardInfo, verify: bool) -> None:
        m = self.manifest
        with _open_parquet(path) as pf:
            d, dtype = _schema_of(pf.schema_arrow, path)
            rows = pf.metadata.num_rows
        for name, have, want in (("d", d, m.d), ("dtype", dtype, m.dtype),
                                 ("rows", rows, info.rows)):
            if have != want:
                raise InputError(f"{path}: {name}={have} but the manifest says {name}={want}")
        if verify:
            size = path.stat().st_size
            if size != info.bytes:
                raise InputError(f"{path}: bytes={size} but the manifest says bytes={info.bytes}")
            digest = file_sha256(path)
            if digest != info.sha256:
                raise InputError(f"{path}: sha256={digest} but the manifest says "
                                 f"sha256={info.sha256}")

    @property
    def d(self) -> int:
        return self.manifest.d

    @property
    def rows(self) -> int:
        return self.manifest.rows

    def _chunks(self) -> Iterator[np.ndarray]:
        """(n, d) activation arrays of every shard, in shard order."""
        for path in self.paths:
            yield from iter_activation_chunks(path, self.d)

    def read_all(self, dtype=torch.float32) -> torch.Tensor:
        """All rows, (rows, d), shards concatenated in order."""
        _check_float_dtype(dtype)
        out = torch.empty(self.rows, self.d, dtype=dtype)
        start = 0
        for chunk in self._chunks():
            out[start:start + len(chunk)] = torch.from_numpy(chunk)
            start += len(chunk)
        if start != self.rows:
            raise InputError(f"{self.folder}: read {start} rows but the manifest says {self.rows}")
        return out

    def iter_batches(self, batch_rows: int, dtype=torch.float32) -> Iterator[torch.Tensor]:
        """Consecutive (batch_rows, d) tensors across shard boundaries; the last may be shorter."""
        batch_rows = _nonneg_int(batch_rows, "batch_rows")
        if batch_rows == 0:
            raise InputError("batch_rows: must be positive, got 0")
        _check_float_dtype(dtype)
        buf, fill = torch.empty(batch_rows, self.d, dtype=dtype), 0
        for chunk in self._chunks():
            start = 0
            while start < len(chunk):
                n = min(batch_rows - fill, len(chunk) - start)
                buf[fill:fill + n] = torch.from_numpy(chunk[start:start + n])
                fill, start = fill + n, start + n
                if fill == batch_rows:
                    yield buf
                    buf, fill = torch.empty(batch_rows, self.d, dtype=dtype), 0
        if fill:
            yield buf[:fill]
