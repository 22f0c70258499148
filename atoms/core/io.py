"""Atomic writes (a file, a folder replaced whole, a shared cache folder built once), the
project's cache folder, and the code version recorded with every artefact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import atoms

CHECKSUMS = "checksums.json"
"""sha256 of every file of a folder written by ``atomic_folder``."""


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    An interrupted writer leaves no file under the final name. The file gets the ordinary
    permissions (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(folder: str | Path):
    """Yield a temp sibling folder; on success write checksums.json and rename it onto ``folder``.

    An existing ``folder`` is moved aside only once the new one is complete, then deleted, so
    the final name never holds a half-written folder.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        sums = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1) + "\n")
        for p in tmp.iterdir():
            _fsync(p)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=tmp.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        _fsync(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def build_once(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling to build ``folder`` in; on success rename it into place
    unless a concurrent builder got there first (its folder is kept). The folder is made
    readable by everyone (the cache is meant to be shared)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        with contextlib.suppress(OSError):  # a concurrent builder may have won the race
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    """The project's cache (converted models, storage mirrors): ``$ATOMS_CACHE`` or
    ``~/.cache/atoms``."""
    root = os.environ.get("ATOMS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "atoms"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def code_version() -> str:
    """``atoms`` version plus the git commit (and '-dirty') when run from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{atoms.__version__}+{sha}" if sha else atoms.__version__


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
