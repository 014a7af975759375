"""Sequential single-row /v1/score latency next to a trivial echo deployment, same Serve, same run.

    python benchmarks/serve_latency.py --workdir runs/bench --mode high_throughput   # or --mode default

Deploys the raywatch app (models from the MLflow store in --workdir; `make bench-compression` or
`raywatch train` fills it) and an echo app on one Serve instance, then sends the same number of
sequential single-row requests (one client, bounded count) to each, alternating in blocks so drift
on this shared machine hits both alike. Writes benchmarks/results/serve_latency_<mode>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "default": {},
    "high_throughput": {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    },
}
PORT = 8130


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "requests": len(a),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench")
    parser.add_argument("--mode", choices=list(MODES), default="high_throughput")
    parser.add_argument("--requests", type=int, default=400, help="per target")
    parser.add_argument("--entity", default="smd/machine-1-6")
    args = parser.parse_args(argv)
    os.environ.update(MODES[args.mode])  # before Ray and Serve are imported
    workdir = Path(args.workdir).resolve()
    os.chdir(workdir)
    import httpx
    import ray
    from fastapi import FastAPI
    from ray import serve

    from detect.data import load_series
    from serve.app import build_app

    echo_api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(echo_api)
    class Echo:
        @echo_api.post("/")
        async def echo(self, body: dict) -> dict:
            return body

    ray.init(log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app({}), name="raywatch", route_prefix="/")
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    dataset, entity = args.entity.split("/")
    series = load_series(dataset, entity)
    values = series.test[series.metrics].to_numpy()
    bodies = [{"rows": [{"entity": args.entity, "metrics": dict(zip(series.metrics, v.tolist()))}]} for v in values]
    times: dict[str, list[float]] = {"raywatch_score": [], "echo": []}
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30) as client:
        for body in bodies[:50]:  # warm-up, and fills the entity's history
            client.post("/v1/score", json=body).raise_for_status()
            client.post("/echo/", json=body).raise_for_status()
        i = 50
        while len(times["echo"]) < args.requests:
            for target, path in (("raywatch_score", "/v1/score"), ("echo", "/echo/")):
                for body in bodies[i : i + 20]:
                    t0 = time.perf_counter()
                    client.post(path, json=body).raise_for_status()
                    times[target].append((time.perf_counter() - t0) * 1000)
            i += 20
    serve.shutdown()
    ray.shutdown()
    rows = [
        {"target": t, "serve_mode": args.mode, "mode": "single", "concurrency": 1, **percentiles(ms)}
        for t, ms in times.items()
    ]
    ratio = rows[0]["p50_ms"] / rows[1]["p50_ms"]
    machine = f"{platform.node()}, {os.cpu_count()} cores"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serve_latency_{args.mode}.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "p50_ratio": ratio}, indent=2)
    )
    md = [
        f"Sequential single-row latency, {args.mode} mode, {machine}, {time.strftime('%Y-%m-%d')}; entity {args.entity}, "
        "all three detectors per request.",
        "",
        "| target | requests | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    md += [f"| {r['target']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} |" for r in rows]
    md.append(f"\n/v1/score p50 is {ratio:.1f}x the echo deployment's p50.")
    (RESULTS / f"serve_latency_{args.mode}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
