"""A local Ray head started the way an operator starts one (`ray start --head`), with its dashboard
and job server, on free ports so it never clashes with another Ray on the machine.

`ray.init()` alone gives no job agent to submit to ("No available agent to submit job"), so the
retraining loop, its tests and benchmarks run on a head like this one. `ray start --block` runs in
its own process group: `stop()` ends this cluster and nothing else (never `ray stop`, which stops
every Ray instance of the user).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def group_alive(pgid: int | None) -> bool:
    """Whether any process of the process group is still running."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalHead:
    num_cpus: int = 2
    log_path: Path | None = None  # default: a new temporary folder, made by start()
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    pgid: int | None = None  # the head's process group: set by start(), or recorded by `raywatch up`

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 180, env: dict[str, str] | None = None) -> LocalHead:
        """Start the head and wait until it is up. Token authentication stays on (RAY_AUTH_MODE=token):
        set that variable in this process before it imports ray, so it can connect."""
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="raywatch-head-")) / "ray-start.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            f"--dashboard-port={self.dashboard_port}",
            # the agents' fixed default ports would clash with any other Ray on this machine
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ]
        self.process = subprocess.Popen(
            command,
            stdout=open(self.log_path, "w"),  # noqa: SIM115 (the child owns it)
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "token", "FORWARDED_ALLOW_IPS": _forwarded_allow_ips(), **(env or {})},
        )
        self.pgid = self.process.pid
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log_path.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop(kill=True)
                raise RuntimeError(f"`ray start --head` did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        return self

    def _reap(self) -> None:
        if self.process is not None:
            self.process.poll()  # a finished child of ours stays a zombie (and "alive") until reaped

    def stop(self, kill: bool = False, timeout_s: float = 90) -> None:
        """Stop the head's whole process group (SIGTERM, SIGKILL after `timeout_s`), here or from
        another process that knows the group (`raywatch down`)."""
        self._reap()
        if group_alive(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                self._reap()
                if not group_alive(self.pgid):
                    break
                time.sleep(0.5)
            else:
                os.killpg(self.pgid, signal.SIGKILL)
        self._reap()
        self._forget_address()

    def _forget_address(self) -> None:
        """`ray start` records its address for `ray.init()` (as `ray stop` would, drop it once gone),
        so that a later `ray.init()` or `serve run` starts a fresh Ray instead of waiting on this one."""
        from ray._private.utils import get_ray_address_file

        path = Path(get_ray_address_file(None))
        if path.exists() and path.read_text().strip().endswith(f":{self.port}"):
            path.unlink(missing_ok=True)


def _forwarded_allow_ips() -> str:
    """Whose X-Forwarded-For the Serve HTTP servers (uvicorn) believe. uvicorn's default trusts any
    client on loopback, which lets a local client pick its own rate-limit identity; raywatch trusts only
    the proxies named in RAYWATCH_TRUSTED_PROXIES (none by default), or an explicit FORWARDED_ALLOW_IPS."""
    return os.environ.get("RAYWATCH_TRUSTED_PROXIES", os.environ.get("FORWARDED_ALLOW_IPS", ""))
