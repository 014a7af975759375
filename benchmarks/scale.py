"""Scale benchmark: one Serve app (high-throughput mode) scoring fleets of N = 10, 100, 1,000 and 10,000
synthetic machines, snapshot by snapshot, beside the same models scoring the same rows in this process.

    python benchmarks/scale.py [--sizes 10,100,1000,10000] [--workdir runs/bench-scale]   # or: make bench-scale
    python benchmarks/scale.py --in-ingress autoencoder    # the ingress runs the models: no hop (scale_in_ingress.*)

The first `--own` machines (100) have a model of their own; every other machine is scored by the fleet
model of its metrics from its first row (detect/fleet.py). Both are trained once, for every N: the fleet
model on Ray Train (`fit_windows_with_ray_train`, what `raywatch train --fleet` runs), the own models as
Ray tasks, one in-process fit each. Per N, on a freshly deployed app (new replica processes):

- `--warmup` snapshots (one row per machine, `POST /v1/score/fleet`, what a Prometheus scrape delivers),
  so every machine is grown: past its statistics checkpoints, its history full, and its requests needing
  one set of statistics, so the fleet model scores it on the vectorised path (from about row 275; with
  200, the default until 2026-12-02, every measured machine was still young), then `--measured` timed
  snapshots: p50 and p99 latency, and rows/s = N x snapshots / their summed latency;
- `inprocess_rows_per_s`: the same measured snapshots scored in this process by the same models
  (`serve.detectors.load_models`), with the same per-entity bookkeeping as the ingress (history, fleet
  statistics) and no HTTP, JSON or Serve: the ceiling the platform is compared with. Each measured
  snapshot goes to the platform and then to this control, each starting once the replicas and monitors
  are idle (`wait_quiet`), as between scrapes; so both figures come from the same minutes (until
  2026-12-04 the control ran after all the platform's snapshots, and the machine's speed drifted between);
- `replica_cpu_ms_per_snapshot`: CPU each replica kind and the drift monitors used per measured snapshot,
  until idle again (the monitors' testing of its rows included);
- `cold_start_ms`: the first `POST /v1/score` of machines never seen before (median of 5);
- the RSS of every Serve replica (ingress included) and of the drift monitors, from their processes, read
  once the replicas have given back what the last snapshot freed (serve/memory.py): between scrapes;
- the models each detector replica holds (`models_held` of /v1/models), against its LRU capacity (`--lru`,
  the app's `models_per_replica`).

Writes benchmarks/results/scale.json (a list of records, one per N) and scale.md; with `--in-ingress`,
scale_in_ingress.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from serving import SERVE_PORT, load_average, local_serve, log, rss_parts_mb, save_tables, use_workdir, wait_http

from serve.settings import ServeSettings

SIZES = (10, 100, 1000, 10_000)
OWN = 100  # machines with a model of their own (the first ones)
FLEET_TRAIN = 64  # machines the fleet model learns from
TRAIN_ROWS = 2880  # two days of 1-minute samples per training machine
QUIET_S = 0.6  # the window in which replicas count as idle: longer than the ingress's monitor flush (0.5 s)
DAY = 1440
SEED = 20


def metric_names() -> list[str]:
    from detect.synthetic import METRICS

    return [m for m in METRICS if m != "disk_usage"]  # a fill trend is a distribution change by construction


class Machines:
    """Synthetic machines, vectorised: each metric a base level, a share of the machine's daily cycle, and
    noise, all drawn per machine. `rows(t)` is every machine's sample at minute t (snapshots from t = 0);
    `history(e)` a machine's training days, before t = 0."""

    def __init__(self, count: int, metrics: list[str], seed: int = SEED) -> None:
        from detect.synthetic import METRICS

        rng = np.random.default_rng(seed)
        base = np.array([METRICS[m][0] for m in metrics])
        gain = np.array([METRICS[m][1] for m in metrics])
        noise = np.array([METRICS[m][2] for m in metrics])
        self.count, self.seed = count, seed
        self.base = base * rng.uniform(0.5, 1.5, (count, len(metrics)))
        self.gain = self.base * gain * rng.uniform(0.5, 1.5, (count, len(metrics)))
        self.noise = noise * rng.uniform(0.5, 1.5, (count, len(metrics)))
        self.phase = rng.uniform(0, 2 * np.pi, (count, 1))

    def _at(self, entities: slice | np.ndarray, t: np.ndarray, z: np.ndarray) -> np.ndarray:
        load = np.sin(2 * np.pi * t / DAY + self.phase[entities])[..., None]  # (e, t, 1)
        return self.base[entities][:, None] + self.gain[entities][:, None] * load + self.noise[entities][:, None] * z

    def rows(self, t: int, n: int) -> np.ndarray:
        """(n, M): machines 0..n-1 at minute t."""
        z = np.random.default_rng([self.seed, t]).normal(size=(self.count, self.base.shape[1]))[:n, None]
        return self._at(slice(0, n), np.array([t]), z)[:, 0]

    def span(self, n: int, start: int, steps: int) -> np.ndarray:
        """(n, steps, M): machines 0..n-1 at minutes start..start + steps - 1 (the same rows as `rows`)."""
        return np.stack([self.rows(t, n) for t in range(start, start + steps)], axis=1)

    def history(self, e: int, steps: int = TRAIN_ROWS) -> np.ndarray:
        z = np.random.default_rng([self.seed, 10**7 + e]).normal(size=(1, steps, self.base.shape[1]))
        return self._at(np.array([e]), np.arange(-steps, 0), z)[0]


