"""Serving benchmark: raywatch on Ray Serve side by side with its ceiling, the compute limit and the usual
alternative, every figure measured in the same run on the same machine.

    python benchmarks/serving.py prepare --workdir runs/bench-serve   # train small models when missing
    python benchmarks/serving.py run --workdir runs/bench-serve       # measure; writes results/serving.*

For each detector, single-row `POST /v1/score` (`"detectors": [<one>]`, one entity, the ingress's
per-entity history supplies the window) at 1, 8 and 32 concurrent connections, and 1,000-row batch
requests in both body forms (`body`: `matrix`, one entity's rows as a matrix to `/v1/score/batch`, the
bulk path; `rows`, 1,000 row objects to `/v1/score`), driven by wrk (a separate process, a Lua script for the bodies, bounded in time after a
warm-up) against:

- `ray_serve`: the raywatch app (`serve.app.build_app`), in each Serve mode: `default` and
  `high_throughput` (HAProxy ingress, direct gRPC between replicas). Each mode gets its own fresh
  local Ray head (`cluster.local.LocalHead`, free ports, token authentication on) in a subprocess,
  because Serve reads these variables before it starts;
- `echo`: a trivial FastAPI echo deployment on the same Serve instance, same bodies (Serve's ceiling);
- `onnxruntime_inprocess`: the same registered model's ONNX Runtime scorer called in this process on
  one thread (`work: onnx`, the compute limit) and the whole per-request model work of a replica
  (`work: score_rows`: features or windows, ONNX Runtime, top metrics);
- `fastapi`: `benchmarks/fastapi_peer.py`, one uvicorn process serving the same model with the
  same contract and the same per-entity history.

Then, in high-throughput mode, issue 20's single-row line in paired rounds (`paired_rounds`): the ensemble's
single rows at 8 clients against the FastAPI peer, raywatch and the echo deployment, all up at once and
driven one after another in each round, so that a shared machine's changing speed touches the three alike
(the peer is otherwise measured minutes before the Serve modes). `run --only-paired` runs these alone;
`run --app-args '{"ingress_replicas": 2}'` measures raywatch with serving settings of its own (any
`serve.settings.ServeSettings` field), which the result files record.

Rows/s = requests/s x rows per request. Writes benchmarks/results/serving.json (one row per point) and
serving.md, and the paired rounds to serving_paired.{json,md}. Helpers used by the other benchmarks (wrk
runner, Serve modes, the local head) live here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from compression import machine  # one machine description for every result table

RESULTS = Path(__file__).resolve().parent / "results"
ENTITY = "smd/machine-1-6"
DETECTORS = ("ensemble", "lstm", "autoencoder")
CONCURRENCY = (1, 8, 32)
BATCH_ROWS = 1000
BATCH_CONCURRENCY = (2, 4)
# the measured points: (mode, body, concurrency levels, rows per request, route). Batches go both ways:
# as `ScoreBatchRequest` matrices to /v1/score/batch (the bulk path) and as row objects to /v1/score
# (batches first: right after the in-process ONNX Runtime reference that each Serve mode measures
# beside them, so that a shared machine's changing load touches both alike)
POINTS = (
    ("batch", "matrix", BATCH_CONCURRENCY, BATCH_ROWS, "/v1/score/batch"),
    ("batch", "rows", BATCH_CONCURRENCY, BATCH_ROWS, "/v1/score"),
    ("single", "rows", CONCURRENCY, 1, "/v1/score"),
)
#: issue 20's single-row line (ensemble, single rows, 8 clients), measured again in rounds with the FastAPI
#: peer, raywatch and the echo deployment all up at once and driven one after another within each round
#: (the order turned by one each round), so that the shared machine's changing speed touches the three
#: alike; the line is read from the median of the rounds' ratios (`report.paired_summary`)
PAIRED_MODES = ("high_throughput",)
PAIRED_ROUNDS = 5
PAIRED_CONCURRENCY = 8
SERVE_PORT = 8150  # Serve HTTP (the proxy or HAProxy)
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": "8158", "RAY_SERVE_HAPROXY_METRICS_PORT": "8159"}
PEER_PORT = 8160
WRK = shutil.which("wrk") or "/usr/bin/wrk"
DEFAULT_EPOCHS = 1


def serve_modes() -> dict[str, dict[str, str]]:
    """Environment of each Serve mode; it must be set before Ray and Serve start."""
    from cluster.lifecycle import HIGH_THROUGHPUT_ENV

    return {
        "default": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
        "high_throughput": {**HIGH_THROUGHPUT_ENV, **HAPROXY_PORTS},
    }


def load_average() -> str:
    """The machine's 1/5/15-minute load average: other jobs share these cores, so every table says it."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def save_tables(name: str, result: dict[str, Any], md: list[str], show: bool = False) -> None:
    """benchmarks/results/<name>.json (the figures) and <name>.md (the tables); `show` prints the tables."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    if show:
        print("\n".join(md))


def rss_parts_mb(pid: int | str = "self") -> dict[str, float]:
    """A process's resident memory by kind (MB), from /proc/PID/status: `anon` is its own heap (Python
    objects, numpy arrays), `shmem` the pages of shared memory it touched (Ray's object store: a large
    argument or answer is read in place there, and such pages count in its RSS while they are mapped),
    `file` its mapped files (libraries). Empty where /proc has no such lines (not Linux)."""
    parts = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                parts[key.removeprefix("Rss").lower()] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        return {}
    return parts


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def use_workdir(workdir: str | Path) -> Path:
    """Run in the benchmark's own workdir: its MLflow store, Serve state and Ray Train/Tune output."""
    path = Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path / 'mlflow.db'}"
    os.environ["RAYWATCH_STATE_DIR"] = str(path / "state")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    return path


