"""Compression benchmark: every variant of every detector, side by side, in one process and one run.

For each model (its registered champion; trained first if the registry has none) this runs the
compression step without registering anything, then measures each variant's ONNX Runtime speed on
the same 1,000-row batch of smd/machine-1-6 test data (one intra-op thread, CPU), and reports size
on disk (all entities), mean F1 / PR-AUC over the shipped entities and retention against the FP32
model (INT8) or the teacher (student).

    python benchmarks/compression.py [--workdir runs/bench] [--models autoencoder,lstm,ensemble]

writes benchmarks/results/compression.json (rows: model, variant, size_bytes, rows_per_s, p50_ms,
f1, pr_auc, retention, ...) and benchmarks/results/compression.md.
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
SPEED_ENTITY = "smd/machine-1-6"
BATCH = 1000
REPEATS = 30


def machine() -> str:
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def time_batch(fn) -> tuple[float, float]:
    """(rows/s, p50 ms) of scoring one BATCH-row batch, median of REPEATS runs after a warm-up."""
    fn()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    p50 = float(np.median(times))
    return BATCH / p50, p50 * 1000


def bench_model(model: str, data_dir: str | None) -> list[dict]:
    from detect.data import load_series
    from train import registry
    from train.compress import compress_model
    from train.kinds import kind_named, runtime_for
    from train.pipeline import train_model

    if registry.alias_version(model, registry.CHAMPION) is None:
        print(f"{model}: no champion in {registry.tracking_uri()}, training one", file=sys.stderr)
        train_model(model, data_dir, progress=lambda m: print(m, file=sys.stderr))
    variants = tuple(v for v in ("int8", "student") if v in kind_named(model).compressions)
    result = compress_model(
        model,
        data_dir=data_dir,
        variants=variants,
        register=False,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    bundle, _ = registry.load_bundle(model, "champion")
    det = bundle.detectors[SPEED_ENTITY]
    dataset, entity = SPEED_ENTITY.split("/")
    series = load_series(dataset, entity, data_dir)
    test = series.test[series.metrics].to_numpy()[:BATCH]
    rows = []
    for variant, figures in result["summary"].items():
        runtime = runtime_for(det, result["graphs"][variant][SPEED_ENTITY])
        inputs = runtime.graph_inputs(test)
        rate, p50 = time_batch(lambda r=runtime, x=inputs: r.run_graphs(x))
        retention = figures.get("retention")
        rows.append(
            {
                "model": model,
                "variant": variant,
                "size_bytes": figures["size_bytes"],
                "rows_per_s": round(rate),
                "p50_ms": round(p50, 3),
                "f1": figures["f1"],
                "pr_auc": figures["pr_auc"],
                "retention": min(retention.values()) if retention else 1.0,
                "retention_f1": retention["f1"] if retention else 1.0,
                "retention_pr_auc": retention["pr_auc"] if retention else 1.0,
                "gate_passed": result["decisions"].get(variant, {}).get("passed"),
                "source_version": result["source_version"],
            }
        )
    base = rows[0]
    for row in rows:
        row["size_ratio"] = round(base["size_bytes"] / row["size_bytes"], 2)
        row["speedup"] = round(row["rows_per_s"] / base["rows_per_s"], 2)
    return rows


def markdown(rows: list[dict]) -> str:
    head = [
        "model",
        "variant",
        "size_bytes",
        "smaller",
        "rows_per_s",
        "speedup",
        "p50_ms",
        "f1",
        "pr_auc",
        "retention_f1",
        "retention_pr_auc",
        "gate",
    ]
    lines = [
        f"Compression, measured on {machine()} ({time.strftime('%Y-%m-%d')}).",
        f"Speed: ONNX Runtime, CPU, 1 thread, {BATCH}-row batches of {SPEED_ENTITY} test data, median of {REPEATS}.",
        "Quality: mean over the shipped entities (ensemble: held-back second halves). Retention: vs FP32 (int8) "
        "or vs the teacher (student).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        gate = "–" if r["gate_passed"] is None else ("pass" if r["gate_passed"] else "fail")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['size_bytes']:,} | {r['size_ratio']}x | {r['rows_per_s']:,} | "
            f"{r['speedup']}x | {r['p50_ms']} | {r['f1']:.3f} | {r['pr_auc']:.3f} | {r['retention_f1']:.1%} | "
            f"{r['retention_pr_auc']:.1%} | {gate} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench", help="where the benchmark's MLflow store and Ray runs live")
    parser.add_argument("--models", default="autoencoder,lstm,ensemble")
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    data_dir = str(Path(args.data).resolve()) if args.data else None
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # its own mlflow.db and runs/, unless MLFLOW_TRACKING_URI says otherwise
    from train.jobs import init_ray

    init_ray()
    rows = []
    for model in args.models.split(","):
        rows += bench_model(model.strip(), data_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "compression.md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"wrote {RESULTS / 'compression.json'} and {RESULTS / 'compression.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
