"""Where artefacts live: a local folder or any URI that pyarrow's filesystems open.

    /data/atoms/study, file:///data/atoms/study      a local folder or a shared mount (NFS, EFS,
                                                      a Kubernetes PVC): every node sees the same
    s3://bucket/prefix                                AWS S3 (credentials: the AWS default chain)
    s3://bucket/prefix?endpoint_override=host:9000&scheme=http
                                                      any S3-compatible store (MinIO, SeaweedFS…)
    gs://bucket/prefix, hdfs://namenode:8020/path     whatever else pyarrow.fs opens

Every write is atomic: a local file is written under a temporary name and renamed; an object
store PUT is atomic by itself. A folder is published file by file with its completion marker
last (``put_tree``), so a reader that sees the marker sees every file before it.

Compute reads local disk: ``pull`` copies a stored folder into a node-local mirror
(``mirror_path``), each file downloaded under a temporary name and renamed; files already there
with the stored size are kept, so a second pull on the same node copies nothing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from atoms.core.errors import AtomsError, InputError, first_line
from atoms.core.io import atomic_path, cache_root

CHUNK = 8 * 2**20
TRANSFERS = int(os.environ.get("ATOMS_STORAGE_TRANSFERS", 8))
"""Files copied at once by ``put_tree`` and ``pull``."""
CACHE_ENV = "ATOMS_STORAGE_CACHE"


class StorageError(AtomsError, OSError):
    """A storage URI that cannot be opened, read or written (one line naming the URI)."""


def is_remote(uri: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than ``file://`` (s3://, gs://, hdfs://…)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def local_path(uri: str | os.PathLike) -> Path:
    """The path of a local folder or ``file://`` URI, as given (not resolved)."""
    text = str(uri)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def redact(uri: str | os.PathLike) -> str:
    """``uri`` with any secret in its user part replaced: ``s3://key:***@bucket/…``."""
    text = str(uri)
    scheme, sep, rest = text.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return text
    user, _, tail = rest.partition("@")
    return f"{scheme}://{user.split(':', 1)[0]}:***@{tail}"


def redact_all(value):
    """``value`` (nested dicts, lists, strings) with every URI's secret redacted: for configs
    that are recorded or shown."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_all(v) for v in value)
    return value


class Storage:
    """A folder addressed by ``uri``; every method takes a path relative to it ('' = itself)."""

    def __init__(self, uri: str | os.PathLike, fs: pafs.FileSystem | None = None,
                 root: str | None = None):
        text = str(uri)
        self.remote = is_remote(text)
        if not self.remote:
            self.uri = str(local_path(text).expanduser().resolve())
            self.fs, self.root = pafs.LocalFileSystem(), self.uri
            self._base, self._query = self.uri, ""
            return
        self._base, _, self._query = text.partition("?")
        self._base = self._base.rstrip("/")
        self.uri = text
        if fs is None:
            try:
                fs, root = pafs.FileSystem.from_uri(text)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise StorageError(f"{redact(text)}: cannot open ({first_line(e)})") from None
        self.fs, self.root = fs, root.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.name!r})"

    @property
    def name(self) -> str:
        """The URI as shown in messages: secrets redacted, query parameters dropped."""
        return self.show()

    def __reduce__(self):  # filesystems reopen from the URI in another process
        return Storage, (self.uri,)

    # ------------------------------------------------------------------ naming

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (what ``self.fs`` takes)."""
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def uri_of(self, rel: str = "") -> str:
        """The URI of ``rel`` (query parameters kept)."""
        base = f"{self._base}/{rel}".rstrip("/") if rel else self._base
        return f"{base}?{self._query}" if self._query else base

    def show(self, rel: str = "") -> str:
        """``rel``'s URI for messages: secrets redacted, query parameters dropped."""
        return redact(self.uri_of(rel).partition("?")[0])

    def child(self, rel: str) -> Storage:
        """The folder ``rel`` as a Storage of its own (same filesystem object)."""
        if not self.remote:
            return Storage(self.path(rel))
        return Storage(self.uri_of(rel), self.fs, self.path(rel))

    # ------------------------------------------------------------------ reading

    def size(self, rel: str = "") -> int | None:
        """Bytes of the file ``rel``; None when it is missing or a folder."""
        info = self._info(rel)
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def _info(self, rel: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(rel))
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{self.show(rel)}: cannot read ({first_line(e)})") from None

    def files(self, rel: str = "", pattern: str = "*", recursive: bool = False
              ) -> dict[str, int]:
        """Relative path → size of the files under ``rel`` whose name matches ``pattern``."""
        base = self.path(rel)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True,
                                                            recursive=recursive))
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{self.show(rel)}: cannot list ({first_line(e)})") from None
        prefix = f"{rel}/" if rel else ""
        return {prefix + i.path[len(base) + 1:]: i.size for i in sorted(infos, key=_by_path)
                if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern)}

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise InputError(f"{self.show(rel)}: not found") from None
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{self.show(rel)}: cannot read ({first_line(e)})") from None

    def read_json(self, rel: str):
        try:
            return json.loads(self.read_bytes(rel))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{self.show(rel)}: not valid JSON ({first_line(e)})") from None

    # ------------------------------------------------------------------ writing

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` atomically; returns its URI."""
        return self._write(rel, lambda out: out.write(data))

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, data) -> str:
        return self.write_text(rel, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def put_file(self, local: str | os.PathLike, rel: str) -> str:
        """Copy the local file ``local`` to ``rel`` atomically; returns its URI."""
        with open(local, "rb") as src:
            return self._write(rel, lambda out: _copy(src, out))

    def get_file(self, rel: str, local: str | os.PathLike) -> Path:
        """Copy ``rel`` to the local file ``local`` (temporary name, then renamed)."""
        try:
            with atomic_path(local) as tmp, open(tmp, "wb") as out, \
                    self.fs.open_input_stream(self.path(rel)) as src:
                _copy(src, out)
        except FileNotFoundError:
            raise InputError(f"{self.show(rel)}: not found") from None
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{self.show(rel)}: cannot download to {local} "
                               f"({first_line(e)})") from None
        return Path(local)

    def put_tree(self, local: str | os.PathLike, rel: str = "", last: tuple[str, ...] = ()
                 ) -> list[str]:
        """Publish every file under the local folder ``local`` to ``rel``; the files named in
        ``last`` (completion markers) go after all others. Temporaries (``.*``) are skipped."""
        local = Path(local)
        names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()
                       and not any(s.startswith(".") for s in p.relative_to(local).parts))
        prefix = f"{rel}/" if rel else ""
        body = [n for n in names if Path(n).name not in last]
        markers = sorted((n for n in names if Path(n).name in last),
                         key=lambda n: last.index(Path(n).name))
        written = _each(lambda n: self.put_file(local / n, prefix + n), body)  # all done first
        return written + [self.put_file(local / n, prefix + n) for n in markers]

    def delete(self, rel: str) -> None:
        """Remove the file or folder ``rel`` (nothing if it is missing)."""
        info = self._info(rel)
        try:
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(rel))
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path(rel))
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{self.show(rel)}: cannot delete ({first_line(e)})") from None

    def check_writable(self, field: str) -> None:
        """Write, read back and delete a probe file; StorageError naming ``field`` if any of
        that fails. Leaves nothing behind (local folders it had to create are removed). Run it
        before any work, so a bad URI costs nothing."""
        probe, token = f".atoms-write-probe-{uuid.uuid4().hex[:12]}", uuid.uuid4().bytes
        created = [] if self.remote else _missing_parents(Path(self.root))
        try:
            self._write_raw(probe, lambda out: out.write(token))
            with self.fs.open_input_stream(self.path(probe)) as f:
                back = f.read()
            self.fs.delete_file(self.path(probe))
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{field}: {self.name} is not writable ({first_line(e)})"
                               ) from None
        finally:
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        if back != token:
            raise StorageError(f"{field}: {self.name} read back other bytes than it wrote")

    def _write(self, rel: str, fill) -> str:
        try:
            self._write_raw(rel, fill)
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{self.show(rel)}: cannot write ({first_line(e)})") from None
        return self.uri_of(rel)

    def _write_raw(self, rel: str, fill) -> None:
        path = self.path(rel)
        if not self.remote:
            _write_local(Path(path), fill)
            return
        self.fs.create_dir(path.rpartition("/")[0], recursive=True)
        with self.fs.open_output_stream(path) as out:
            fill(out)


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _by_path(info: pafs.FileInfo) -> str:
    return info.path


def _each(fn, items: list) -> list:
    """``[fn(i) for i in items]``, up to TRANSFERS at once (an object store serves several
    connections far faster than one); the first error is raised."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(TRANSFERS, len(items))) as pool:
        return list(pool.map(fn, items))


def _copy(src, out) -> None:
    while chunk := src.read(CHUNK):
        out.write(chunk)


def _write_local(path: Path, fill) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        fill(out)


# ---------------------------------------------------------------------- node-local mirror


def mirror_root() -> Path:
    """Where remote folders are mirrored on this node: ``$ATOMS_STORAGE_CACHE`` or
    ``<cache_root>/storage`` (``~/.cache/atoms/storage``)."""
    return Path(os.environ.get(CACHE_ENV) or cache_root() / "storage")


def mirror_path(uri: str | os.PathLike) -> Path:
    """The local folder standing for ``uri``: the path itself when local (``file://``
    dropped), else ``<cache>/<scheme>/<host>/<path>`` (query parameters dropped)."""
    if not is_remote(uri):
        return local_path(uri)
    parts = urlsplit(str(uri))
    host = parts.netloc.rpartition("@")[2] or "_"
    return mirror_root() / parts.scheme / host / parts.path.strip("/")


def pull(uri: str | os.PathLike, pattern: str = "*", recursive: bool = True) -> Path:
    """The local copy of the folder ``uri``: itself when local, else its node mirror brought up
    to date (missing files or files of another size are downloaded). Returns the folder."""
    store = Storage(uri)
    local = mirror_path(uri)
    if not store.remote:
        return local
    stale = [rel for rel, size in store.files("", pattern, recursive).items()
             if not ((local / rel).is_file() and (local / rel).stat().st_size == size)]
    _each(lambda rel: store.get_file(rel, local / rel), stale)
    return local


def pull_file(uri: str | os.PathLike) -> Path:
    """The local copy of the file ``uri`` (downloaded when missing or of another size)."""
    if not is_remote(uri):
        return local_path(uri)
    base, _, query = str(uri).partition("?")
    folder, _, name = base.rpartition("/")
    store = Storage(f"{folder}?{query}" if query else folder)
    target = mirror_path(folder) / name
    size = store.size(name)
    if size is None:
        raise InputError(f"{redact(uri)}: not found")
    if not (target.is_file() and target.stat().st_size == size):
        store.get_file(name, target)
    return target


def fetch(uri: str | os.PathLike) -> Path:
    """A local path for the stored file or folder ``uri``: itself when local, else its node
    mirror brought up to date (``pull_file`` for a file, ``pull`` for a folder)."""
    if not is_remote(uri):
        return local_path(uri)
    return pull_file(uri) if Storage(uri).size() is not None else pull(uri)


def locate(uri: str | os.PathLike) -> Path:
    """Where to read ``uri`` on this node: the path itself when local; for a URI its mirror,
    brought up to date when the store answers and left as it is when not (so a results
    folder copied off a cluster still finds whatever was mirrored)."""
    if not is_remote(uri):
        return local_path(uri)
    try:
        return fetch(uri)
    except (AtomsError, OSError):
        return mirror_path(uri)