# -- models ----------------------------------------------------------------------------------------------
def prepare(workdir: str | Path, epochs: int = DEFAULT_EPOCHS) -> None:
    """Train and register every detector on ENTITY (one local Ray for all) unless it has a champion."""
    path = use_workdir(workdir)
    from train import registry
    from train.jobs import TRAIN_POLL_ENV
    from train.pipeline import train_model

    missing = []
    for model in DETECTORS:
        version = registry.alias_version(model, registry.CHAMPION)
        if version is None:
            missing.append(model)
        else:
            log(f"{model}: champion v{version} in {registry.tracking_uri()}, reused")
    if not missing:
        return
    with local_ray("prepare", path, {TRAIN_POLL_ENV: "0.2"}):
        for model in missing:
            log(f"{model}: training on {ENTITY} ({epochs} epoch(s) for the sequence models)")
            t0 = time.perf_counter()
            for attempt in (1, 2):  # one retry: a loaded shared machine sometimes loses a Ray Train worker group
                try:
                    train_model(model, entities=[ENTITY], overrides={"epochs": epochs}, use_tuned=False, progress=log)
                    break
                except Exception as exc:
                    if attempt == 2:
                        raise
                    log(f"{model}: training failed ({type(exc).__name__}: {str(exc)[:300]}); trying once more")
            log(f"{model}: trained and registered in {time.perf_counter() - t0:.0f} s")


def test_values() -> tuple[list[str], np.ndarray]:
    from detect.data import load_series

    dataset, entity = ENTITY.split("/")
    series = load_series(dataset, entity)
    return series.metrics, series.test[series.metrics].to_numpy()


def score_body(metrics: list[str], values: np.ndarray, start: int, detectors: list[str] | None) -> str:
    rows = [
        {"entity": ENTITY, "timestamp": float(start + i), "metrics": dict(zip(metrics, map(float, v)))}
        for i, v in enumerate(values)
    ]
    body: dict[str, Any] = {"rows": rows}
    if detectors:
        body["detectors"] = detectors
    return json.dumps(body, separators=(",", ":"))


def matrix_body(metrics: list[str], values: np.ndarray, start: int, detectors: list[str] | None) -> str:
    body: dict[str, Any] = {
        "entity": ENTITY,
        "metrics": metrics,
        "timestamps": [float(start + i) for i in range(len(values))],
        "values": values.tolist(),
    }
    if detectors:
        body["detectors"] = detectors
    return json.dumps(body, separators=(",", ":"))


