"""Requests lost with a killed ingress replica: Serve's own proxy, HAProxy (the high-throughput mode) as Ray
ships it, and HAProxy told to replay a request whose server closed without answering
(docs/experiments/haproxy-replay.md).

    .venv/bin/python docs/experiments/haproxy-replay.py [--workdir /tmp/bench-serve] [--rate 60] [--kills 3]

For each variant: a fresh local Ray head, the raywatch app (the serving benchmark's models, trained there
first if missing; two ingress replicas, drift monitors off), single-row `POST /v1/score` at `--rate`
requests/s from 32 clients; `--kills` times, one ingress replica is killed (`ray.kill`) and the load goes on
until a replacement runs. Every answer is counted by status; a bare-text 500 is a request lost with the
killed replica (the app's own 500s are JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import serving as bench  # noqa: E402

# the defaults block's policy, which every app backend inherits (RAY_SERVE_HAPROXY_INGRESS_RETRY_ON sets only
# the backend of an ingress request router, which the raywatch app does not have: its config kept conn-failure)
RETRY_ON = "RAY_SERVE_HAPROXY_RETRY_ON"
VARIANTS = {
    "serve proxy (default mode)": ("default", {}),
    "HAProxy, Ray's retry-on (conn-failure)": ("high_throughput", {}),
    "HAProxy, retry-on conn-failure empty-response": ("high_throughput", {RETRY_ON: "conn-failure empty-response"}),
}


class Load:
    """Open-loop single-row requests at `rate`/s, at most `concurrency` in flight, from a thread."""

    def __init__(self, url: str, rate: float, concurrency: int = 32) -> None:
        self.url, self.rate, self.concurrency = url, rate, concurrency
        self.metrics, self.values = bench.test_values()
        self.outcomes: list[tuple[float, float, int, str]] = []  # sent, latency, status, body head
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._n = 0

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float, int, str]]:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.outcomes

    async def _one(self, client, body: str) -> None:
        sent = time.monotonic()
        try:
            r = await client.post(self.url, content=body, headers={"content-type": "application/json"})
            status, text = r.status_code, r.text[:80]
        except Exception as exc:
            status, text = 0, type(exc).__name__
        self.outcomes.append((sent, time.monotonic() - sent, status, text))

    async def _main(self) -> None:
        import httpx

        gate = asyncio.Semaphore(self.concurrency)
        tasks = set()

        async def guarded(body: str) -> None:
            async with gate:
                await self._one(client, body)

        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=self.concurrency)) as client:
            start = time.monotonic()
            while not self._stop.is_set():
                i = self._n = self._n + 1
                row = self.values[i % len(self.values) : i % len(self.values) + 1]
                task = asyncio.create_task(guarded(bench.score_body(self.metrics, row, i, None)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
            await asyncio.gather(*tasks)


def ingress_replicas() -> list:
    import ray
    from ray.util.state import list_actors

    return list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "ServeReplica:raywatch:RaywatchAPI"), ("state", "=", "ALIVE")],
        detail=True,
    )


def running_ingress() -> int:
    from ray import serve

    from cluster.lifecycle import state_name

    app = serve.status().applications["raywatch"]
    states = app.deployments["RaywatchAPI"].replica_states
    return sum(n for state, n in states.items() if state_name(state) == "RUNNING")


def kill_under_load(url: str, rate: float) -> tuple[list, float, list[float]]:
    """One ingress replica killed after 3 s of load; the load goes on until a replacement runs, and 2 s more.
    Returns (outcomes, seconds until the replacement ran, each failed request's send time after the kill)."""
    import ray

    load = Load(url, rate).start()
    time.sleep(3.0)
    victim = ingress_replicas()[0]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    while time.monotonic() - killed_at < 120:
        alive = {a.actor_id for a in ingress_replicas()}
        if victim.actor_id not in alive and len(alive) >= 2 and running_ingress() >= 2:
            break
        time.sleep(0.25)
    back = time.monotonic() - killed_at
    time.sleep(2.0)
    outcomes = load.stop()
    return outcomes, back, [round(sent - killed_at, 2) for sent, _, status, _ in outcomes if status != 200]


def run_variant(name: str, mode: str, extra: dict[str, str], workdir: Path, rate: float, kills: int) -> dict:
    from serve.app import build_app

    saved = {k: os.environ.get(k) for k in extra}  # local_ray leaves the head's environment in this process's
    base = f"http://127.0.0.1:{bench.SERVE_PORT}"
    try:
        with bench.local_serve(mode, workdir, env=extra) as serve:
            app = build_app({"state_dir": str(workdir / "state"), "monitor": {"enabled": False}, "ingress_replicas": 2})
            serve.run(app, name="raywatch", route_prefix="/")
            bench.wait_http(f"{base}/readyz", bench.all_ready)
            outcomes, back, failed_at = [], [], []
            for k in range(kills):
                got, seconds, failed = kill_under_load(f"{base}/v1/score", rate)
                outcomes += got
                back.append(round(seconds, 1))
                failed_at.append(failed)
                bench.log(f"{name}: kill {k + 1}: {len(got)} requests, back in {seconds:.1f} s")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    statuses: dict[str, int] = {}
    for _, _, status, _ in outcomes:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    bare_500 = sum(1 for _, _, status, text in outcomes if status == 500 and not text.startswith("{"))
    ok = sorted(latency for _, latency, status, _ in outcomes if status == 200)
    return {
        "variant": name,
        "requests": len(outcomes),
        "lost (bare 500)": bare_500,
        "other errors": sum(1 for _, _, status, _ in outcomes if status != 200) - bare_500,
        "statuses": statuses,
        "no_answer": sorted({text for _, _, status, text in outcomes if status == 0}),
        "p50_ms": round(1000 * ok[len(ok) // 2], 1) if ok else None,
        "back_s": back,
        "failed_sent_after_kill_s": failed_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench-serve")
    parser.add_argument("--rate", type=float, default=60.0)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--variants", default="", help="comma-separated numbers of the variants to run (1-3)")
    args = parser.parse_args()
    chosen = {int(v) for v in args.variants.split(",") if v} or set(range(1, len(VARIANTS) + 1))
    workdir = bench.use_workdir(args.workdir)
    bench.prepare(workdir)
    rows = [
        run_variant(name, mode, extra, workdir, args.rate, args.kills)
        for i, (name, (mode, extra)) in enumerate(VARIANTS.items(), 1)
        if i in chosen
    ]
    lines = [
        f"{args.kills} kills of one of 2 ingress replicas each, {args.rate:g} single-row requests/s, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {bench.load_average()}",
        "",
        "| variant | requests | lost (bare 500) | other errors | p50 ms | back in s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        back = ", ".join(map(str, r["back_s"]))
        lines.append(
            f"| {r['variant']} | {r['requests']} | {r['lost (bare 500)']} | {r['other errors']} | {r['p50_ms']} "
            f"| {back} |"
        )
    print("\n".join(lines))
    (workdir / "haproxy-replay.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
