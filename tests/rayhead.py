"""A private Ray head (cluster/local-head.sh) for tests that exercise `ray job submit`.

The head gets free ports and a short temp dir of its own, so it coexists with other Ray
instances on the machine, including an embedded ``ray.init(address="local")`` in the pytest
process: it never joins them, they never join it (its ``ray_current_cluster`` file lives in its
own temp dir), and it is stopped with ``cluster/local-head.sh stop``, never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "local-head.sh"
READY_TIMEOUT_S = 90.0
# Client-side variables that could point a client at another cluster.
_FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


@dataclass(frozen=True)
class HeadInfo:
    address: str  # jobs API / dashboard: http://127.0.0.1:<dashboard port>
    gcs_address: str  # 127.0.0.1:<GCS port>
    temp_dir: Path  # Ray --temp-dir of this head (identifies it for `stop`)
    env: dict[str, str]  # environment for clients (ray job submit, ray.init against this head)
    script_env: dict[str, str]  # environment for cluster/local-head.sh start|stop|status
    start_output: str


def ray_executable() -> str:
    """The `ray` CLI of the running interpreter's environment (the venv), else the one on PATH."""
    candidate = Path(sys.executable).parent / "ray"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if found is None:
        raise RuntimeError("no `ray` executable next to sys.executable or on PATH")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_script(command: str, script_env: dict[str, str],
               timeout: float = 60) -> subprocess.CompletedProcess:
    """cluster/local-head.sh COMMAND with stdout and stderr merged into .stdout."""
    return subprocess.run(["bash", str(SCRIPT), command], env=script_env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)


def _auth_headers(env: dict[str, str]) -> dict[str, str]:
    if env.get("RAY_AUTH_MODE") != "token":
        return {}
    token = env.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def _get(url: str, env: dict[str, str], timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=_auth_headers(env))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def api_get(head: HeadInfo, path: str, timeout: float = 10) -> Any:
    """GET a dashboard API path (e.g. "/api/jobs/") of the head and decode its JSON."""
    status, body = _get(head.address + path, head.env, timeout)
    if status != 200:
        raise RuntimeError(f"GET {path} -> HTTP {status}: {body[:500]!r}")
    return json.loads(body)


def _new_temp_dir() -> Path:
    for _ in range(20):
        path = Path(f"/tmp/atoms-h-{secrets.token_hex(3)}")  # short: Ray's socket path limits
        try:
            path.mkdir(mode=0o755)
            return path
        except FileExistsError:
            continue
    raise RuntimeError("could not create a fresh /tmp/atoms-h-* directory")


def _environments(temp_dir: Path, ports: list[int], cpus: int,
                  auth_mode: str) -> tuple[dict[str, str], dict[str, str]]:
    gcs, dash, agent, client = ports
    ray = ray_executable()
    base = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    base["PATH"] = f"{Path(ray).parent}{os.pathsep}{base.get('PATH', '')}"
    base["RAY_AUTH_MODE"] = auth_mode
    base["RAY_USAGE_STATS_ENABLED"] = "0"
    script_env = dict(base, RAY=ray, ATOMS_HEAD_DIR=str(temp_dir), ATOMS_HEAD_PORT=str(gcs),
                      ATOMS_DASHBOARD_PORT=str(dash), ATOMS_AGENT_PORT=str(agent),
                      ATOMS_CLIENT_PORT=str(client), ATOMS_HEAD_CPUS=str(cpus),
                      ATOMS_HEAD_WAIT=str(int(READY_TIMEOUT_S)))
    client_env = dict(base, RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash}")
    return script_env, client_env


