"""Dynamic batching benchmark: `@serve.batch` (the deployments' default `max_batch_size`) against
`max_batch_size=1`, for the LSTM and autoencoder deployments, in Serve's high-throughput mode.

    python benchmarks/batching.py --workdir runs/bench-serve     # after `serving.py prepare`

Handle path (no HTTP proxy in the way): each detector deployment twice, one replica each (autoscaling
off, so batching is the only difference; nothing else deployed meanwhile), called with `handle.score.remote(item)` by 32 concurrent
asyncio callers for a fixed time; items as the ingress builds them (context rows + 1 new row,
`n_new=1`, path champion). HTTP path beside it: the whole raywatch app deployed twice, as shipped and
with `max_batch_size=1` in its detector deployments, single-row `/v1/score` at 32 wrk connections.
Writes benchmarks/results/batching.json and batching.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from report import ratio, table
from serving import (
    ENTITY,
    all_ready,
    load_average,
    local_serve,
    log,
    machine,
    save_tables,
    test_values,
    use_workdir,
    wait_http,
    write_bodies,
    wrk,
)

DETECTORS = ("lstm", "autoencoder")
CALLERS = 32
ITEMS = 200
PROBE_S = 2  # seconds of the one-caller latency probe
CONFIGS = {"batched": {}, "unbatched": {"max_batch_size": 1}}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def replica_pids(app: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    # this process's own cluster, named: its head keeps a private temp dir, so "auto" would find another Ray
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000)
    return [a.pid for a in actors if (a.name or "").startswith(f"SERVE_REPLICA::{app}#")]


async def drive(
    handle: Any, items: list[dict[str, Any]], callers: int, duration_s: float, warmup_s: float, pids: list[int]
) -> dict:
    """`callers` concurrent loops of `handle.score.remote(item)`; the calls that end inside the measured
    span, and the CPU that this process (the callers) and the replica (`pids`) used over it."""
    start = time.perf_counter()
    cpu: list[tuple[float, float]] = []
    measure_from, deadline = start + warmup_s, start + warmup_s + duration_s
    latencies: list[float] = []
    failures = 0

    async def caller(k: int) -> None:
        nonlocal failures
        i = k
        while (t0 := time.perf_counter()) < deadline:
            result = await handle.score.remote(items[i % len(items)])
            t1 = time.perf_counter()
            if measure_from <= t1 <= deadline:
                latencies.append(t1 - t0)
                failures += not result.get("ok")
            i += callers

    async def cpu_meter() -> None:  # is the caller or the replica the limit?
        for at in (measure_from, deadline):
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            cpu.append((time.process_time(), cpu_seconds(pids)))

    await asyncio.gather(cpu_meter(), *(caller(k) for k in range(callers)))
    t = np.asarray(latencies)
    return {
        "rows_per_s": round(len(t) / duration_s, 1),
        "p50_ms": round(float(np.percentile(t, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(t, 99)) * 1000, 2),
        "calls": len(t),
        "caller_cpu": round((cpu[1][0] - cpu[0][0]) / duration_s, 2),
        "replica_cpu": round((cpu[1][1] - cpu[0][1]) / duration_s, 2),
        "replica_cpu_ms_per_row": round(1000 * (cpu[1][1] - cpu[0][1]) / max(len(t), 1), 3),
        "failed": failures,
    }


def handle_echo() -> Any:
    """The handle path's own ceiling: a deployment whose `score` returns at once, sized like a detector."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
    class HandleEcho:
        async def score(self, item: dict[str, Any]) -> dict[str, Any]:
            return {"ok": True}

    return HandleEcho.bind()