def entity(e: int) -> str:
    return f"scale/machine-{e:05d}"


# -- models ------------------------------------------------------------------------------------------------
def train_models(machines: Machines, metrics: list[str], own: int, epochs: int) -> dict[str, float]:
    """The fleet model on Ray Train and `own` per-entity models as Ray tasks; one registered version."""
    import ray

    from detect.fleet import fleet_key
    from detect.sequence import AutoencoderDetector
    from train.pipeline import register_fitted
    from train.torch_train import fit_windows_with_ray_train

    t0 = time.perf_counter()
    fleet = AutoencoderDetector(epochs=epochs)
    train_w, val_w = fleet.prepare_fleet([machines.history(e) for e in range(FLEET_TRAIN)], metrics)
    fleet = fit_windows_with_ray_train(fleet, train_w, val_w, run_name="scale-fleet")
    fleet_s = time.perf_counter() - t0
    log(f"fleet model: {FLEET_TRAIN} machines, {len(train_w) + len(val_w)} windows, {fleet_s:.1f} s on Ray Train")

    @ray.remote(num_cpus=1)
    def fit_own(rows: np.ndarray) -> Any:
        import torch

        torch.set_num_threads(1)
        return AutoencoderDetector(epochs=epochs).fit(rows, metrics)

    t0 = time.perf_counter()
    rows = {entity(e): machines.history(e) for e in range(own)}
    fitted = dict(zip(rows, ray.get([fit_own.remote(r) for r in rows.values()])))
    own_s = time.perf_counter() - t0
    log(f"{own} own models: {own_s:.1f} s (Ray tasks, one fit each)")
    key = fleet_key(metrics)
    register_fitted(
        "autoencoder",
        {**fitted, key: fleet},
        {name: metrics for name in [*fitted, key]},
        rows,
        run_name="scale",
    )
    return {"fleet_train_s": round(fleet_s, 1), "own_train_s": round(own_s, 1)}


# -- the platform ------------------------------------------------------------------------------------------
def snapshot_body(rows: np.ndarray, metrics: list[str], t: int) -> bytes:
    from pydantic_core import to_json

    body = {
        "timestamp": float(t * 60),
        "rows": [{"entity": entity(e), "metrics": dict(zip(metrics, r))} for e, r in enumerate(rows.tolist())],
        "detectors": ["autoencoder"],
    }
    return to_json(body)


