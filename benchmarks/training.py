"""Training throughput on Ray Train: the autoencoder and the LSTM through `TorchTrainer`
(`train.torch_train.fit_with_ray_train`, the path `raywatch train` takes) with 1 and 2 CPU workers,
and on a GPU when this machine has one.

    python benchmarks/training.py --workdir runs/bench-serve [--epochs 2] [--rows 12000]

Each fit runs on a fresh local Ray head with one CPU per worker (Ray sets one intra-op thread per
worker). rows_per_s is the training throughput of the whole worker group while it trains: the
windows one worker trains on per second (its epochs' mean, validation pass included), times the
number of workers (each trains on its 1/N shard, synchronised by DDP every step).
end_to_end_rows_per_s divides every trained window by the wall time of the whole fit, worker-group
start and checkpoints included. Writes benchmarks/results/training.json and training.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
from report import table
from serving import ENTITY, load_average, local_ray, log, machine, save_tables, use_workdir

MODELS = ("autoencoder", "lstm")
WORKERS = (1, 2)


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def fit(model: str, X: np.ndarray, metrics: list[str], epochs: int, workers: int, gpu: bool) -> dict[str, Any]:
    from detect.sequence import SEQUENCE_DETECTORS
    from train.torch_train import fit_with_ray_train

    det = SEQUENCE_DETECTORS[model]({"epochs": epochs})
    t0 = time.perf_counter()
    # a run name of its own each time: Ray Train resumes a run of the same name from its last
    # checkpoint, so a fixed name would replay the first benchmark's epochs instead of training
    name = f"bench-{model}-{workers}w-{time.strftime('%Y%m%d-%H%M%S')}"
    fit_with_ray_train(det, X, metrics, num_workers=workers, use_gpu=gpu, run_name=name)
    wall = time.perf_counter() - t0
    windows = len(det.prepare(X, metrics)[0])
    per_worker = float(np.mean([h["rows_per_s"] for h in det.history_]))
    return {
        "model": model,
        "workers": workers,
        "device": "gpu" if gpu else "cpu",
        "rows_per_s": round(per_worker * workers, 1),
        "end_to_end_rows_per_s": round(windows * epochs / wall, 1),
        "epochs": epochs,
        "train_windows": windows,
        "wall_s": round(wall, 1),
        "final_val_loss": round(float(det.history_[-1]["val_loss"]), 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench-serve")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12_000, help="first rows of the entity's training series")
    args = parser.parse_args(argv)
    workdir = use_workdir(args.workdir)
    from detect.data import load_series
    from train.jobs import TRAIN_POLL_ENV

    started, load_start = time.strftime("%Y-%m-%d %H:%M"), load_average()
    dataset, entity = ENTITY.split("/")
    series = load_series(dataset, entity)
    X = series.train[series.metrics].to_numpy()[: args.rows]
    gpu = gpu_name()
    runs = [(m, w, False) for m in MODELS for w in WORKERS] + ([(m, 1, True) for m in MODELS] if gpu else [])
    rows = []
    with local_ray("training", workdir, {TRAIN_POLL_ENV: "0.2"}, num_cpus=max(WORKERS)):
        for model, workers, on_gpu in runs:
            row = fit(model, X, series.metrics, args.epochs, workers, on_gpu)
            log(
                f"{model}, {workers} worker(s), {row['device']}: {row['rows_per_s']:,.0f} rows/s training, "
                f"{row['end_to_end_rows_per_s']:,.0f} rows/s end to end ({row['wall_s']} s)"
            )
            rows.append(row)
    result = {
        "machine": machine(),
        "date": started,
        "load_average": {"start": load_start, "end": load_average()},
        "setup": (
            f"{ENTITY}, first {len(X):,} training rows, default configs, {args.epochs} epochs, one CPU per worker."
        ),
        "gpu": gpu or "not measured: no GPU on this machine (the GPU path runs where Ray reports one)",
        "rows": rows,
    }
    md = [
        f"Ray Train throughput, measured on {result['machine']} ({started}).",
        "",
        f"{result['setup']} GPU: {result['gpu']}.",
        "",
        table(rows),
    ]
    save_tables("training", result, md, show=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