def write_bodies(folder: Path, single: int = 200, batches: int = 2) -> dict[tuple[str, str, str], Path]:
    """Request bodies, one JSON document per line (wrk cycles through them), per detector and point:
    keys (detector, mode, body) as in POINTS."""
    metrics, values = test_values()
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in DETECTORS:
        for mode, body, _, size, _ in POINTS:
            count = single if mode == "single" else batches
            make = matrix_body if body == "matrix" else score_body
            path = folder / f"{name}-{mode}-{body}.jsonl"
            lines = [make(metrics, values[i * size : (i + 1) * size], i * size, [name]) for i in range(count)]
            path.write_text("\n".join(lines) + "\n")
            files[(name, mode, body)] = path
    return files


# -- load generation -------------------------------------------------------------------------------------
WRK_LUA = r"""
-- POSTs the bodies of $WRK_BODIES (one per line) in turn to $WRK_PATH; writes a JSON summary to $WRK_OUT.
local reqs, n, i = {}, 0, 0
function init(args)
  for line in io.lines(os.getenv("WRK_BODIES")) do
    n = n + 1
    reqs[n] = wrk.format("POST", os.getenv("WRK_PATH"), {["Content-Type"] = "application/json"}, line)
  end
  i = math.random(n) - 1
end
function request()
  i = i % n + 1
  return reqs[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  local f = io.open(os.getenv("WRK_OUT"), "w")
  f:write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
  f:close()
end
"""


def wrk(
    url: str, bodies: Path, connections: int, duration_s: int, warmup_s: int = 0, rows_per_request: int = 1
) -> dict[str, Any]:
    """Drive `url` (scheme, host, port and path) with wrk: one thread, `connections` connections."""
    base, _, path = url.partition("://")[2].partition("/")
    with tempfile.TemporaryDirectory(prefix="raywatch-wrk-") as folder:
        script, out = Path(folder, "post.lua"), Path(folder, "out.json")
        script.write_text(WRK_LUA)
        env = {**os.environ, "WRK_BODIES": str(bodies), "WRK_PATH": "/" + path, "WRK_OUT": str(out)}
        for seconds in ([warmup_s] if warmup_s > 0 else []) + [duration_s]:
            command = [WRK, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script)]
            done = subprocess.run(
                [*command, f"http://{base}"], env=env, capture_output=True, text=True, timeout=seconds + 90
            )
            if done.returncode != 0 or not out.exists():
                raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:] or done.stdout[-2000:]}")
        data = json.loads(out.read_text())
    seconds = data["duration_us"] / 1e6
    errors = sum(data["errors"].values())
    ok = data["requests"] - data["errors"]["status"]
    return {
        "concurrency": connections,
        "rows_per_s": round(ok * rows_per_request / seconds, 1),
        "requests_per_s": round(ok / seconds, 1),
        "p50_ms": round(data["p50_us"] / 1000, 2),
        "p95_ms": round(data["p95_us"] / 1000, 2),
        "p99_ms": round(data["p99_us"] / 1000, 2),
        "requests": data["requests"],
        "errors": errors,
        "duration_s": round(seconds, 2),
    }


