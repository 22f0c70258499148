"""The pinned SAELens in a throw-away venv, so the project's own dependencies stay clean."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

SAELENS = "sae-lens==6.54.12"
TORCH = "torch==2.13.0"
ROOT = Path(__file__).resolve().parents[1]


def cache_folder() -> Path:
    """Where the venv and other benchmark caches live (``ATOMS_CACHE`` or ~/.cache/atoms)."""
    return Path(os.environ.get("ATOMS_CACHE", Path.home() / ".cache" / "atoms"))


def venv_python(fresh: bool) -> Path:
    """The throw-away venv's interpreter, created and filled on first use."""
    folder = cache_folder() / "bench-venvs" / SAELENS.replace("==", "-")
    python, stamp = folder / "bin" / "python", folder / ".installed"
    if fresh or not stamp.exists():
        print(f"installing {SAELENS} and {TORCH} into {folder} …", flush=True)
        venv.EnvBuilder(clear=True, with_pip=True).create(folder)
        subprocess.run([python, "-m", "pip", "install", "--quiet", SAELENS, TORCH, "pyyaml"],
                       check=True)
        stamp.touch()
    return python


def run_worker(module: str, args: list[str], fresh: bool) -> str:
    """Run ``python -m module --worker *args`` in the venv with this checkout on the path;
    returns its stdout (its stderr streams through)."""
    cmd = [venv_python(fresh), "-m", module, "--worker", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout
