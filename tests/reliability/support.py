"""Helpers of the reliability suite: the served app under test, a load generator, replica lookups."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import serving_fixtures

SOAK = os.environ.get("RAYWATCH_SOAK", "") not in ("", "0")
PORT = 8170
APP = "raywatch"
INGRESS = "RaywatchAPI"
DETECTOR_DEPLOYMENTS = ("EnsembleDetector", "LSTMDetector", "AutoencoderDetector")
DEPLOYMENTS = (INGRESS, *DETECTOR_DEPLOYMENTS)
REPLICAS = 2  # every deployment: the kill tests take one replica of each away
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "reliability"
DETECTOR_VERSION = "reliability-suite"


def build(args: dict[str, Any]) -> Any:
    """`serve.app.build_app(args)` with the detector deployments at REPLICAS replicas each and a fixed code
    version, so that redeploying with other ingress arguments (the rate limit) restarts only the ingress."""
    from serve.app import build_app
    from serve.settings import ServeSettings

    replicas = {"min_replicas": REPLICAS, "max_replicas": REPLICAS}
    app = build_app({**args, **replicas})
    scaling = ServeSettings(**replicas).autoscaling()
    ingress = app._bound_deployment
    detectors = ingress.init_args[0]  # kind name -> the detector application bound into the ingress
    for child in detectors.values():
        child._bound_deployment = child._bound_deployment.options(
            autoscaling_config=scaling, version=DETECTOR_VERSION, _internal=True
        )
    return app


def new_key() -> str:
    """A fresh admin key: distinctive, so a search of the logs for it cannot hit anything else."""
    return f"rw-admin-{secrets.token_hex(16)}"


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc; the replicas run on this machine)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.25):
    return serving_fixtures.wait_for(predicate, timeout, what, poll)


@dataclass
class Served:
    """The raywatch app under test: where it listens, what it was built with, and how to reach its parts."""

    base_url: str
    client: httpx.Client
    series: Any  # detect.data.Series of the served entity
    workdir: Path
    keys_file: Path
    state_dir: Path
    tracking_uri: str
    args: dict[str, Any]
    gcs_address: str
    dashboard_url: str
    token_probe: Any = None  # a driver started with a wrong Ray token (subprocess.Popen), see test_security
    keys: list[str] = field(default_factory=list)
    secrets_sent: set[str] = field(default_factory=set)  # every admin key sent, right or wrong: never logged
    _counter: itertools.count = field(default_factory=lambda: itertools.count(1_000_000))

    # -- requests ---------------------------------------------------------------------------------------
    @property
    def entity(self) -> str:
        return self.series.name

    def row(self, i: int | None = None) -> dict[str, Any]:
        n = next(self._counter) if i is None else i
        values = self.series.test[self.series.metrics].to_numpy()
        return {
            "entity": self.entity,
            "timestamp": float(n),
            "metrics": dict(zip(self.series.metrics, values[n % len(values)].tolist())),
        }

    def score_body(self) -> dict[str, Any]:
        return {"rows": [self.row()]}

    def admin(self, key: str | None = None) -> dict[str, str]:
        key = key or self.keys[0]
        self.secrets_sent.add(key)
        return {"Authorization": f"Bearer {key}"}

    def set_keys(self, keys: list[str]) -> None:
        """Rotate: the app re-reads the keys file on every admin call."""
        self.keys_file.write_text("".join(f"{k}\n" for k in keys))
        self.keys = list(keys)
        self.secrets_sent.update(keys)

    # -- Serve state ------------------------------------------------------------------------------------
    def deployments(self) -> dict[str, tuple[str, dict[str, int]]]:
        from ray import serve

        app = serve.status().applications.get(APP)
        if app is None:
            return {}
        return {
            name: (str(d.status.value if hasattr(d.status, "value") else d.status), dict(d.replica_states))
            for name, d in app.deployments.items()
        }

    def replicas(self, deployment: str) -> list[Any]:
        """Alive replica actors of a deployment (Ray state API), with pid and name."""
        from ray.util.state import list_actors

        return list_actors(
            address=self.gcs_address,
            filters=[("class_name", "=", f"ServeReplica:{APP}:{deployment}"), ("state", "=", "ALIVE")],
            detail=True,
        )

    def replaced(self, deployment: str, victim: Any) -> bool:
        """The killed replica is gone and a full set of replicas is alive and running in its place."""
        alive = self.replicas(deployment)
        gone = victim.actor_id not in {a.actor_id for a in alive}
        return gone and len(alive) >= REPLICAS and self.running(deployment) >= REPLICAS

    def kill_every_replica(self, deployment: str, timeout: float) -> tuple[list[int], float]:
        """SIGKILL every replica of `deployment`, then wait until a full set of new ones runs.
        Returns (the killed pids, seconds from the kill until the new set ran)."""
        pids = [a.pid for a in self.replicas(deployment)]
        killed_at = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: (alive := {a.pid for a in self.replicas(deployment)}).isdisjoint(pids)
            and len(alive) >= REPLICAS
            and self.running(deployment) >= REPLICAS,
            timeout,
            f"every {deployment} replica restarted",
        )
        return pids, time.monotonic() - killed_at

    def running(self, deployment: str) -> int:
        return self.deployments().get(deployment, ("", {}))[1].get("RUNNING", 0)

    def healthy(self) -> bool:
        found = self.deployments()
        return all(
            name in found and found[name][0] == "HEALTHY" and found[name][1].get("RUNNING", 0) >= REPLICAS
            for name in DEPLOYMENTS
        )

    def wait_ready(self, timeout: float = 240) -> None:
        wait_for(self.healthy, timeout, f"every deployment HEALTHY with {REPLICAS} running replicas", poll=1.0)
        wait_for(lambda: self.client.get("/readyz").status_code == 200, 60, "/readyz")

    def all_champion(self, times: int = 1) -> bool:
        """`times` scoring requests in a row answered by every detector's champion (no fallback); ten
        reach every replica of a two-replica deployment but for a 1-in-1,000 chance."""
        for _ in range(times):
            try:
                r = self.client.post("/v1/score", json=self.score_body(), timeout=10)
            except httpx.HTTPError:
                return False
            if r.status_code != 200:
                return False
            detectors = r.json()["results"][0]["detectors"]
            if len(detectors) != 3 or any(d["path"] != "champion" for d in detectors.values()):
                return False
        return True

    def redeploy(self, **changes: Any) -> None:
        """Deploy the app again with changed arguments (a rolling update of what changed)."""
        from ray import serve

        self.args = {**self.args, **changes}
        serve.run(build(self.args), name=APP, route_prefix="/")
        self.wait_ready()


@dataclass
class Outcome:
    sent: float  # monotonic
    latency: float
    status: int  # 0: no HTTP answer (connection error, timeout)
    fallback: bool  # a detector answered from the fallback baseline
    error: str = ""


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    n = len(outcomes)
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    errors = sum(1 for o in outcomes if not 200 <= o.status < 300)
    ok = [o.latency * 1000 for o in outcomes if 200 <= o.status < 300]
    return {
        "requests": n,
        "errors": errors,
        "error_rate": errors / n if n else 0.0,
        "status_5xx": sum(1 for o in outcomes if o.status >= 500),
        "no_answer": sum(1 for o in outcomes if o.status == 0),
        "statuses": statuses,
        "fallback_answers": sum(1 for o in outcomes if o.fallback),
        "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok else None,
        "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else None,
    }


class LoadGenerator:
    """Single-row `POST /v1/score` requests (all three detectors) from a thread with its own event loop.

    Open loop at `rate` requests/s (at most `concurrency` in flight; a send that finds them all busy
    waits, and is counted in `late`), or closed loop (`rate=None`: `concurrency` clients back to back,
    each waiting `think_s` after an answer before its next request). Every outcome is recorded with its
    send time."""

    def __init__(
        self,
        served: Served,
        rate: float | None,
        concurrency: int = 16,
        timeout: float = 30.0,
        path: str = "/v1/score",
        body=None,
        local_address: str | None = None,
        think_s: float = 0.0,
    ) -> None:
        self.served, self.rate, self.concurrency, self.timeout = served, rate, concurrency, timeout
        self.think_s = think_s
        self.path = path
        self.body = body or served.score_body
        self.local_address = local_address
        self.outcomes: list[Outcome] = []
        self.late = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.started = self.stopped = 0.0

    def start(self) -> LoadGenerator:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> LoadGenerator:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 30)
        self.stopped = time.monotonic()
        return self

    def run_for(self, seconds: float) -> LoadGenerator:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def between(self, t0: float, t1: float) -> list[Outcome]:
        return [o for o in self.outcomes if t0 <= o.sent < t1]

    async def _one(self, client: httpx.AsyncClient) -> None:
        sent = time.monotonic()
        body = self.body()
        try:
            r = await client.post(self.path, json=body)
            status, fallback, error = r.status_code, False, ""
            if r.status_code == 200 and self.path == "/v1/score":
                fallback = any(
                    d["path"] == "fallback" for row in r.json()["results"] for d in row["detectors"].values()
                )
            elif r.status_code >= 300:
                error = r.text[:300]
        except httpx.HTTPError as exc:
            status, fallback, error = 0, False, f"{type(exc).__name__}: {exc}"
        self.outcomes.append(Outcome(sent, time.monotonic() - sent, status, fallback, error))

    async def _main(self) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=self.local_address) if self.local_address else None
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(
            base_url=self.served.base_url, timeout=self.timeout, limits=limits, transport=transport
        ) as client:
            if self.rate is None:
                await asyncio.gather(*(self._closed(client) for _ in range(self.concurrency)))
            else:
                await self._open(client)

    async def _closed(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            await self._one(client)
            if self.think_s:
                await asyncio.sleep(self.think_s)

    async def _open(self, client: httpx.AsyncClient) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task] = set()
        start, k = time.monotonic(), 0
        while not self._stop.is_set():
            due = start + k / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots.locked():
                self.late += 1
            await slots.acquire()
            task = asyncio.create_task(self._one(client))
            task.add_done_callback(lambda t: slots.release())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def measure_capacity(served: Served, seconds: float = 6.0, concurrency: int = 8) -> dict[str, Any]:
    """Closed-loop throughput of single-row, three-detector scoring: `concurrency` clients back to back."""
    LoadGenerator(served, rate=None, concurrency=concurrency).run_for(2.0)  # warm-up: pools, batching, caches
    gen = LoadGenerator(served, rate=None, concurrency=concurrency).run_for(seconds)
    done = [o for o in gen.outcomes if 200 <= o.status < 300]
    elapsed = gen.stopped - gen.started
    return {
        "rps": len(done) / elapsed,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        **summarize(gen.outcomes),
    }
