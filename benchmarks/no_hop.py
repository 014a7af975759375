"""The single-row path with and without the ingress-to-detector hop, side by side in one run.

    python benchmarks/no_hop.py [--modes high_throughput,default] [--concurrency 1,8,32]   # or: make bench-no-hop

Single-row ensemble requests (`POST /v1/score`, one row, `"detectors": ["ensemble"]`, the bodies of
`benchmarks/serving.py`), driven by wrk, against, per Serve mode, on one Serve instance:

- `hop`: the raywatch app as shipped (`single_rows_in_ingress: []`): the ingress
  gathers concurrent requests' rows and calls the ensemble's deployment (`score_items`);
- `in_ingress`: the same app with `in_ingress: ["ensemble"]`: the ingress replica runs the ensemble's
  models itself (`serve.detectors.InProcessHandle`), with no ensemble deployment (for single rows, what
  `single_rows_in_ingress: ["ensemble"]` does);
- `echo`: Serve's own path, a deployment that returns its body: the floor for any Serve app;

and, before the Serve modes, the FastAPI peer (`benchmarks/fastapi_peer.py`: one process doing the same
model work). At each concurrency the three Serve targets are measured one after another, so that a
shared machine's changing load touches them alike. Models come from `serving.py prepare` (trained once,
reused). Writes benchmarks/results/no_hop.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from serving import (
    SERVE_PORT,
    echo_app,
    fastapi_peer,
    load_average,
    local_serve,
    log,
    post,
    prepare,
    save_tables,
    serve_modes,
    use_workdir,
    wait_http,
    write_bodies,
    wrk,
)

DETECTOR = "ensemble"
TARGETS = ("echo", "hop", "in_ingress")
ROUTES = {"echo": "/echo/", "hop": "/v1/score", "in_ingress": "/in-ingress/v1/score"}


def measure(base: str, route: str, bodies: Path, levels: list[int], duration_s: int, warmup_s: int, **label) -> list:
    rows = []
    for connections in levels:
        point = wrk(base + route, bodies, connections, duration_s, warmup_s)
        rows.append({**label, **point})
        log(
            f"{label['target']:<11} {label.get('serve_mode') or '-':<16} c={connections:<3} "
            f"{point['requests_per_s']:>8,.0f} req/s  p50 {point['p50_ms']} p99 {point['p99_ms']} ms"
        )
    return rows


def warm(base: str, bodies: Path) -> None:
    """A few requests first: the entity's history is filled and every replica on the path is warm."""
    for line in bodies.read_text().splitlines()[:3]:
        post(f"{base}/v1/score", line)


def run_mode(mode: str, workdir: Path, bodies: Path, levels: list[int], duration_s: int, warmup_s: int) -> list:
    """In a subprocess per mode (its environment must be set before Ray starts): the three targets."""
    from serve.app import build_app

    base = f"http://127.0.0.1:{SERVE_PORT}"
    rows: list[dict[str, Any]] = []
    with local_serve(mode, workdir) as serve:
        common = {"monitor": {"enabled": False}}  # as in serving.py: no drift jobs during the measurement
        hop = build_app({**common, "state_dir": str(workdir / "state"), "single_rows_in_ingress": []})
        here = build_app({**common, "state_dir": str(workdir / "state-in-ingress"), "in_ingress": [DETECTOR]})
        serve.run_many(
            [
                serve.RunTarget(hop, "raywatch", "/"),
                serve.RunTarget(here, "raywatch-in-ingress", "/in-ingress"),
                serve.RunTarget(echo_app(), "echo", "/echo"),
            ]
        )
        for prefix in ("", "/in-ingress"):
            wait_http(f"{base}{prefix}/readyz", lambda body: bool(body.get("detectors", {}).get(DETECTOR)))
            warm(base + prefix, bodies)
        for connections in levels:
            for target in TARGETS:
                rows += measure(
                    base, ROUTES[target], bodies, [connections], duration_s, warmup_s, target=target, serve_mode=mode
                )
    return rows


