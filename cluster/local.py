"""A local Ray head started the way an operator starts one (`ray start --head`), with its dashboard
and job server. `raywatch up` takes Ray's default ports when they are free (`serve status` looks for the
dashboard on 8265); tests take free ports so they never clash with another Ray on the machine. Each
head keeps a private Ray temp dir, so Ray's clients find it through `.raywatch/env` (RAY_ADDRESS).

`ray.init()` alone gives no job agent to submit to ("No available agent to submit job"), so the
retraining loop, its tests and benchmarks run on a head like this one. `ray start --block` runs in
its own process group: `stop()` ends this cluster and nothing else (never `ray stop`, which stops
every Ray instance of the user).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from cluster.auth_token import TOKEN_PATH_ENV, ensure_token

# Ray's own defaults: the GCS (`ray start --head --port`) and the dashboard / job server
RAY_GCS_PORT = 6379
RAY_DASHBOARD_PORT = 8265
#: the head's agents whose fixed default ports would clash with any other Ray on this machine (`ray start --X-port`)
AGENT_PORTS = ("dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export")


def group_alive(pgid: int | None) -> bool:
    """Whether any process of the process group is still running."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def session_pids(sid: int | None) -> list[int]:
    """Every process of session `sid` but this one. `ray start --head` runs as a session leader (the head's
    process group id is its session id), and whatever it spawns stays in the session: Ray's workers too,
    which move to process groups of their own, and what they spawn, such as Serve's HAProxy."""
    if not sid:
        return []
    if os.path.isdir("/proc"):
        candidates = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    else:  # macOS: no /proc
        listing = subprocess.run(["ps", "-A", "-o", "pid="], capture_output=True, text=True, check=False).stdout
        candidates = [int(pid) for pid in listing.split()]
    pids = []
    for pid in candidates:
        try:
            if pid != os.getpid() and os.getsid(pid) == sid and not _zombie(pid):
                pids.append(pid)
        except OSError:  # gone meanwhile, or not ours to ask about
            continue
    return pids


