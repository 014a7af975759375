"""The ingress's alert book on a fleet snapshot: each entity's row on its own against all of them in one pass.

For every machine of a snapshot the ingress feeds its detectors' scores to `serve.history.AlertBook`: k-of-n
alert grouping and the held root-cause attribution (`detect.attribution`). Per (detector, entity), that was
one `AlertBook.observe` call with a Python loop over the metrics; `AlertBook.observe_many` (what
`RaywatchAPI._score_entities` calls since 2026-12-06) holds every entity's one row in one numpy pass. Both
are driven here with the same snapshots (one row per machine, three top metrics from the detector, a
60-row half-life as served), in one process, one after the other per size: CPU milliseconds per snapshot
(`time.process_time`) and the ratio. No Serve, no Ray: this is the ingress's bookkeeping alone
(`benchmarks/scale.py` measures the replica).

    python benchmarks/alert_book.py [--machines 2000,10000] [--metrics 8,38]   # or: make bench-alert-book

Writes benchmarks/results/alert_book.{json,md}. 38 metrics is an SMD machine's schema, 8 the scale benchmark's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
from serving import log, save_tables

from detect.attribution import HALF_LIFE_ROWS

DETECTOR = "autoencoder"
TOP = 3  # top metrics a detector replica sends per row


def snapshots(machines: int, metrics: int, count: int, seed: int = 0) -> list[list[tuple]]:
    """`count` snapshots of (detector, entity, arrays, timestamps, spot) calls, one row per machine, scored
    like a detector's answers: exponential scores (a few above the threshold), three top metrics each."""
    rng = np.random.default_rng(seed)
    names = [f"m{j}" for j in range(metrics)]
    out = []
    for t in range(count):
        scores = rng.exponential(0.6, machines)
        top = np.argsort(rng.random((machines, metrics)), axis=1)[:, :TOP]
        values = rng.exponential(1.0, (machines, TOP))
        calls = []
        for e in range(machines):
            arrays = {
                "scores": scores[e : e + 1],
                "threshold": 2.0,
                "probability": None,
                "metrics": names,
                "top": top[e : e + 1],
                "top_values": values[e : e + 1],
                "attribution_half_life_rows": HALF_LIFE_ROWS,
            }
            calls.append((DETECTOR, f"fleet/machine-{e}", arrays, [t], None))
        out.append(calls)
    return out


def per_entity(book: Any, calls: list[tuple]) -> list:
    return [book.observe(*call) for call in calls]


def one_pass(book: Any, calls: list[tuple]) -> list:
    return book.observe_many(calls)


def cpu_ms_per_snapshot(feed, machines: int, metrics: int, count: int) -> tuple[float, list]:
    """Median CPU ms a snapshot costs the alert book (the first `count // 4` snapshots warm it up and are
    not counted), and what it answered to the last one (the two ways must agree)."""
    from serve.history import AlertBook

    book, spent, answers = AlertBook(), [], []
    for calls in snapshots(machines, metrics, count):
        started = time.process_time()
        answers = feed(book, calls)
        spent.append((time.process_time() - started) * 1000)
    return statistics.median(spent[count // 4 :]), answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", default="2000,10000", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--metrics", default="8,38", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--snapshots", type=int, default=40)
    args = parser.parse_args(argv)
    records = []
    for machines in args.machines:
        for metrics in args.metrics:
            log(f"{machines} machines x {metrics} metrics: {args.snapshots} snapshots each way")
            control, expected = cpu_ms_per_snapshot(per_entity, machines, metrics, args.snapshots)
            batched, got = cpu_ms_per_snapshot(one_pass, machines, metrics, args.snapshots)
            if repr(got) != repr(expected):
                raise SystemExit("the one-pass alert book answered differently from the per-entity one")
            records.append(
                {
                    "machines": machines,
                    "metrics": metrics,
                    "per_entity_ms": round(control, 1),
                    "one_pass_ms": round(batched, 1),
                    "ratio": round(batched / control, 2),
                    "per_machine_us_saved": round((control - batched) * 1000 / machines, 1),
                }
            )
    md = [
        "# The ingress's alert book on a fleet snapshot: per entity against one pass",
        "",
        f"`python benchmarks/alert_book.py` ({time.strftime('%Y-%m-%d %H:%M')}): median CPU ms per snapshot "
        f"of the last {args.snapshots - args.snapshots // 4} of {args.snapshots}, one row per machine, "
        "`AlertBook.observe` per machine (the control) and `AlertBook.observe_many` over the snapshot, "
        "in one process.",
        "",
        "| machines | metrics | per entity ms | one pass ms | ratio | us saved per machine |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['machines']:,} | {r['metrics']} | {r['per_entity_ms']} | {r['one_pass_ms']} | {r['ratio']} "
            f"| {r['per_machine_us_saved']} |"
            for r in records
        ],
    ]
    save_tables("alert_book", records, md, show=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