def post_snapshot(url: str, machines: Machines, metrics: list[str], n: int, t: int) -> tuple[float, dict]:
    """Snapshot `t` of `n` machines through the fleet route: (seconds, answer); every row must be scored."""
    seconds, answer = post(url, snapshot_body(machines.rows(t, n), metrics, t))
    if answer["scored"] != n:
        raise RuntimeError(f"snapshot {t}: {answer['scored']} of {n} rows scored: {answer['rejected'][:3]}")
    return seconds, answer


def post(url: str, body: bytes) -> tuple[float, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, answer


def process_rss_mb() -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """RSS (MB) of every Serve replica and drift monitor of this cluster, by actor, and its parts
    (`rss_parts_mb`)."""
    import psutil

    out, parts = {}, {}
    for kind, process in raywatch_processes():
        try:
            rss = process.memory_info().rss / 2**20
        except psutil.Error:
            continue
        label = f"{kind}#{process.pid}"
        out[label] = round(rss, 1)
        parts[label] = rss_parts_mb(process.pid)
    return out, parts


def raywatch_processes() -> Iterator[tuple[str, Any]]:
    """(kind, psutil.Process) of every live Serve replica of the raywatch app (kind: its deployment) and drift
    monitor actor (kind: its class)."""
    import psutil  # Ray's vendored copy: importable once ray is
    from ray.util.state import list_actors

    for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        name = actor.class_name or ""
        if not actor.pid or not (name.startswith("ServeReplica:raywatch") or "Monitor" in name):
            continue
        try:
            process = psutil.Process(actor.pid)
        except psutil.Error:  # gone since the listing
            continue
        yield name.removeprefix("ServeReplica:raywatch:"), process


def replica_cpu_s(processes: list[tuple[str, Any]]) -> dict[str, float]:
    """CPU seconds (user + system) each kind among `processes` ((kind, psutil.Process) of the Serve replicas
    and drift monitors, `raywatch_processes`) has used so far, summed over its processes: what a snapshot
    costs each process, whatever runs beside it on the machine."""
    import psutil

    out: dict[str, float] = {}
    for kind, process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        out[kind] = out.get(kind, 0.0) + times.user + times.system
    return out


def wait_quiet(processes: list[tuple[str, Any]], timeout_s: float = 10.0) -> None:
    """Until the replicas and monitors use under a fifth of a core over QUIET_S (the last snapshot's rows
    handed to the monitors and tested, its memory trimmed): as between two scrapes 15 s apart, which is
    where each measured snapshot and the control's come in."""
    deadline = time.monotonic() + timeout_s
    before = sum(replica_cpu_s(processes).values())
    while time.monotonic() < deadline:
        time.sleep(QUIET_S)
        now = sum(replica_cpu_s(processes).values())
        if now - before < 0.2 * QUIET_S:
            return
        before = now
    log(f"the replicas were still busy {timeout_s:.0f} s after a snapshot")


def measure_platform(
    serve: Any,
    machines: Machines,
    metrics: list[str],
    n: int,
    warmup: int,
    measured: int,
    workdir: Path,
    in_ingress: list[str],
    lru: int,
) -> dict[str, Any]:
    """The platform's figures for N machines, and the in-process control's (`InProcessControl`): each
    measured snapshot is scored by the control right after the platform answered it."""
    from serve.app import build_app
    from serve.memory import TRIM_DELAY_S, TRIM_EVERY_S

    base = f"http://127.0.0.1:{SERVE_PORT}"
    t0 = time.perf_counter()
    app = build_app(
        {
            "state_dir": str(workdir / f"state-{n}"),
            "monitor": {"config": {"retrain": False, "concept_every_s": 3600}},
            "in_ingress": in_ingress,
            "models_per_replica": lru,
        }
    )
    serve.run(app, name="raywatch", route_prefix="/")
    wait_http(f"{base}/readyz", lambda body: bool(body.get("detectors", {}).get("autoencoder")))
    log(f"N={n}: app deployed in {time.perf_counter() - t0:.0f} s; {warmup} warm-up snapshots")
    url = f"{base}/v1/score/fleet"
    latencies, cpu_ms = [], {}
    for t in range(warmup):
        seconds, _ = post_snapshot(url, machines, metrics, n, t)
        if t % 50 == 0:
            log(f"N={n}: snapshot {t}: {seconds * 1000:.0f} ms")
    control = InProcessControl(machines, metrics, n, warmup)
    processes = list(raywatch_processes())
    for t in range(warmup, warmup + measured):
        wait_quiet(processes)
        cpu_before = replica_cpu_s(processes)
        latencies.append(post_snapshot(url, machines, metrics, n, t)[0])
        wait_quiet(processes)  # the CPU the snapshot cost, the monitors' testing of its rows included
        for kind, used in replica_cpu_s(processes).items():
            cpu_ms[kind] = cpu_ms.get(kind, 0.0) + (used - cpu_before.get(kind, 0.0)) * 1000 / measured
        control.step(t)
    cpu_ms = {kind: round(ms, 1) for kind, ms in cpu_ms.items()}
    cold = []
    for j in range(5):  # machines never seen: scored by the fleet model on their first request
        row = machines.rows(warmup + measured, n)[j % n]
        body = json.dumps({"rows": [{"entity": f"scale/new-{n}-{j}", "metrics": dict(zip(metrics, row.tolist()))}]})
        seconds, answer = post(f"{base}/v1/score", body.encode())
        assert "autoencoder" in answer["results"][0]["detectors"], answer
        cold.append(seconds * 1000)
    models = json.loads(urllib.request.urlopen(f"{base}/v1/models", timeout=60).read())["models"]
    loaded = len(models["autoencoder"]["models_held"])
    time.sleep(TRIM_EVERY_S + TRIM_DELAY_S + 1)  # the trim after the last snapshot: RSS between scrapes
    rss, rss_parts = process_rss_mb()
    ms = np.array(latencies) * 1000
    return {
        **control.figures(),
        "snapshot_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "snapshot_p99_ms": round(float(np.percentile(ms, 99)), 1),
        "snapshot_rows_per_s": round(n * len(latencies) / sum(latencies), 1),
        "cold_start_ms": round(statistics.median(cold), 1),
        "models_loaded_per_replica": loaded,
        "replica_cpu_ms_per_snapshot": cpu_ms,  # by replica kind, over the measured snapshots
        "rss_mb": rss,
        "rss_parts_mb": rss_parts,
        "replica_rss_mb": max(v for k, v in rss.items() if "Monitor" not in k),
        "ingress_rss_mb": max(v for k, v in rss.items() if k.startswith("RaywatchAPI")),
        "monitor_rss_mb": max([v for k, v in rss.items() if "Monitor" in k], default=None),
    }


# -- in process --------------------------------------------------------------------------------------------
class InProcessControl:
    """The champion's models scoring the platform's snapshots here, with the ingress's bookkeeping: each
    machine's last rows, and for fleet-scored ones the statistics and their place (detect/fleet.py). It
    scores each measured snapshot right after the platform has answered it (`step`), so that both figures
    come from the same minutes of a machine whose speed drifts (one run had its in-process time per
    1,000-machine snapshot at 322 ms, the next at 761 ms). Each model's items are scored SNAPSHOT_CHUNK at a
    time, as the ingress sends them to a replica: scored in one call, 9,900 fleet-scored machines' windows
    made float64 temporaries of about 150 MB a step, and in two runs the control spent 1.1-1.5 s a 10,000-
    machine snapshot (0.3-0.4 s in a process of its own), most of it on the line that makes them. It also
    records its system CPU time and page faults per step, so that a run shows such a cost."""

    def __init__(self, machines: Machines, metrics: list[str], n: int, warmup: int) -> None:
        from detect.fleet import Sampler, fleet_key
        from serve.detectors import load_models
        from serve.history import HISTORY_ROWS

        loaded = load_models("autoencoder")
        fleet = loaded[fleet_key(metrics)]
        self.machines, self.n, self.seconds, self.sys_ms, self.faults = machines, n, [], [], []
        self.models = [loaded.get(entity(e)) or fleet for e in range(n)]
        warm = machines.span(n, 0, warmup)  # (n, warmup, M)
        self.history = [warm[e, -HISTORY_ROWS:] for e in range(n)]
        self.samplers = {}
        for e in range(n):
            if self.models[e] is fleet:
                self.samplers[e] = Sampler(len(metrics))
                self.samplers[e].add(warm[e])

    def step(self, t: int) -> None:
        """Score snapshot `t` (the next one after the last scored) and time it."""
        from detect.fleet import MAX_WINDOW
        from serve.app import SNAPSHOT_CHUNK
        from serve.history import HISTORY_ROWS

        rows = self.machines.rows(t, self.n)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        groups: dict[int, tuple[Any, list]] = {}
        for e in range(self.n):
            model = self.models[e]
            context = self.history[e][-model.context_rows :]
            item_rows = np.concatenate([context, rows[e : e + 1]])
            if e in self.samplers:
                before = self.samplers[e].rows
                stats = self.samplers[e].add(rows[e : e + 1])
                offset = before + 1 - len(item_rows)
                item = (item_rows, 1, (stats.for_windows_from(offset - MAX_WINDOW + 1), offset))
            else:
                item = (item_rows, 1)
            groups.setdefault(id(model), (model, []))[1].append(item)
            self.history[e] = np.concatenate([self.history[e][1 - HISTORY_ROWS :], rows[e : e + 1]])
        for model, items in groups.values():
            for at in range(0, len(items), SNAPSHOT_CHUNK):
                model.score_arrays(items[at : at + SNAPSHOT_CHUNK])
        self.seconds.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.sys_ms.append((after.ru_stime - usage.ru_stime) * 1000)
        self.faults.append(after.ru_minflt - usage.ru_minflt)

    def figures(self) -> dict[str, Any]:
        return {  # at N <= --own every machine has a model of its own: none is fleet-scored
            "inprocess_fleet_scored": len(self.samplers),
            "inprocess_rows_per_s": round(self.n * len(self.seconds) / sum(self.seconds), 1),
            "inprocess_p50_ms": round(float(np.percentile(np.array(self.seconds) * 1000, 50)), 1),
            "inprocess_ms": [round(s * 1000, 1) for s in self.seconds],  # each measured snapshot's, in order
            "inprocess_sys_ms": [round(ms, 1) for ms in self.sys_ms],  # its system CPU time (page faults...)
            "inprocess_page_faults": self.faults,  # minor page faults during each step
        }


# -- the run -----------------------------------------------------------------------------------------------
def write_results(records: list[dict[str, Any]], trained: dict[str, float], args: argparse.Namespace) -> None:
    md = [
        "# Scale: fleets of N synthetic machines on one Serve app",
        "",
        f"`python benchmarks/scale.py --sizes {','.join(map(str, args.sizes))}"
        f"{' --in-ingress ' + ','.join(args.in_ingress) if args.in_ingress else ''}`: high-throughput mode, "
        f"{args.own} machines with a model of their own, the rest scored by the fleet model from their first "
        f"row; {args.warmup} warm-up snapshots, then {args.measured} measured ones per N; "
        f"load average {load_average()}. The fleet model took {trained['fleet_train_s']} s on Ray Train "
        f"({FLEET_TRAIN} machines x {TRAIN_ROWS} rows), the {args.own} own models {trained['own_train_s']} s."
        + (
            f" `in_ingress: {args.in_ingress}`: the ingress replica runs those models itself, with no call to a"
            " detector deployment (its RSS then holds them)."
            if args.in_ingress
            else ""
        ),
        "",
        "| N | snapshot p50 ms | p99 ms | rows/s (platform) | rows/s (in process) | ratio | cold start ms "
        "| largest replica MB | ingress MB (anon / shmem) | monitor MB | models per replica (LRU capacity) "
        "| CPU ms a snapshot: ingress / autoencoder replica / drift monitors / in process |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        md.append(
            f"| {r['entities']:,} | {r['snapshot_p50_ms']} | {r['snapshot_p99_ms']} | {r['snapshot_rows_per_s']:,} "
            f"| {r['inprocess_rows_per_s']:,} | {r['snapshot_rows_per_s'] / r['inprocess_rows_per_s']:.2f} "
            f"| {r['cold_start_ms']} | {r['replica_rss_mb']} | {r['ingress_rss_mb']} ({ingress_parts(r)}) "
            f"| {r['monitor_rss_mb']} "
            f"| {r['models_loaded_per_replica']} ({r['lru_capacity']}) | {cpu_parts(r)} |"
        )
    save_tables(results_name(args.in_ingress), records, md, show=True)


def cpu_parts(record: dict[str, Any]) -> str:
    """CPU a measured snapshot cost the ingress, the autoencoder replica and the drift monitors, beside the
    in-process control's time for the same rows (one thread: its time is its CPU)."""
    cpu = record.get("replica_cpu_ms_per_snapshot", {})
    monitors = sum(ms for kind, ms in cpu.items() if "Monitor" in kind) if cpu else "?"
    return (
        f"{cpu.get('RaywatchAPI', '?')} / {cpu.get('AutoencoderDetector', '?')} / {monitors}"
        f" / {record['inprocess_p50_ms']}"
    )


def ingress_parts(record: dict[str, Any]) -> str:
    """The ingress replica's own heap and touched shared memory (`rss_parts_mb`), as "anon / shmem"."""
    label = max((k for k in record["rss_mb"] if k.startswith("RaywatchAPI")), key=record["rss_mb"].get)
    parts = record.get("rss_parts_mb", {}).get(label, {})
    return f"{parts.get('anon', '?')} / {parts.get('shmem', '?')}"


def results_name(in_ingress: list[str]) -> str:
    """scale.{json,md} for the app as shipped; scale_in_ingress.{json,md} with models in the ingress."""
    return "scale_in_ingress" if in_ingress else "scale"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--own", type=int, default=OWN, help="machines with a model of their own")
    parser.add_argument(
        "--warmup", type=int, default=300, help="snapshots before the measured ones (300: every machine grown)"
    )
    parser.add_argument("--measured", type=int, default=20, help="timed snapshots per N")
    parser.add_argument(
        "--lru",
        type=int,
        default=ServeSettings().models_per_replica,
        help="models a detector replica holds (models_per_replica); it must cover the own models and fleet model",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", default="runs/bench-scale")
    parser.add_argument(
        "--in-ingress",
        default="",
        type=lambda s: [k for k in s.split(",") if k],
        help="detector kinds the ingress runs itself (no hop), e.g. autoencoder; results in scale_in_ingress.*",
    )
    args = parser.parse_args(argv)
    workdir = use_workdir(args.workdir)
    metrics = metric_names()
    # the fleet model trains on FLEET_TRAIN machines and --own get models of their own, whatever the sizes
    machines = Machines(max(*args.sizes, FLEET_TRAIN, args.own) + 10, metrics)
    records = []
    with local_serve("high_throughput", workdir) as serve:
        trained = train_models(machines, metrics, args.own, args.epochs)
        for n in args.sizes:
            record = {"entities": n, "lru_capacity": args.lru, "in_ingress": args.in_ingress, **trained}
            record.update(
                measure_platform(
                    serve, machines, metrics, n, args.warmup, args.measured, workdir, args.in_ingress, args.lru
                )
            )
            log(f"N={n}: {json.dumps({k: v for k, v in record.items() if k != 'rss_mb'})}")
            records.append(record)
            serve.delete("raywatch")
    write_results(records, trained, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