def _start(temp_dir: Path, cpus: int, auth_mode: str) -> HeadInfo:
    """Start the head; retry with other ports if a port was taken between picking and binding."""
    out = ""
    for _attempt in range(3):
        ports = free_ports(4)
        script_env, client_env = _environments(temp_dir, ports, cpus, auth_mode)
        proc = run_script("start", script_env, timeout=READY_TIMEOUT_S + 60)
        out = proc.stdout
        if proc.returncode != 0:
            run_script("stop", script_env)  # a half-started head, if any
            if "in use" in out or "bind" in out:
                continue
            raise RuntimeError(f"local-head.sh start failed (rc {proc.returncode}):\n{out}")
        head = HeadInfo(address=f"http://127.0.0.1:{ports[1]}", gcs_address=f"127.0.0.1:{ports[0]}",
                        temp_dir=temp_dir, env=client_env, script_env=script_env, start_output=out)
        deadline = time.monotonic() + READY_TIMEOUT_S
        status = 0
        while time.monotonic() < deadline:
            status, _ = _get(head.address + "/api/version", client_env, timeout=5)
            if status == 200:
                return head
            time.sleep(0.5)
        run_script("stop", script_env)
        raise RuntimeError(f"dashboard {head.address}/api/version answered {status}, not 200, "
                           f"within {READY_TIMEOUT_S:.0f} s; local-head.sh start said:\n{out}")
    raise RuntimeError(f"local-head.sh start kept hitting port conflicts:\n{out}")


@contextlib.contextmanager
def local_head(tmp_root: Path, cpus: int = 2, auth_mode: str | None = None) -> Iterator[HeadInfo]:
    """A private Ray head for the duration of the block; always stopped and removed afterwards.

    tmp_root receives local-head-start.log / local-head-stop.log and, if the block raised, a
    copy of the head's Ray logs (ray-logs/). auth_mode defaults to $RAY_AUTH_MODE or "disabled".
    """
    tmp_root = Path(tmp_root)
    tmp_root.mkdir(parents=True, exist_ok=True)
    auth_mode = auth_mode or os.environ.get("RAY_AUTH_MODE") or "disabled"
    temp_dir = _new_temp_dir()
    script_env = _environments(temp_dir, [0, 0, 0, 0], cpus, auth_mode)[0]
    failed = False
    try:
        head = _start(temp_dir, cpus, auth_mode)
        script_env = head.script_env
        (tmp_root / "local-head-start.log").write_text(head.start_output)
        yield head
    except BaseException:
        failed = True
        logs = temp_dir / "session_latest" / "logs"
        if logs.is_dir():
            shutil.copytree(logs, tmp_root / "ray-logs", dirs_exist_ok=True,
                            ignore_dangling_symlinks=True)
        raise
    finally:
        stop = run_script("stop", script_env, timeout=60)
        (tmp_root / "local-head-stop.log").write_text(stop.stdout)
        if stop.returncode == 0:
            shutil.rmtree(temp_dir, ignore_errors=True)
        elif not failed:  # keep temp_dir: `stop` needs its head.sid to find the processes
            raise RuntimeError(f"local-head.sh stop failed (rc {stop.returncode}):\n{stop.stdout}")


def submit_job(head: HeadInfo, entrypoint: list[str], working_dir: Path,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit` to the head and wait for the job; stdout and stderr merged into .stdout.

    `python` in the entrypoint is the venv's (the head has the venv's bin first on PATH).
    """
    cmd = [ray_executable(), "job", "submit", "--address", head.address,
           "--working-dir", str(working_dir), "--", *entrypoint]
    return subprocess.run(cmd, env=head.env, cwd=working_dir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)


def processes_of(temp_dir) -> list[str]:
    """Processes whose command line or cwd mentions temp_dir."""
    needle = str(temp_dir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if needle in cmd or needle in (p.info["cwd"] or ""):
            found.append(f"{p.info['pid']}: {cmd[:200]}")
    return found


def job_status(head, submission_id: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    status = "MISSING"
    while time.monotonic() < deadline:
        jobs = {j.get("submission_id"): j for j in api_get(head, "/api/jobs/")}
        status = jobs.get(submission_id, {}).get("status", "MISSING")
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    return status
