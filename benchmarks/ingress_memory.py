"""What the ingress keeps per machine, and what it costs in resident memory: no Serve, no Ray.

The ingress replica's per-entity state (`serve.history`: `EntityHistory`, `ColdStarts`, `AlertBook`) is
driven as `RaywatchAPI._score_entities` drives it for machines a fleet model scores, one row per machine per
snapshot, and measured two ways:

- **live bytes per machine** (tracemalloc, the objects still referenced after `--snapshots` snapshots of
  `--small` machines), with the allocation sites that hold them;
- **RssAnon growth** (`/proc/self/status`, after `gc.collect()` and `malloc_trim(0)`, as the replica trims
  after a big request) for `--large` machines: once with the state alone, once with the objects a request
  makes around it (the parsed rows, the detector items and answers, the response rows, the monitor feed's
  columns), freed after each snapshot. The gap between live bytes and RSS is memory the allocators cannot give
  back: pages that a few long-lived objects, made while a request's short-lived ones were about, keep.

`python benchmarks/ingress_memory.py` (about 6 minutes on 2 cores; `make bench-ingress-memory`) writes
benchmarks/results/ingress_memory.{json,md}. `benchmarks/scale.py` measures the replica itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from serving import log, rss_parts_mb, save_tables

from detect.sequence import SequenceConfig

METRICS = 8
DETECTOR = "autoencoder"
CONTEXT = SequenceConfig().window - 1  # rows the fleet autoencoder reads before a new row (the shipped window)


def _rss_anon_mb() -> float:
    return rss_parts_mb().get("anon", float("nan"))  # nan: not Linux


def _trim() -> None:
    from serve.memory import libc_malloc_trim

    gc.collect()
    trim = libc_malloc_trim()
    if trim is not None:
        trim(0)


def drive(machines: int, snapshots: int, with_requests: bool, on_state=None) -> dict[str, Any]:
    """Feed `snapshots` snapshots of `machines` fleet-scored machines through the ingress's state, as
    `_score_entities` does; with `with_requests`, a request's own objects are made around each snapshot's
    updates and freed after it. Calls `on_state(state)` once the state exists (tracemalloc's baseline)."""
    from detect.fleet import MAX_WINDOW
    from monitoring.served import ServedColumnsBuilder
    from serve.history import AlertBook, ColdStarts, EntityHistory
    from serve.schemas import row_thresholds

    rng = np.random.default_rng(0)
    metrics = [f"m{i}" for i in range(METRICS)]
    names = [f"scale/machine-{e}" for e in range(machines)]
    history, cold, alerts = EntityHistory(), ColdStarts(), AlertBook()
    if on_state:
        on_state()
    _trim()
    start = _rss_anon_mb()
    for t in range(snapshots):
        values = rng.normal(size=(machines, METRICS))
        stamp = f"2026-12-03T00:00:{t:06d}Z"
        parsed = None
        if with_requests:  # the request body, parsed: one dict per row, with its own timestamp string
            body = json.dumps(
                {
                    "rows": [
                        {"entity": n, "timestamp": stamp, "metrics": dict(zip(metrics, x))}
                        for n, x in zip(names, values.tolist())
                    ]
                }
            )
            parsed = json.loads(body)["rows"]
        request_objects, served, planned = [], ServedColumnsBuilder(), []
        for e, entity in enumerate(names):
            new = values[e : e + 1]
            timestamp = parsed[e]["timestamp"] if parsed else stamp
            stats, first = cold.admit(entity, new)
            rows = history.context_and_new(entity, new, CONTEXT)
            needed = stats.for_windows_from(first + 1 - len(rows) - MAX_WINDOW + 1)
            top = np.argsort(-np.abs(new), axis=1)[:, :3]
            arrays = {
                "scores": np.abs(rng.normal(size=1)),
                "threshold": 2.0,
                "top": top,
                "top_values": np.abs(new)[0, top[0]][None],
                "metrics": metrics,
                "attribution_half_life_rows": 8,
            }
            arrays["threshold"] = cold.threshold(DETECTOR, entity, arrays["scores"], arrays["threshold"])
            kept = (rows, needed) if with_requests else (None, None)  # state alone: no request's objects
            planned.append((entity, new, timestamp, *kept, arrays))
        calls = [(DETECTOR, entity, arrays, [timestamp], None) for entity, _, timestamp, _, _, arrays in planned]
        book = alerts.observe_many(calls)  # one pass, as served
        for (entity, new, timestamp, rows, needed, arrays), observed in zip(planned, book):
            arrays["alerts"], arrays["threshold"] = observed
            if with_requests:  # the detector item, its answer, the response row, the monitor feed's columns
                item = {"entity": entity, "path": "champion", "rows": rows[-(CONTEXT + 1) :], "n_new": 1}
                item["stats"] = (needed.rows, needed.values)
                score = float(arrays["scores"][0])
                result = {"score": score, "threshold": float(arrays["threshold"]), "path": "champion"}
                result["top_metrics"] = [metrics[j] for j in arrays["top"][0]]
                response = {"entity": entity, "timestamp": timestamp, "detectors": {DETECTOR: result}}
                thresholds = row_thresholds(arrays)
                served.add(DETECTOR, entity, [timestamp], new, "champion", arrays["scores"], thresholds)
                request_objects.append((item, dict(arrays), response))
        monitor_rows = served.batches()  # queued until the monitor takes them: freed with the request here
        del request_objects, parsed, served, monitor_rows, planned, calls, book
        _trim()
    return {"rss_anon_growth_mb": round(_rss_anon_mb() - start, 1), "state": (history, cold, alerts)}


def live_bytes(machines: int, snapshots: int) -> dict[str, Any]:
    """tracemalloc's live bytes per machine after the snapshots, and the five largest allocation sites."""
    tracemalloc.start(1)
    baseline: list[tracemalloc.Snapshot] = []
    out = drive(machines, snapshots, False, lambda: baseline.append(tracemalloc.take_snapshot()))
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    del out
    root = str(Path(__file__).resolve().parent.parent)
    sites = [
        (str(s.traceback).removeprefix(root + "/"), round(s.size_diff / machines))
        for s in snapshot.compare_to(baseline[0], "lineno")[:6]
        if s.size_diff > 0 and "ingress_memory.py" not in str(s.traceback)
    ]
    total = sum(s.size_diff for s in snapshot.compare_to(baseline[0], "filename"))
    return {"bytes_per_machine": round(total / machines), "largest_sites": sites[:5]}


def _anon_growth(machines: int, snapshots: int, with_requests: bool, queue) -> None:
    queue.put(drive(machines, snapshots, with_requests)["rss_anon_growth_mb"])


def anon_growth(machines: int, snapshots: int, with_requests: bool) -> float:
    """RssAnon growth in a fresh process (nothing of the other runs in its heap)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_anon_growth, args=(machines, snapshots, with_requests, queue))
    process.start()
    growth = queue.get()
    process.join()
    return growth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1_000, help="machines for the live-bytes count")
    parser.add_argument("--large", type=int, default=10_000, help="machines for the RSS growth")
    parser.add_argument("--snapshots", type=int, default=300, help="rows per machine (every one grown at 300)")
    args = parser.parse_args(argv)
    started = time.time()
    log(f"live bytes: {args.small} machines x {args.snapshots} snapshots")
    live = live_bytes(args.small, args.snapshots)
    growth = {}
    for with_requests in (False, True):
        log(f"RssAnon growth: {args.large} machines x {args.snapshots} snapshots, request objects {with_requests}")
        growth[with_requests] = anon_growth(args.large, args.snapshots, with_requests)
    record = {
        "metrics": METRICS,
        "snapshots": args.snapshots,
        "live_machines": args.small,
        "live_bytes_per_machine": live["bytes_per_machine"],
        "largest_sites": live["largest_sites"],
        "rss_machines": args.large,
        "rss_anon_growth_state_mb": growth[False],
        "rss_anon_growth_with_requests_mb": growth[True],
        "live_state_mb_at_rss_machines": round(live["bytes_per_machine"] * args.large / 2**20, 1),
        "seconds": round(time.time() - started),
    }
    md = [
        "# The ingress's per-machine state: live bytes and resident memory",
        "",
        f"`python benchmarks/ingress_memory.py`: {METRICS} metrics, {args.snapshots} snapshots (one row per machine "
        "each), every machine scored by a fleet model (the state `serve.history` keeps for it).",
        "",
        "| live bytes per machine | live state at "
        f"{args.large:,} machines MB | RssAnon growth, state alone MB | RssAnon growth, with request objects MB |",
        "|---|---|---|---|",
        f"| {record['live_bytes_per_machine']:,} | {record['live_state_mb_at_rss_machines']} "
        f"| {growth[False]} | {growth[True]} |",
        "",
        "Largest allocation sites (bytes per machine):",
        "",
        *[f"- `{site}`: {size:,}" for site, size in live["largest_sites"]],
    ]
    save_tables("ingress_memory", record, md, show=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
