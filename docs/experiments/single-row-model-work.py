"""Where a single-row ensemble call's model work goes, in process: the whole call, per row in batches, and
each evidence graph over the 30 rows it scores against the one new row (docs/experiments/single-row-knobs.md,
section 4).

    .venv/bin/python docs/experiments/single-row-model-work.py [--store sqlite:////tmp/bench-serve/mlflow.db]

It reads the ensemble champion that `benchmarks/serving.py prepare --workdir /tmp/bench-serve` registered.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import detect.evidence as E  # noqa: E402
from serve import detectors as D  # noqa: E402
from train import registry  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--store", default="sqlite:////tmp/bench-serve/mlflow.db")
registry.use_store(parser.parse_args().store)
slot = D.load_slot("ensemble", "champion")
key = "smd/machine-1-6" if "smd/machine-1-6" in slot.entities else list(slot.entities)[0]
m = D.entity_model(slot, key)
rt = m.runtime
ctx = m.context_rows
print("key", key, "context_rows", ctx, "CONTEXT", E.CONTEXT, type(rt).__name__)
X = np.random.default_rng(0).normal(size=(200, len(m.metrics)))


def call_ms(runtime, items, reps=400):
    """Mean ms of `runtime.score_tails(items)` over `reps` calls, after one to warm up."""
    runtime.score_tails(items)
    start = time.perf_counter()
    for _ in range(reps):
        runtime.score_tails(items)
    return (time.perf_counter() - start) / reps * 1e3


rows = X[-(ctx + 1) :]
print(f"single row, as served: {call_ms(rt, [(rows, 1)]):.3f} ms")
for b in (8, 64):
    print(f"batch of {b} single rows: {call_ms(rt, [(rows, 1)] * b, 100) / b:.3f} ms per row")
# evidence graphs alone: the span a single row's call scores (the row and CONTEXT rows before it) against the row
for (ert, _), name in zip(rt.evidence, m.detector.config.evidence):
    k = min(1 + E.CONTEXT, len(rows))
    full = call_ms(ert, [(rows, k)])
    one = call_ms(ert, [(rows, 1)])
    print(f"  {name}: {k} rows {full:.3f} ms, 1 row {one:.3f} ms")