def _zombie(pid: int) -> bool:
    """A process that has exited and waits for its parent to reap it (Linux; elsewhere: never said)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].startswith("Z")


# Ray 2.60's `ray start --block` answers SIGTERM by draining its node for up to this many seconds (default 30)
# so that a multi-node cluster's Serve proxies stop routing to it first. A local head that `raywatch down` stops
# has nothing left to drain (Serve is shut down before it), and its raylet sat out the whole 30 s: 0 turns it off.
DRAIN_ON_STOP_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"


def stop_session(sid: int | None, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process left in session `sid`, SIGKILL what is still there after `grace_s`. Returns the
    processes signalled. What `killpg` of the head's group misses: a Ray worker in a group of its own, and
    the children it leaves behind (Serve's HAProxy, which would keep its fixed ports from the next head)."""
    signalled = session_pids(sid)
    for pid in signalled:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not session_pids(sid), grace_s, poll_s=0.2)
    for pid in session_pids(sid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return signalled


def wait_until(done: Callable[[], bool], timeout_s: float, poll_s: float) -> bool:
    """Poll `done` every `poll_s` until it holds or `timeout_s` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def free_ports(count: int, avoid: Collection[int] = ()) -> list[int]:
    """`count` distinct ports free now, none of them in `avoid`. Every socket stays bound until all are
    chosen: asked one at a time, the system may hand out the same port twice (it once gave a head's GCS
    and its dashboard both 51189, and `ray start` refused)."""
    ports: list[int] = []
    with contextlib.ExitStack() as held:
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in avoid and port not in ports:
                ports.append(port)
    return ports


def port_is_free(port: int) -> bool:
    """Whether nothing listens on `port` (any interface: Ray's GCS binds them all). Connections of a
    stopped server that linger in TIME_WAIT do not count (servers, Ray's too, bind with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def preferred_port(port: int, avoid: Collection[int] = ()) -> tuple[int, bool]:
    """`port` when it is free, else a free one not in `avoid`; and whether it had to fall back."""
    return (port, False) if port_is_free(port) else (free_ports(1, avoid)[0], True)


def venv_bin() -> str:
    """The folder of the interpreter running raywatch (the project's .venv/bin): first on a head's PATH, so
    a job's `python` is raywatch's interpreter with raywatch's packages."""
    return os.path.dirname(os.path.abspath(sys.executable))


@dataclass
class LocalHead:
    num_cpus: int = 2
    log_path: Path | None = None  # default: a new temporary folder, made by start()
    port: int | None = None  # default: a free port (set in __post_init__, never the dashboard's)
    dashboard_port: int | None = None  # default: a free port other than `port`
    process: subprocess.Popen | None = None
    pgid: int | None = None  # the head's process group: set by start(), or recorded by `raywatch up`
    client_env: Path | None = None  # where start() writes the shell exports for Ray's CLIs (.raywatch/env)
    # Ray's default temp dir (/tmp/ray) holds one address file for the whole machine, and a job's driver
    # connects to whichever cluster last wrote it (another user's `ray.init()`, a test cluster): every head
    # raywatch starts takes a private one (set by start()), so its jobs always reach their own cluster.
    # Clients find the head through RAY_ADDRESS instead (.raywatch/env).
    temp_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.port is None:
            self.port = free_ports(1, avoid=[self.dashboard_port])[0]
        if self.dashboard_port is None:
            self.dashboard_port = free_ports(1, avoid=[self.port])[0]
        if self.port == self.dashboard_port:
            raise ValueError(f"the Ray head and its dashboard need two ports, got {self.port} for both")

    @classmethod
    def on_preferred_ports(
        cls, port: int = RAY_GCS_PORT, dashboard_port: int = RAY_DASHBOARD_PORT, **kwargs
    ) -> tuple[LocalHead, list[str]]:
        """A head on the given ports (Ray's defaults unless told) where they are free; says which ports it
        had to choose instead."""
        gcs, moved_gcs = preferred_port(port, avoid=[dashboard_port])
        dashboard, moved_dashboard = preferred_port(dashboard_port, avoid=[gcs])
        notes = [f"port {port} is taken: the Ray head (GCS) listens on {gcs}"] if moved_gcs else []
        if moved_dashboard:
            notes.append(f"port {dashboard_port} is taken: the Ray dashboard listens on {dashboard}")
        return cls(port=gcs, dashboard_port=dashboard, **kwargs), notes

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(
        self, timeout_s: float = 180, env: dict[str, str] | None = None, progress: Callable[[str], None] | None = None
    ) -> LocalHead:
        """Start the head and wait until it is up. Token authentication stays on (RAY_AUTH_MODE=token):
        set that variable in this process before it imports ray, so it can connect. A missing cluster
        token is created first (cluster.auth_token); where it is gets reported, never the token."""
        where, created = ensure_token()
        if progress is not None:
            progress(f"cluster token: {'created in ' if created else 'using '}{where}")
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="raywatch-head-")) / "ray-start.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.temp_dir is None:
            self.temp_dir = Path(tempfile.mkdtemp(prefix="rw-ray-", dir="/tmp"))  # short: Ray's socket paths
        agent_ports = free_ports(len(AGENT_PORTS), avoid=[self.port, self.dashboard_port])
        command = [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            f"--dashboard-port={self.dashboard_port}",
            *(f"--{agent}-port={port}" for agent, port in zip(AGENT_PORTS, agent_ports)),
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        ]
        self.process = subprocess.Popen(
            command,
            stdout=open(self.log_path, "w"),  # noqa: SIM115 (the child owns it)
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self._head_env(env),
        )
        self.pgid = self.process.pid
        wait_until(lambda: self._started() or self.process.poll() is not None, timeout_s, poll_s=0.5)
        if not self._started():
            self.stop(kill=True)
            raise RuntimeError(f"`ray start --head` did not start: {self.log_path.read_text()[-2000:]}")
        if self.client_env is not None:
            self.write_client_env()
        return self

    def _head_env(self, extra: dict[str, str] | None) -> dict[str, str]:
        """The head's environment, inherited by every worker and job: token mode on, raywatch's
        interpreter first on PATH (a job's plain `python` is raywatch's), no stale RAY_ADDRESS, and no
        drain on SIGTERM unless the caller's environment asks for one (DRAIN_ON_STOP_ENV)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            RAY_AUTH_MODE="token",
            FORWARDED_ALLOW_IPS=_forwarded_allow_ips(),
            PATH=os.pathsep.join([venv_bin(), env.get("PATH", os.defpath)]),
        )
        env.setdefault(DRAIN_ON_STOP_ENV, "0")
        return {**env, **(extra or {})}

    def write_client_env(self) -> Path:
        """`source .raywatch/env`: what every Ray client (ray, serve, ray job submit, a driver) needs to
        reach this head: raywatch's .venv/bin first on PATH, the addresses, token mode. Never the token."""
        lines = [
            f"# written by raywatch for the Ray head it started at {self.address}; load it with: source {self.client_env}",
            "# the cluster token is not in here: Ray reads it from where raywatch reported it (~/.ray/auth_token by default)",
            f'export PATH={shlex.quote(venv_bin())}:"$PATH"',
            f"export RAY_ADDRESS={self.address}",
            f"export RAY_DASHBOARD_ADDRESS={self.dashboard_url}",
            "export RAY_AUTH_MODE=token",
            f"export RAYWATCH_HEAD={self.address}  # marks RAY_ADDRESS as raywatch's own head, not a cluster to join",
        ]
        if os.environ.get(TOKEN_PATH_ENV):
            lines.append(f"export {TOKEN_PATH_ENV}={shlex.quote(os.environ[TOKEN_PATH_ENV])}")
        self.client_env.parent.mkdir(parents=True, exist_ok=True)
        self.client_env.write_text("\n".join(lines) + "\n")
        return self.client_env

    def _reap(self) -> None:
        if self.process is not None:
            self.process.poll()  # a finished child of ours stays a zombie (and "alive") until reaped

    def stop(self, kill: bool = False, timeout_s: float = 90) -> None:
        """Stop the head's whole process group (SIGTERM, SIGKILL after `timeout_s`), here or from
        another process that knows the group (`raywatch down`)."""
        self._reap()
        if group_alive(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL if kill else signal.SIGTERM)
            if not wait_until(self._group_gone, timeout_s, poll_s=0.5):
                os.killpg(self.pgid, signal.SIGKILL)
        self._reap()
        stop_session(self.pgid)  # the head's group is its session's id: what left the group goes too
        self._forget_address()
        if self.client_env is not None:
            self.client_env.unlink(missing_ok=True)
        self._remove_temp_dir()

    def _started(self) -> bool:
        return "Ray runtime started" in self.log_path.read_text()

    def _group_gone(self) -> bool:
        self._reap()
        return not group_alive(self.pgid)

    def _remove_temp_dir(self) -> None:
        """The head's private temp dir (sockets, session logs) goes with it, so that stopped heads do not
        pile up in /tmp; only a folder raywatch made (`rw-ray-*`), and only once its processes are gone."""
        if self.temp_dir is None or not self.temp_dir.name.startswith("rw-ray-") or group_alive(self.pgid):
            return
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _forget_address(self) -> None:
        """`ray start` records its address for `ray.init()` (as `ray stop` would, drop it once gone),
        so that a later `ray.init()` or `serve run` starts a fresh Ray instead of waiting on this one."""
        from ray._private.utils import get_ray_address_file

        path = Path(get_ray_address_file(str(self.temp_dir) if self.temp_dir else None))
        if path.exists() and path.read_text().strip().endswith(f":{self.port}"):
            path.unlink(missing_ok=True)


def _forwarded_allow_ips() -> str:
    """Whose X-Forwarded-For the Serve HTTP servers (uvicorn) believe. uvicorn's default trusts any
    client on loopback, which lets a local client pick its own rate-limit identity; raywatch trusts only
    the proxies named in RAYWATCH_TRUSTED_PROXIES (none by default), or an explicit FORWARDED_ALLOW_IPS."""
    return os.environ.get("RAYWATCH_TRUSTED_PROXIES", os.environ.get("FORWARDED_ALLOW_IPS", ""))
