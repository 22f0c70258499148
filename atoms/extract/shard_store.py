"""Activation shards under a storage URI (s3://…, gs://…; see atoms/storage.py).

Writers extract into the node-local mirror (``mirror_path``) with ``write_shard`` and publish
each shard's parquet, then its sidecar: a stored sidecar is the completion marker, and a shard
counts as finished when its stored parquet has the sidecar's byte size (the sha256 is checked
where the shard is pulled). Readers call ``local_layer`` and open the result with
``ShardSet.open``. Every function here also takes a local folder and then does what
atoms/shards.py does.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from atoms.core.config import from_dict
from atoms.core.errors import ConfigError, InputError
from atoms.core.io import file_sha256
from atoms.extract.shards import (
    MANIFEST,
    Manifest,
    ShardInfo,
    finished_shards,
    layer_folder,
    layer_rel,
    load_manifest,
    manifest_from_dict,
    shard_name,
    shard_schema,
    write_manifest,
)
from atoms.store.storage import (
    Storage,
    StorageError,
    is_remote,
    mirror_path,
    pull,
    pull_file,
    redact,
)

log = logging.getLogger(__name__)

_SIDECAR_RE = re.compile(r"shard-(\d{5,})\.json")
_LAYER_RE = re.compile(r"([a-z_]+)/layer_(\d+)/" + re.escape(MANIFEST))
_READERS = 16  # sidecars read at once from an object store


def layer_name(folder: str | os.PathLike) -> str:
    """The last part of a layer folder's path or URI (``layer_3``), for messages."""
    return str(folder).partition("?")[0].rstrip("/").rpartition("/")[2]


def local_layer(folder: str | os.PathLike) -> Path:
    """A layer folder on local disk: ``folder`` itself when it is a local path; for a storage
    URI its node mirror, brought up to date (manifest always re-read). Open it with
    ``ShardSet.open``, which verifies every shard's sha256."""
    if not is_remote(folder):
        return mirror_path(folder)
    local = pull(folder)
    Storage(folder).get_file(MANIFEST, local / MANIFEST)
    return local


# ---------------------------------------------------------------------------- writing


def publish_shard(store: Storage, local: Path, index: int) -> None:
    """Upload shard ``index`` from the local layer folder to the stored layer folder ``store``:
    its old sidecar deleted first, then the parquet, then the sidecar (the completion marker)."""
    parquet = shard_name(index)
    sidecar = parquet.removesuffix(".parquet") + ".json"
    store.delete(sidecar)  # a stale sidecar must never vouch for new bytes
    store.put_file(local / parquet, parquet)
    store.put_file(local / sidecar, sidecar)


def stored_shards(store: Storage) -> dict[int, ShardInfo]:
    """Index → info of the finished shards in the stored layer folder ``store``: a valid
    sidecar and a stored parquet of the sidecar's byte size. Others are logged and left."""
    listing = store.files("", "shard-*")
    sidecars = [(int(m.group(1)), n) for n in listing if (m := _SIDECAR_RE.fullmatch(n))]

    def read(item: tuple[int, str]) -> ShardInfo | None:
        index, name = item
        try:
            info = from_dict(ShardInfo, store.read_json(name))
        except (ConfigError, InputError) as e:
            log.warning("%s: not a valid sidecar (%s); the shard is redone", store.show(name), e)
            return None
        if info.name != shard_name(index) or listing.get(info.name) != info.bytes:
            log.warning("%s: its parquet is missing or not %d bytes; the shard is redone",
                        store.show(name), info.bytes)
            return None
        return info

    with ThreadPoolExecutor(min(_READERS, max(1, len(sidecars)))) as pool:
        infos = list(pool.map(read, sidecars))
    return {i: info for (i, _), info in sorted(zip(sidecars, infos, strict=True)) if info}


def finished_layer_shards(out: str, site: str, layer: int) -> dict[int, ShardInfo]:
    """Finished shards of one layer folder of ``out``: ``finished_shards`` when local (which
    deletes unfinished ones), ``stored_shards`` for a storage URI."""
    if not is_remote(out):
        return finished_shards(layer_folder(out, site, layer))
    return stored_shards(Storage(out).child(layer_rel(site, layer)))


def shard_width(out: str, site: str, layer: int, name: str) -> int:
    """d of the shard ``name`` in one layer folder of ``out``, from its (stored) footer."""
    if not is_remote(out):
        return shard_schema(layer_folder(out, site, layer) / name)[0]
    store = Storage(out).child(layer_rel(site, layer))
    try:
        return shard_schema(store.path(name), store.fs)[0]
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StorageError(f"{store.show(name)}: cannot read the parquet footer ({first})"
                           ) from None


def save_layer_manifest(out: str, site: str, layer: int, manifest: Manifest) -> Path | str:
    """Write the manifest of one layer folder of ``out``: its path when local; for a storage
    URI it goes to the node mirror and then to storage, and the stored URI is returned."""
    if not is_remote(out):
        return write_manifest(layer_folder(out, site, layer), manifest)
    local = write_manifest(layer_folder(mirror_path(out), site, layer), manifest)
    return Storage(out).put_file(local, f"{layer_rel(site, layer)}/{MANIFEST}")


# ---------------------------------------------------------------------------- reading


def load_layer_manifest(folder: str | os.PathLike) -> Manifest:
    """The manifest of a layer folder (local path or storage URI; read from storage)."""
    if not is_remote(folder):
        return load_manifest(local_layer(folder))
    store = Storage(folder)
    return manifest_from_dict(store.read_json(MANIFEST), store.show(MANIFEST))


def shard_uris(folder: str, manifest: Manifest) -> list[str]:
    """The stored URI of every shard the manifest lists, in order; InputError naming the first
    one that is missing or not of the manifest's byte size."""
    store = Storage(folder)
    sizes = store.files("", "shard-*.parquet")
    for s in manifest.shards:
        if s.name not in sizes:
            raise InputError(f"{store.show(s.name)}: missing although the manifest lists it")
        if sizes[s.name] != s.bytes:
            raise InputError(f"{store.show(s.name)}: bytes={sizes[s.name]} but the manifest "
                             f"says bytes={s.bytes}")
    return [store.uri_of(s.name) for s in manifest.shards]


def pull_shard(uri: str, sha256: str) -> Path:
    """The node-local copy of the stored shard ``uri``, checked against ``sha256``; a mirrored
    copy of the right size but other bytes (stale) is downloaded once more."""
    path = pull_file(uri)
    if file_sha256(path) == sha256:
        return path
    base, _, query = uri.partition("?")
    folder, _, name = base.rpartition("/")
    Storage(f"{folder}?{query}" if query else folder).get_file(name, path)
    if file_sha256(path) != sha256:
        raise InputError(f"{redact(uri)}: sha256 does not match its manifest")
    return path


def layer_folders(root: str | os.PathLike) -> list[Path | str]:
    """Every ``<site>/layer_<l>`` folder under ``root`` (a path or a storage URI) that has a
    manifest, ordered by site, layer: Paths under a local root, URIs under a stored one."""
    store = Storage(root)
    found = sorted((m.group(1), int(m.group(2))) for rel in store.files("", MANIFEST, True)
                   if (m := _LAYER_RE.fullmatch(rel)))
    if not found:
        raise InputError(f"{store.name}: no extracted layers (run experiments/extract.py first)")
    return [layer_folder(root, site, layer) for site, layer in found]
