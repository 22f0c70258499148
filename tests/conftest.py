import os

# Small eigendecompositions are far slower with OpenBLAS threading on 2-core machines.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (no dashboard; 2 logical CPUs)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=512 * 1024**2, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 (free ports) for the whole session."""
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def storage_cache(tmp_path, monkeypatch):
    """A fresh node-local mirror folder for remote storage."""
    cache = tmp_path / "storage-cache"
    monkeypatch.setenv("ATOMS_STORAGE_CACHE", str(cache))
    return cache