def deploy_handle_path(serve: Any) -> dict[tuple[str, str], Any]:
    """The handle path's apps only (idle replicas of other apps would take CPU from the measurement):
    each detector deployment per config (one replica, autoscaling off, no route) and the handle echo."""
    from serve.detectors import DEPLOYMENTS

    targets, keys = [serve.RunTarget(handle_echo(), "handle-echo", None)], [("echo", "handle")]
    for name in DETECTORS:
        for config, kwargs in CONFIGS.items():
            deployment = DEPLOYMENTS[name].options(num_replicas=1, autoscaling_config=None)
            targets.append(serve.RunTarget(deployment.bind(**kwargs), f"{name}-{config}", None))
            keys.append((name, config))
    return dict(zip(keys, serve.run_many(targets)))


def deploy_http_path(serve: Any, state_dir: str) -> None:
    """The whole raywatch app per config at /<config>, once the handle-path apps are gone."""
    for app in serve.status().applications:
        serve.delete(app)
    serve.run_many(
        [
            serve.RunTarget(build_app(kwargs.get("max_batch_size"), state_dir), f"raywatch-{config}", f"/{config}")
            for config, kwargs in CONFIGS.items()
        ]
    )


def handle_path(
    handles: dict[tuple[str, str], Any], duration_s: int, warmup_s: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per detector, batched and unbatched at CALLERS callers (and one caller alone); and the handle echo."""
    _, values = test_values()

    async def measure() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        # inside one event loop: in high-throughput mode a handle's router runs on the caller's loop
        out: dict[str, dict[str, Any]] = {}
        items: list[dict[str, Any]] = [{"entity": ENTITY, "path": "champion", "rows": values[:20], "n_new": 1}]
        pids = replica_pids("handle-echo")
        point = await drive(handles["echo", "handle"], items, CALLERS, duration_s, warmup_s, pids)
        alone = await drive(handles["echo", "handle"], items, 1, PROBE_S, 0, pids)
        log(f"handle echo: {point['rows_per_s']:,.0f} calls/s at {CALLERS} callers, p50 {alone['p50_ms']} ms alone")
        echo = {"rows_per_s": point["rows_per_s"], "p50_ms": point["p50_ms"], "1_caller_p50_ms": alone["p50_ms"]}
        echo |= {k: point[k] for k in ("p99_ms", "caller_cpu")}
        for name in DETECTORS:
            info = await handles[name, "batched"].info.remote()
            context = info["slots"]["champion"]["entities"][ENTITY]["context_rows"]
            items = [  # as the ingress builds them: context rows, then one new row
                {"entity": ENTITY, "path": "champion", "rows": values[i : i + context + 1], "n_new": 1}
                for i in range(ITEMS)
            ]
            out[name] = {"callers": CALLERS}
            for config in CONFIGS:
                pids = replica_pids(f"{name}-{config}")
                # one caller: the hop's own latency, and what the batch wait adds to it
                alone = await drive(handles[name, config], items, 1, PROBE_S, 0, pids)
                out[name][f"{config}_1_caller_p50_ms"] = alone["p50_ms"]
                point = await drive(handles[name, config], items, CALLERS, duration_s, warmup_s, pids)
                log(
                    f"handle {name} {config}: {point['rows_per_s']:,.0f} rows/s, p50 {point['p50_ms']} "
                    f"p99 {point['p99_ms']} ms; CPU: callers {point['caller_cpu']:.0%}, replica {point['replica_cpu']:.0%}"
                )
                if point["failed"]:
                    raise RuntimeError(f"{name} {config}: {point['failed']} calls failed")
                out[name] |= {f"{config}_{k}": v for k, v in point.items() if k != "failed"}
            out[name]["handle_echo_rows_per_s"] = echo["rows_per_s"]
        return out, echo

    return asyncio.run(measure())


def build_app(max_batch_size: int | None, state_dir: str) -> Any:
    """The raywatch app as shipped, with drift monitors off (as in serving.py) and, when given,
    `max_batch_size` in its detector deployments."""
    from serve.app import build_app

    args: dict[str, Any] = {"state_dir": state_dir, "monitor": {"enabled": False}}
    if max_batch_size is not None:
        args["max_batch_size"] = max_batch_size
    return build_app(args)


def http_path(workdir: Path, port: int, duration_s: int, warmup_s: int) -> dict[str, dict[str, Any]]:
    files = write_bodies(workdir / "bodies")
    base = f"http://127.0.0.1:{port}"
    for config in CONFIGS:
        wait_http(f"{base}/{config}/readyz", all_ready)
    out: dict[str, dict[str, Any]] = {}
    for name in DETECTORS:
        figures: dict[str, Any] = {"connections": CALLERS}
        for config in CONFIGS:
            point = wrk(f"{base}/{config}/v1/score", files[(name, "single", "rows")], CALLERS, duration_s, warmup_s)
            log(
                f"http {name} {config}: {point['rows_per_s']:,.0f} rows/s, p50 {point['p50_ms']} p99 {point['p99_ms']} ms"
            )
            figures |= {f"{config}_{k}": point[k] for k in ("rows_per_s", "p50_ms", "p99_ms", "requests", "errors")}
        out[name] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench-serve")
    parser.add_argument("--duration", type=int, default=5, help="measured seconds per point")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured seconds before each point")
    args = parser.parse_args(argv)
    workdir = use_workdir(args.workdir)
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), load_average()
    from serving import SERVE_PORT

    with local_serve("high_throughput", workdir, num_cpus=4) as serve:
        t0 = time.perf_counter()
        handles = deploy_handle_path(serve)
        log(f"deployed {len(handles)} apps for the handle path in {time.perf_counter() - t0:.0f} s")
        handle, echo = handle_path(handles, args.duration, args.warmup)
        t0 = time.perf_counter()
        deploy_http_path(serve, str(workdir / "state"))
        log(f"deployed the raywatch app twice for the HTTP path in {time.perf_counter() - t0:.0f} s")
        http = http_path(workdir, SERVE_PORT, args.duration, args.warmup)
    for figures in (*handle.values(), *http.values()):
        figures["x"] = ratio(figures["batched_rows_per_s"], figures["unbatched_rows_per_s"])
    result = {
        "machine": machine(),
        "date": started,
        "load_average": {"start": load_start, "end": load_average()},
        "setup": (
            f"Serve high-throughput mode; entity {ENTITY}; handle path: one replica per deployment, {CALLERS} "
            f"concurrent asyncio callers in the driver; HTTP: the app as shipped (autoscaling 1-2 replicas) at "
            f"{CALLERS} wrk connections; {args.duration} s per point after {args.warmup} s of warm-up. "
            "batched = the deployments' default @serve.batch settings, unbatched = max_batch_size=1. "
            "caller_cpu / replica_cpu: cores busy in the calling process / the replica over the measured span "
            "(1.0 = one core), to tell which side limits; replica_cpu_ms_per_row: the replica's CPU per scored row; "
            "1_caller_p50_ms: one caller alone for 2 s first, the hop's latency with and without the batch wait; "
            "handle_echo_rows_per_s: the same callers against a deployment whose `score` returns at once (the "
            "handle path's own ceiling here)."
        ),
        "handle": handle,
        "handle_echo": echo,
        "http": http,
    }
    rows = [
        {"path": path, "detector": n, **f} for path, d in (("handle", handle), ("http", http)) for n, f in d.items()
    ]
    columns = ["path", "detector", "batched_rows_per_s", "unbatched_rows_per_s", "x", "handle_echo_rows_per_s"]
    columns += ["batched_p50_ms", "unbatched_p50_ms", "batched_p99_ms", "unbatched_p99_ms"]
    columns += ["batched_caller_cpu", "unbatched_caller_cpu", "batched_replica_cpu", "unbatched_replica_cpu"]
    columns += ["batched_replica_cpu_ms_per_row", "unbatched_replica_cpu_ms_per_row"]
    columns += ["batched_1_caller_p50_ms", "unbatched_1_caller_p50_ms"]
    md = [
        f"Dynamic batching, measured on {result['machine']} ({started}).",
        "",
        result["setup"],
        "",
        table(rows, columns),
    ]
    save_tables("batching", result, md, show=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
