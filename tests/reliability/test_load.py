"""Load: the capacity of single-row, three-detector scoring measured first, then sustained load at 80%
of it (15 s in `make test`, 60 s in `make soak`): no 5xx, replica memory before and after within 20%."""

from __future__ import annotations

import os

import pytest

from .support import DEPLOYMENTS, SOAK, LoadGenerator, measure_capacity, rss_bytes, summarize

pytestmark = pytest.mark.slow

LOAD_S = float(os.environ.get("RAYWATCH_LOAD_S", 60 if SOAK else 15))
SHARE = 0.8
MEMORY_TOLERANCE = 0.20


def replica_memory(served) -> dict[int, tuple[str, int]]:
    return {a.pid: (name, rss_bytes(a.pid)) for name in DEPLOYMENTS for a in served.replicas(name)}


def test_sustained_load_at_80_percent_of_capacity(served, figures):
    capacity = measure_capacity(served, seconds=6.0, concurrency=8)  # also warms every replica up
    assert capacity["status_5xx"] == 0, capacity
    rate = SHARE * capacity["rps"]
    before = replica_memory(served)
    gen = LoadGenerator(served, rate=rate, concurrency=32).run_for(LOAD_S)
    after = replica_memory(served)
    summary = summarize(gen.outcomes)
    memory = {
        f"{name}:{pid}": {
            "before_mib": round(rss / 2**20, 1),
            "after_mib": round(after[pid][1] / 2**20, 1) if pid in after else None,
            "change": round(after[pid][1] / rss - 1, 3) if pid in after else None,
        }
        for pid, (name, rss) in before.items()
    }
    achieved = len(gen.between(gen.started, gen.started + LOAD_S)) / LOAD_S
    figures["load"] = {
        "capacity_rps": round(capacity["rps"], 1),
        "capacity_p99_ms": capacity["p99_ms"],
        "target_rps": round(rate, 1),
        "achieved_rps": round(achieved, 1),
        "seconds": LOAD_S,
        "late_sends": gen.late,
        **summary,
        "memory": memory,
    }
    assert summary["status_5xx"] == 0 and summary["no_answer"] == 0, summary
    assert summary["errors"] == 0, summary
    assert achieved >= 0.9 * rate, figures["load"]
    assert set(after) == set(before), "a replica restarted during the load"
    for key, m in memory.items():
        assert abs(m["change"]) <= MEMORY_TOLERANCE, (key, m)