def write_results(rows: list[dict[str, Any]], started: str, load: dict[str, str], args: argparse.Namespace) -> None:
    peer = {r["concurrency"]: r for r in rows if r["target"] == "fastapi"}
    md = [
        "# The single-row path with and without the ingress-to-detector hop",
        "",
        f"`python benchmarks/no_hop.py --modes {args.modes} --concurrency {args.concurrency}`, {started}, load "
        f"average {load['start']} at the start and {load['end']} at the end; single-row `{DETECTOR}` requests, "
        f"wrk with 1 thread, {args.duration} s per point after {args.warmup} s of warm-up. `hop`: the app with "
        "`single_rows_in_ingress: []` (ingress -> ensemble deployment); `in_ingress`: `in_ingress: [ensemble]` (the ingress runs the models); "
        "`echo`: a Serve deployment returning its body; `fastapi`: one FastAPI + ONNX Runtime process doing the same "
        "model work (benchmarks/fastapi_peer.py).",
        "",
        "| serve mode | clients | fastapi req/s | echo req/s | hop req/s | in_ingress req/s | hop / fastapi "
        "| in_ingress / fastapi | in_ingress / hop | p99 ms hop | p99 ms in_ingress | p99 ms echo "
        "| p99 in_ingress / echo |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in args.modes.split(","):
        for c in args.concurrency_levels:
            at = {r["target"]: r for r in rows if r.get("serve_mode") == mode and r["concurrency"] == c}
            if not {"echo", "hop", "in_ingress"} <= set(at) or c not in peer:
                continue
            f, e, h, i = peer[c], at["echo"], at["hop"], at["in_ingress"]
            md.append(
                f"| {mode} | {c} | {f['requests_per_s']:,.0f} | {e['requests_per_s']:,.0f} | {h['requests_per_s']:,.0f} "
                f"| {i['requests_per_s']:,.0f} | {h['requests_per_s'] / f['requests_per_s']:.2f} "
                f"| {i['requests_per_s'] / f['requests_per_s']:.2f} | {i['requests_per_s'] / h['requests_per_s']:.2f} "
                f"| {h['p99_ms']} | {i['p99_ms']} | {e['p99_ms']} | {i['p99_ms'] / e['p99_ms']:.2f} |"
            )
    save_tables("no_hop", {"rows": rows, "date": started, "load_average": load}, md, show=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "mode"])
    parser.add_argument("--workdir", default="runs/bench-serve", help="shared with serving.py (its models)")
    parser.add_argument("--modes", default="high_throughput,default")
    parser.add_argument("--mode", help="(internal) the one Serve mode a subprocess measures")
    parser.add_argument("--out", help="(internal) where that subprocess writes its rows")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    args.concurrency_levels = [int(c) for c in args.concurrency.split(",")]
    path = use_workdir(args.workdir)
    bodies = write_bodies(path / "bodies")[(DETECTOR, "single", "rows")]
    if args.command == "mode":
        rows = run_mode(args.mode, path, bodies, args.concurrency_levels, args.duration, args.warmup)
        Path(args.out).write_text(json.dumps(rows))
        return 0
    unknown = set(args.modes.split(",")) - set(serve_modes())
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {sorted(serve_modes())}")
    prepare(path)
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), load_average()
    rows = []
    with fastapi_peer(path) as base:
        warm(base, bodies)
        rows += measure(
            base,
            "/v1/score",
            bodies,
            args.concurrency_levels,
            args.duration,
            args.warmup,
            target="fastapi",
            serve_mode=None,
        )
    for mode in args.modes.split(","):
        out = path / f"no-hop-{mode}.json"
        out.unlink(missing_ok=True)
        command = [sys.executable, __file__, "mode", "--mode", mode, "--workdir", str(path), "--out", str(out)]
        command += ["--concurrency", args.concurrency, "--duration", str(args.duration), "--warmup", str(args.warmup)]
        subprocess.run(command, env={**os.environ, **serve_modes()[mode]}, check=True)
        rows += json.loads(out.read_text())
    write_results(rows, started, {"start": load_start, "end": load_average()}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