def wait_http(url: str, ok: Callable[[dict], bool] = lambda body: True, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
                if ok(body):
                    return body
                last = body
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s: {last}")


def post(url: str, body: str) -> dict:
    request = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def measure_http(
    base: str,
    files: dict[tuple[str, str, str], Path],
    duration_s: int,
    warmup_s: int,
    label: dict,
    after: Callable[[], dict[str, Any]] = dict,
) -> Iterator[dict[str, Any]]:
    """Every point for one HTTP target: single rows per detector at each concurrency, then batches;
    `after()` adds its fields to each point once it is measured."""
    for name in DETECTORS:  # fill the entity's history and warm every replica before timing
        for _ in range(3):
            post(base + "/v1/score", files[(name, "single", "rows")].read_text().splitlines()[0])
    for mode, body, levels, size, route in POINTS:
        for connections in levels:
            for name in DETECTORS:
                point = wrk(base + route, files[(name, mode, body)], connections, duration_s, warmup_s, size)
                row = {**label, "detector": name, "mode": mode, "body": body, **point, **after()}
                log(_describe(row))
                yield row


def _describe(row: dict[str, Any]) -> str:
    where = f"{row['target']}{'/' + row['serve_mode'] if row.get('serve_mode') else ''}"
    body = f" ({row['body']})" if row.get("mode") == "batch" and row.get("body") else ""
    what = f"{row.get('detector') or '-'} {row['mode']}{body} c={row['concurrency']}"
    errors = f", {row['errors']} errors" if row.get("errors") else ""
    return (
        f"{where:<28} {what:<26} {row['rows_per_s']:>10,.0f} rows/s  p50 {row['p50_ms']} p99 {row['p99_ms']} ms{errors}"
    )


# -- Ray Serve -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_ray(name: str, log_dir: Path, env: dict[str, str] | None = None, num_cpus: int = 2) -> Iterator[str]:
    """A fresh local Ray head (`ray start --head` on free ports, token authentication on) with `env`,
    this process connected to it; stops exactly what it started. Yields the node id."""
    import ray

    from cluster.local import LocalHead

    os.environ.update(env or {})
    head = LocalHead(num_cpus=num_cpus, log_path=log_dir / f"ray-head-{name}.log")
    log(f"{name}: starting a local Ray head ({head.address}, dashboard {head.dashboard_url})")
    head.start(env=env)
    try:
        ray.init(address=head.address, log_to_driver=False)
        yield ray.get_runtime_context().get_node_id()
    except BaseException as exc:
        log(f"{name}: failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        ray.shutdown()  # before the head goes, or this driver waits for its GCS and aborts
        head.stop(kill=True)  # SIGTERM would drain the node for up to 30 s; nothing of it is kept


@contextlib.contextmanager
def local_serve(mode: str, log_dir: Path, num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[Any]:
    """Serve in `mode` on SERVE_PORT on a fresh local head (`local_ray`), with `env` over the mode's."""
    from ray import serve

    node_id = None
    try:
        with local_ray(mode, log_dir, {**serve_modes()[mode], **(env or {})}, num_cpus) as node_id:
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
                yield serve
            finally:
                with contextlib.suppress(Exception):
                    serve.shutdown()  # stops HAProxy too, which runs in a session of its own
    finally:
        if node_id:
            stop_haproxy(node_id)


def stop_haproxy(node_id: str) -> None:
    """HAProxy outlives a head killed before Serve shut down: stop the one of this node (its config
    lives under /tmp/haproxy-serve/<node id>/), nothing else."""
    import signal

    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if Path(args[0].decode()).name == "haproxy" and any(f"/{node_id}/".encode() in a for a in args):
                os.kill(int(proc.name), signal.SIGTERM)
                log(f"stopped HAProxy {proc.name} left by node {node_id[:8]}")


def replica_counts() -> dict[str, Any]:
    """Running replicas of the raywatch app's deployments now (autoscaling acts during a run)."""
    from ray import serve

    from cluster.lifecycle import state_name

    app = serve.status().applications.get("raywatch")
    if app is None:
        return {}
    counts = {
        name: sum(n for state, n in d.replica_states.items() if state_name(state) == "RUNNING")
        for name, d in app.deployments.items()
    }
    return {"replicas": " ".join(f"{name.removesuffix('Detector')}:{n}" for name, n in sorted(counts.items()))}


def echo_app() -> Any:
    from fastapi import FastAPI
    from ray import serve

    echo_api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
    @serve.ingress(echo_api)
    class Echo:
        @echo_api.post("/")
        async def echo(self, body: dict) -> dict:
            return body

    return Echo.bind()


def all_ready(body: dict) -> bool:
    return all(body.get("detectors", {}).get(name) for name in DETECTORS)


def single_rows_settled(base: str, body: str, timeout_s: float = 180) -> dict[str, str]:
    """Send one single-row request, then wait until no detector's single-row models are still being made
    in the ingress (`single_rows_in_ingress`: made on the first single-row call, the hop meanwhile), so
    that no measured point straddles the switch. Returns where each detector's single rows are scored."""
    post(f"{base}/v1/score", body)
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as response:
            where = {name: m.get("single_rows") for name, m in json.loads(response.read())["models"].items()}
        if "loading" not in where.values():
            return where
        if time.monotonic() > deadline:
            raise RuntimeError(f"single-row models still loading in the ingress after {timeout_s:.0f} s: {where}")
        time.sleep(0.5)


def run_mode(
    mode: str,
    workdir: Path,
    bodies: Path,
    duration_s: int,
    warmup_s: int,
    rounds: int = 0,
    only_paired: bool = False,
    app_args: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Runs in a subprocess per mode: deploy raywatch and echo on one Serve instance, drive both; then
    `rounds` paired rounds with the FastAPI peer (`paired_rounds`). `only_paired` skips everything else.
    `app_args`: the app's arguments over the benchmark's own (`serve.settings.ServeSettings`), for a knob
    measured against the shipped app."""
    from serve.app import build_app

    files = {(n, m, b): bodies / f"{n}-{m}-{b}.jsonl" for n in DETECTORS for m, b, *_ in POINTS}
    rows: list[dict[str, Any]] = []
    base = f"http://127.0.0.1:{SERVE_PORT}"
    with local_serve(mode, workdir) as serve:
        t0 = time.perf_counter()
        # drift monitors off: the FastAPI peer has none, and on a replayed test series they would
        # flag drift and start retraining jobs in the middle of the measurement
        app = build_app({"state_dir": str(workdir / "state"), "monitor": {"enabled": False}, **(app_args or {})})
        serve.run_many([serve.RunTarget(app, "raywatch", "/"), serve.RunTarget(echo_app(), "echo", "/echo")])
        wait_http(f"{base}/readyz", all_ready)
        where = single_rows_settled(base, files[("ensemble", "single", "rows")].read_text().splitlines()[0])
        log(f"{mode}: raywatch and echo deployed in {time.perf_counter() - t0:.0f} s; single rows scored in {where}")
        if not only_paired:
            rows += every_point(mode, base, files, duration_s, warmup_s)
        if rounds:
            with fastapi_peer(workdir) as peer:
                urls = {"fastapi": f"{peer}/v1/score", "ray_serve": f"{base}/v1/score", "echo": f"{base}/echo/"}
                rows += paired_rounds(urls, files[("ensemble", "single", "rows")], rounds, duration_s, warmup_s, mode)
    return rows


def every_point(
    mode: str, base: str, files: dict[tuple[str, str, str], Path], duration_s: int, warmup_s: int
) -> list[dict[str, Any]]:
    """Every point of one Serve mode: the compute limit again beside its batches, raywatch, the echo."""
    log(f"{mode}: the compute limit again, beside this mode's batch points")
    rows = inprocess(1, serve_mode=mode, only={("onnx", "batch")})
    rows += measure_http(base, files, duration_s, warmup_s, {"target": "ray_serve", "serve_mode": mode}, replica_counts)
    # the echo gets the ensemble's bodies: the same bytes in, the same bytes back
    for mode_, body, levels, size, _ in POINTS:
        for connections in levels:
            point = wrk(f"{base}/echo/", files[("ensemble", mode_, body)], connections, duration_s, warmup_s, size)
            row = {"target": "echo", "serve_mode": mode, "detector": None, "mode": mode_, "body": body, **point}
            log(_describe(row))
            rows.append(row)
    return rows


def paired_rounds(
    urls: dict[str, str], bodies: Path, rounds: int, duration_s: int, warmup_s: int, mode: str
) -> list[dict[str, Any]]:
    """Single-row ensemble requests at PAIRED_CONCURRENCY clients against each target of `urls` (name ->
    URL) one after another, `rounds` times, the order turned by one each round; a point per target and
    round, `paired_round` its round."""
    first = bodies.read_text().splitlines()[0]
    for name, url in urls.items():  # fill the entity's history on both apps and warm every replica
        for _ in range(3 if name != "echo" else 0):
            post(url, first)
    names = list(urls)
    rows = []
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            point = wrk(urls[name], bodies, PAIRED_CONCURRENCY, duration_s, warmup_s)
            detector = None if name == "echo" else "ensemble"
            row = {"target": name, "serve_mode": mode, "detector": detector, "mode": "single", "body": "rows"}
            rows.append({**row, "paired_round": r, **point})
            log(f"round {r + 1}/{rounds}: {_describe(rows[-1])}")
    return rows


# -- the compute limit -------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], seconds: float, max_calls: int = 100_000) -> np.ndarray:
    """Latencies (s) of repeated calls for about `seconds`, after one warm-up call."""
    fn()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(times) < max_calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def inprocess(
    seconds: float, serve_mode: str | None = None, only: set[tuple[str, str]] | None = None
) -> list[dict[str, Any]]:
    """The registered champion's ONNX Runtime scorer (one thread, as in a replica), called in process;
    `only` (work, mode) pairs; `serve_mode` labels a reference measured inside that mode's run."""
    from detect import runtime as runtime_module
    from serve.detectors import load_models

    parallel_rows = runtime_module.PARALLEL_ROWS

    _, values = test_values()
    rows = []
    for name in DETECTORS:
        model = load_models(name)[ENTITY]
        runtime = model.runtime
        history = values[: BATCH_ROWS + model.context_rows]  # context rows, then the rows scored
        inputs = runtime.graph_inputs(history)[-BATCH_ROWS:]
        onnx = runtime.run_graphs
        calls = {
            ("onnx", "batch"): lambda f=onnx, x=inputs: f(x),
            ("onnx", "single"): lambda f=onnx, x=inputs[-1:]: f(x),
            ("score_rows", "batch"): lambda m=model, h=history: m.score_rows(h, BATCH_ROWS),
            ("score_rows", "single"): lambda m=model, h=history[-(1 + model.context_rows) :]: m.score_rows(h, 1),
        }
        for (work, mode), fn in calls.items():
            if only is not None and (work, mode) not in only:
                continue
            size = BATCH_ROWS if mode == "batch" else 1
            # the compute limit on one thread, as the issue defines it: the ensemble's member graphs one
            # after another (a replica runs them side by side from runtime.PARALLEL_ROWS rows on)
            runtime_module.PARALLEL_ROWS = sys.maxsize if work == "onnx" else parallel_rows
            t = timed(fn, seconds)
            row = {
                "target": "onnxruntime_inprocess",
                "serve_mode": serve_mode,
                "detector": name,
                "mode": mode,
                "concurrency": 1,
                "work": work,
                # from the median call, as benchmarks/compression.py: robust to other jobs' bursts
                "rows_per_s": round(size / float(np.median(t)), 1),
                "requests_per_s": round(1 / float(np.median(t)), 1),
                **{f"p{q}_ms": round(float(np.percentile(t, q)) * 1000, 3) for q in (50, 95, 99)},
                "requests": len(t),
            }
            log(_describe(row) + f"  ({work})")
            rows.append(row)
    return rows


# -- the FastAPI peer --------------------------------------------------------------------------------------
@contextlib.contextmanager
def fastapi_peer(workdir: Path) -> Iterator[str]:
    """The FastAPI peer (benchmarks/fastapi_peer.py) in a process of its own; yields its base URL."""
    peer = Path(__file__).resolve().parent / "fastapi_peer.py"
    log_file = open(workdir / "fastapi-peer.log", "w")  # noqa: SIM115 (the child writes it)
    process = subprocess.Popen(
        [sys.executable, str(peer), "--port", str(PEER_PORT)], stdout=log_file, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{PEER_PORT}"
        wait_http(f"{base}/healthz", timeout_s=120)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


def run_peer(workdir: Path, files: dict[tuple[str, str], Path], duration_s: int, warmup_s: int) -> list[dict]:
    with fastapi_peer(workdir) as base:
        label = {"target": "fastapi", "serve_mode": None}
        return list(measure_http(base, files, duration_s, warmup_s, label))


# -- the run -----------------------------------------------------------------------------------------------
def run(
    workdir: str | Path,
    modes: list[str],
    duration_s: int,
    warmup_s: int,
    rounds: int = PAIRED_ROUNDS,
    only_paired: bool = False,
    app_args: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every point, then the paired rounds in PAIRED_MODES; `only_paired`: the paired rounds alone (written
    to results/serving_paired.* only, leaving serving.* as they are). `app_args`: see `run_mode`; the
    result files record them."""
    path = use_workdir(workdir)
    bodies = path / "bodies"
    files = write_bodies(bodies)
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), load_average()
    rows = [] if only_paired else inprocess(seconds=2) + run_peer(path, files, duration_s, warmup_s)
    for mode in [m for m in modes if m in PAIRED_MODES] if only_paired else modes:
        out = path / f"serving-{mode}.json"
        out.unlink(missing_ok=True)
        env = {**os.environ, **serve_modes()[mode]}
        command = [sys.executable, __file__, "mode", "--mode", mode, "--workdir", str(path), "--out", str(out)]
        command += ["--duration", str(duration_s), "--warmup", str(warmup_s)]
        command += ["--rounds", str(rounds if mode in PAIRED_MODES else 0)] + (["--only-paired"] if only_paired else [])
        command += ["--app-args", json.dumps(app_args)] if app_args else []
        subprocess.run(command, env=env, check=True)
        rows += json.loads(out.read_text())
    meta = run_meta(started, {"start": load_start, "end": load_average()}, duration_s, warmup_s, app_args)
    write_paired(rows, meta)
    if not only_paired:
        write_results(rows, meta)
    return rows


def run_meta(
    started: str, load: dict[str, str], duration_s: int, warmup_s: int, app_args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What every serving result file records of its run: machine, start, load, entity, load generator, and
    the app arguments it set over the shipped ones (`--app-args`), if any."""
    return {
        "machine": machine(),
        "date": started,
        "load_average": load,
        "entity": ENTITY,
        "load_generator": f"wrk, 1 thread, {duration_s:g} s per point after a {warmup_s:g} s warm-up",
        **({"app_args": app_args} if app_args else {}),
    }


def measured_on(title: str, meta: dict[str, Any]) -> str:
    """A result file's first line, from `run_meta`."""
    load = meta["load_average"]
    return (
        f"{title}, measured on {meta['machine']} ({meta['date']}, load average {load['start']} at the start, "
        f"{load['end']} at the end); entity {meta['entity']}; {meta['load_generator']}."
        + (
            f" raywatch with the app arguments {json.dumps(meta['app_args'])} over the shipped ones."
            if "app_args" in meta
            else ""
        )
    )


def write_paired(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """results/serving_paired.*: the paired rounds among `rows`, with the run's `meta` (`run_meta`)."""
    from report import paired_summary, table

    paired = [row for row in rows if "paired_round" in row]
    if not paired:
        return
    columns = ["paired_round", "serve_mode", "target", "requests_per_s", "p50_ms", "p99_ms", "errors"]
    md = [
        measured_on("Paired rounds", meta),
        "",
        f"Ensemble, single rows, {PAIRED_CONCURRENCY} clients: the FastAPI peer, raywatch and the echo deployment "
        "up at once, driven one after another in each round (the order turned by one each round). Ratios are "
        "taken within a round; the line is read from their median.",
        "",
        table(paired_summary(paired)),
        "",
        "Every point:",
        "",
        table(paired, columns),
    ]
    save_tables("serving_paired", {**meta, "rows": paired}, md)
    log(f"wrote {RESULTS / 'serving_paired.json'} and serving_paired.md")


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """results/serving.*: every point among `rows`, with the run's `meta` (`run_meta`)."""
    from report import batch_split, paired_summary, serving_ratios, table, time_split

    paired = [row for row in rows if "paired_round" in row]
    rows = [row for row in rows if "paired_round" not in row]
    meta = {
        **meta,
        "notes": [
            "ray_serve: the raywatch app with drift monitors off (monitor.enabled=false), autoscaling as shipped",
            "onnxruntime_inprocess work=onnx: the ONNX graph(s) alone on precomputed features/windows "
            "(measured first, and again inside each Serve mode's run just before its batch points: "
            "serve_mode names that run; ratios use the one beside them), "
            "(the ensemble's four member graphs one after another), "
            "work=score_rows: features/windows + ONNX + top metrics, what a detector replica runs per request "
            "(member graphs side by side from 256 rows on); "
            "rows/s from the median call (2 s of calls each), one thread",
        ],
    }
    columns = ["target", "serve_mode", "detector", "mode", "body", "concurrency", "work", "rows_per_s"]
    columns += ["p50_ms", "p95_ms", "p99_ms", "errors", "replicas"]
    md = [
        measured_on("Serving", meta),
        "",
        *[f"- {note}" for note in meta["notes"]],
        "",
        "Ratios (same run):",
        "",
        table(serving_ratios(rows)),
        "",
        "Where one single-row ensemble request's time goes (1 client, p50 ms):",
        "",
        table(time_split(rows)),
        "",
        "1,000-row ensemble batches, rows/s, from the compute limit outwards:",
        "",
        table(batch_split(rows)),
        "",
        f"Issue 20's single-row line in paired rounds (ensemble, single rows, {PAIRED_CONCURRENCY} clients; "
        "[serving_paired.md](serving_paired.md) has every point):",
        "",
        table(paired_summary(paired)),
        "",
        "Every point:",
        "",
        table(rows, columns),
    ]
    save_tables("serving", {**meta, "rows": rows}, md)
    log(f"wrote {RESULTS / 'serving.json'} and serving.md")


def app_arguments(text: str) -> dict[str, Any]:
    """`--app-args`: a JSON object of `ServeSettings` fields (the serving knobs), checked here before Ray starts."""
    from serve.settings import ServeSettings

    try:
        args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of app arguments, not {type(args).__name__}")
    unknown = set(args) - set(ServeSettings.model_fields)
    if unknown:
        raise argparse.ArgumentTypeError(f"not ServeSettings fields: {sorted(unknown)}")
    try:
        ServeSettings.from_app_args(args)
    except ValueError as exc:  # pydantic's ValidationError names the field and what is wrong with it
        raise argparse.ArgumentTypeError(str(exc)) from None
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="train and register the detectors on one entity when missing")
    p.add_argument("--workdir", default="runs/bench-serve")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    r = sub.add_parser("run", help="the whole serving benchmark")
    r.add_argument("--workdir", default="runs/bench-serve")
    r.add_argument("--modes", default="default,high_throughput")
    r.add_argument("--duration", type=int, default=5, help="measured seconds per point (wrk takes whole seconds)")
    r.add_argument("--warmup", type=int, default=1, help="unmeasured seconds before each point")
    r.add_argument("--rounds", type=int, default=PAIRED_ROUNDS, help="paired rounds (PAIRED_MODES; 0: none)")
    r.add_argument("--only-paired", action="store_true", help="the paired rounds alone (results/serving_paired.*)")
    r.add_argument(
        "--app-args",
        type=app_arguments,
        default=None,
        help="JSON object of serving settings (serve.settings.ServeSettings fields) over the shipped ones, to "
        "measure a knob; e.g. '{\"ingress_replicas\": 2}'",
    )
    m = sub.add_parser("mode", help="(internal) one Serve mode, run in its own process")
    m.add_argument("--mode", choices=["default", "high_throughput"], required=True)
    m.add_argument("--workdir", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--duration", type=int, default=5)
    m.add_argument("--warmup", type=int, default=1)
    m.add_argument("--rounds", type=int, default=0)
    m.add_argument("--only-paired", action="store_true")
    m.add_argument("--app-args", type=app_arguments, default=None)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.workdir, args.epochs)
    elif args.command == "run":
        modes = [m for m in args.modes.split(",") if m]
        unknown = set(modes) - set(serve_modes())
        if unknown:
            parser.error(f"--modes: unknown {sorted(unknown)}; choose from {sorted(serve_modes())}")
        run(args.workdir, modes, args.duration, args.warmup, args.rounds, args.only_paired, args.app_args)
    else:
        path = use_workdir(args.workdir)
        rows = run_mode(
            args.mode, path, path / "bodies", args.duration, args.warmup, args.rounds, args.only_paired, args.app_args
        )
        Path(args.out).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
