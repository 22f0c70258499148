"""The Ray environment: start or join Ray, and the runtime env every Ray worker gets.

Embedded, ``ensure_ray()`` starts a local Ray; inside ``ray job submit`` (RAY_ADDRESS set) it
joins the cluster with a bare ``ray.init()``. Workers mirror storage URIs on their own node;
``worker_env`` passes the driver's ATOMS_STORAGE_CACHE on to them.
"""

from __future__ import annotations

import os

from atoms.store.storage import CACHE_ENV


def ensure_ray(progress: bool = True) -> None:
    """Join the running Ray (a job, or one this process started) or start a local one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(log_to_driver=progress)
    ray.data.DataContext.get_current().enable_progress_bars = progress


def cluster_cpus() -> float:
    """The CPUs of the Ray this process is connected to."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def stop_ray() -> None:
    """Disconnect from Ray (a local Ray this process started stops with it)."""
    import ray

    ray.shutdown()


def worker_env() -> dict:
    """Ray ``runtime_env`` giving workers this process's ATOMS_STORAGE_CACHE (else none)."""
    cache = os.environ.get(CACHE_ENV)
    return {"env_vars": {CACHE_ENV: cache}} if cache else {}
