"""Sweep of SPOT's risk level (and a causal smoothing of the scores) for the sequence detectors, on the
shipped entities and on held-out synthetic fleets (docs/experiments/spot-risk-level.md).

    .venv/bin/python docs/experiments/spot-risk-level.py [--data data]    # about 6 minutes on 2 cores

Each detector is fitted once per entity (as `raywatch evaluate` fits it); the scores are then judged the
way `evaluate` judges them (`operational_figures`: SPOT fitted on the validation scores, updated online
over the test scores in time order, alerts by the k-of-n rule), once per risk level and window.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attribution import synthetic_cases  # noqa: E402

import detect.metrics as M  # noqa: E402
from detect.alerting import online_alerts  # noqa: E402
from detect.data import load_benchmark  # noqa: E402
from detect.evaluate import detector_factories  # noqa: E402
from detect.thresholds import SPOT  # noqa: E402

DETECTORS = ("autoencoder", "lstm")
RISKS = (1e-3, 3e-3, 1e-2, 1.5e-2)
WINDOWS = (1, 5, 15)  # causal rolling mean of the scores (1: as served)


def shipped_cases(data: str) -> list[dict]:
    return [
        {
            "entity": s.name,
            "train": s.train[s.metrics].to_numpy(),
            "test": s.test[s.metrics].to_numpy(),
            "labels": s.labels,
        }
        for s in load_benchmark(data)
    ]


def scored(cases: list[dict]) -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per detector: (validation scores, test scores, labels) of every case."""
    factories = detector_factories()
    out: dict[str, list] = {name: [] for name in DETECTORS}
    for case in cases:
        for name in DETECTORS:
            detector = factories[name]()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                detector.fit(case["train"])
                scores = detector.score(case["test"])
            out[name].append((detector.calibration_scores_, scores, case["labels"]))
            print(f"  {case['entity']}: {name}", file=sys.stderr, flush=True)
    return out


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    return pd.Series(x).rolling(window, min_periods=1).mean().to_numpy()


def table(label: str, runs: dict[str, list]) -> str:
    lines = [
        f"\n{label}\n",
        "| detector | window | risk | f1_operational | event_precision | event_recall | alerts | f1 (best) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cases in runs.items():
        for window in WINDOWS:
            for risk in RISKS:
                rows = []
                for calibration, scores, labels in cases:
                    scores, calibration = smooth(scores, window), smooth(calibration, window)
                    thresholds, alerts = online_alerts(scores, SPOT(risk=risk).fit(calibration))
                    recall, precision, _ = M.alert_scores(labels, alerts)
                    rows.append(
                        (
                            M.f1_at(labels, scores, thresholds),
                            precision,
                            recall,
                            len(alerts),
                            M.best_f1(labels, scores)[0],
                        )
                    )
                f1, precision, recall, alerts, best = np.mean(np.array(rows, dtype=float), axis=0)
                lines.append(
                    f"| {name} | {window} | {risk:g} | {f1:.3f} | {precision:.3f} | {recall:.3f} | {alerts:.1f} | {best:.3f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    args = parser.parse_args()
    print(table("shipped entities (mean of 6)", scored(shipped_cases(args.data))))
    print(table("synthetic fleets, seeds 101 and 202 (mean of 6)", scored(synthetic_cases())))


if __name__ == "__main__":
    main()
