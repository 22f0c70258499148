"""A training run folder on a storage URI: the local working copy and what is published.

Training reads and writes local disk: ``RunFolder.local`` is ``out`` itself when it is a local
path, else its node mirror (``atoms.storage.mirror_path``). For a remote ``out`` every finished
piece is published as soon as it exists: a checkpoint folder with ``checkpoint.json`` last, the
final ``sae/`` before ``metrics.json`` (whose presence means finished). On any node, or with a
fresh mirror, ``pull_checkpoint`` brings back the newest complete stored checkpoint, so a run
resumes wherever it is started. For a local ``out`` publishing and pulling do nothing.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

from atoms.core.errors import InputError, TrainingDiverged
from atoms.core.io import CHECKSUMS, atomic_path
from atoms.store.storage import Storage, is_remote, mirror_path, pull
from atoms.train.checkpoint import (
    CHECKPOINT_JSON,
    find_checkpoints,
    prune_checkpoints,
    step_folder,
    write_checkpoint,
)

METRICS = "metrics.json"
"""Written last by a finished run: its presence means finished."""
DIVERGED = "diverged.json"
CHECKPOINTS = "checkpoints"
"""The plain executor's checkpoints, ``checkpoints/step_NNNNNNN``."""
RAY_FOLDER = "ray"
"""The Ray Train executor's checkpoints, ``ray/checkpoint_*`` (written by Ray)."""


class RunFolder:
    """The run folder ``out`` (a local path or a storage URI) and its local working copy."""

    def __init__(self, out):
        self.out = str(out)
        self.remote = is_remote(self.out)
        self.local = mirror_path(self.out)
        self.store = Storage(self.out) if self.remote else None

    def uri_of(self, rel: str) -> str:
        """Where ``rel`` is stored: its URI (remote) or local path."""
        return self.store.uri_of(rel) if self.remote else str(self.local / rel)

    def show(self, rel: str = "") -> str:
        """``uri_of(rel)`` with secrets redacted, for messages."""
        return self.store.show(rel) if self.remote else str(self.local / rel)

    def read_json(self, name: str) -> dict | None:
        """The stored JSON file ``name`` (None when it is missing)."""
        if not self.remote:
            path = self.local / name
            return json.loads(path.read_text()) if path.exists() else None
        return self.store.read_json(name) if self.store.size(name) is not None else None

    def write_json(self, name: str, data, indent: int | None = 1) -> Path:
        """Write ``name`` atomically in the local folder, then publish it; the local path."""
        path = self.local / name
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=indent))
        if self.remote:
            self.store.put_file(path, name)
        return path

    def delete(self, name: str) -> None:
        """Remove the file or folder ``name`` locally and from the store."""
        path = self.local / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        if self.remote:
            self.store.delete(name)

    def publish_folder(self, folder: Path, last: tuple[str, ...] = ()) -> None:
        """Replace the stored copy of the local ``folder`` (inside ``local``) by its files, those
        named in ``last`` after all others."""
        if not self.remote:
            return
        rel = folder.relative_to(self.local).as_posix()
        self.store.delete(rel)
        self.store.put_tree(folder, rel, last=last)

    def publish_checkpoint(self, folder: Path) -> None:
        """Publish a local checkpoint folder, its ``checkpoint.json`` (completion marker) last."""
        self.publish_folder(folder, last=(CHECKSUMS, CHECKPOINT_JSON))

    def stored_checkpoints(self, rel: str, pattern: str) -> list[str]:
        """Complete stored checkpoint folders ``rel/<pattern>`` (``checkpoint.json`` present),
        oldest step first, as paths relative to ``out``."""
        found = []
        for marker in self.store.files(rel, CHECKPOINT_JSON, recursive=True):
            folder = marker.rpartition("/")[0]
            parent, _, name = folder.rpartition("/")
            if parent != rel or not fnmatch.fnmatch(name, pattern):
                continue
            try:
                found.append((int(self.store.read_json(marker)["step"]), folder))
            except (InputError, KeyError, TypeError, ValueError):
                continue  # unreadable: not a checkpoint to resume from
        return [folder for _, folder in sorted(found)]

    def pull_checkpoint(self, rel: str, pattern: str) -> Path | None:
        """Bring the local checkpoints under ``rel`` in line with the store: local folders the
        store lacks complete are dropped (unpublished or stale), the newest stored one is
        downloaded (again, if its checksums differ). Returns it; None when there is none."""
        if not self.remote:
            return None
        stored = self.stored_checkpoints(rel, pattern)
        root = self.local / rel
        for folder in root.glob(pattern) if root.is_dir() else []:
            if folder.is_dir() and f"{rel}/{folder.name}" not in stored:
                shutil.rmtree(folder)
        if not stored:
            return None
        newest = stored[-1]
        local = self.local / newest
        sums = local / CHECKSUMS
        if local.exists() and not (sums.exists()
                                   and sums.read_bytes() == self.store.read_bytes(
                                       f"{newest}/{CHECKSUMS}")):
            shutil.rmtree(local)
        return pull(self.store.uri_of(newest))

    def prune_stored(self, rel: str, pattern: str, keep: list[Path]) -> None:
        """Delete the stored folders ``rel/<pattern>`` other than the local folders ``keep``
        (what local pruning kept; stale partial uploads go too)."""
        if not self.remote:
            return
        kept = {p.name for p in keep}
        names = {k[len(rel) + 1:].partition("/")[0]
                 for k in self.store.files(rel, recursive=True)}
        for name in sorted(names):
            if fnmatch.fnmatch(name, pattern) and name not in kept:
                self.store.delete(f"{rel}/{name}")

    def save_checkpoint(self, sae, payload: dict, metadata: dict, keep: int) -> Path:
        """Write the plain executor's checkpoint of ``payload['state']['step']``, publish it,
        and keep only the newest ``keep`` here and in the store."""
        root = self.local / CHECKPOINTS
        written = write_checkpoint(sae, payload, step_folder(root, payload["state"]["step"]),
                                   metadata)
        self.publish_checkpoint(written)
        prune_checkpoints(root, keep)
        self.prune_stored(CHECKPOINTS, "step_*", find_checkpoints(root))
        return written

    def newest_checkpoint(self, pull: bool = True) -> Path | None:
        """The newest complete plain-executor checkpoint here (first brought in line with the
        store when remote, unless ``pull`` is False)."""
        if pull:
            self.pull_checkpoint(CHECKPOINTS, "step_*")
        found = find_checkpoints(self.local / CHECKPOINTS)
        return found[-1] if found else None

    def finished_metrics(self) -> dict | None:
        """The metrics of a finished run (None when it has not finished)."""
        return self.read_json(METRICS)

    def write_diverged(self, error: TrainingDiverged, last_checkpoint: str | None) -> str:
        """Record a divergence; returns the message naming the last good checkpoint."""
        msg = f"{error} — last good checkpoint: {last_checkpoint or 'none'}"
        self.write_json(DIVERGED, {"status": "diverged", "step": error.step, "message": msg,
                                   "last_checkpoint": last_checkpoint}, indent=None)
        return msg

    def fs_path_to_show(self, path: str) -> str:
        """A path on the store's filesystem (as Ray reports it), shown as a redacted URI."""
        if self.remote and path.startswith(self.store.root + "/"):
            return self.store.show(path[len(self.store.root) + 1:])
        return path
