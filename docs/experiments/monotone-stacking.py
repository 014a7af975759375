"""The ensemble stacked on the sequence detectors' evidence, with and without monotone members, against the
window-feature ensemble and the detectors themselves (docs/experiments/monotone-stacking.md).

    .venv/bin/python docs/experiments/monotone-stacking.py [--data data] [--out FILE.json]   # ~6 min, 2 cores

Every variant is judged on the second half of each test series (the rows no variant learns from), by
PR-AUC, as `raywatch evaluate` judges the ensemble (`pr_auc_second_half`). The supervised variants learn
from the first half's labels; the evidence detectors (autoencoder, LSTM) from the train series.

- `autoencoder`, `lstm`: the detectors as `raywatch evaluate` fits them (train series);
- `window`: the ensemble over window features (`evidence=()`, served before the stacking);
- `stacked`: the ensemble as shipped now: members over the evidence (detect/evidence.py), monotone;
- `stacked_free`: the same columns, members unconstrained (the monotone constraints off);
- `stacked_inject`: `stacked` with incidents injected into the first half's normal rows whatever its labels
  hold (the shipped rule injects only where they hold fewer than two).

Two sets of entities: the six shipped ones (five with an incident in the second half) and two synthetic
fleets of three machines (`benchmarks/attribution.py`'s; held out: no choice here was made on them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attribution import shipped_cases, synthetic_cases  # noqa: E402

import detect.evidence as E  # noqa: E402
import detect.metrics as M  # noqa: E402
from detect.ensemble import EnsembleDetector  # noqa: E402
from detect.evaluate import detector_factories  # noqa: E402
from detect.synthetic import inject_incidents  # noqa: E402

VARIANTS = ("autoencoder", "lstm", "window", "stacked", "stacked_free", "stacked_inject")


def injected_everywhere(rows: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rows with incidents injected where no labelled incident is, one per 1,000 rows (at least 4)."""
    injected_rows, injected = inject_incidents(rows, max(4, len(rows) // 1000), seed=seed)
    real = np.asarray(labels).astype(bool)
    injected = injected.astype(bool) & ~real
    return np.where(injected[:, None], injected_rows, rows), (real | injected).astype(np.int8)


def stacked(first: np.ndarray, labels: np.ndarray, case: dict, monotone: bool = True) -> EnsembleDetector:
    E.MONOTONE = 1 if monotone else 0
    try:
        return EnsembleDetector().fit(first, labels, case["metrics"], normal=case["train"])
    finally:
        E.MONOTONE = 1


def measure(case: dict) -> dict | None:
    test, labels = case["test"], case["labels"]
    half = len(test) // 2
    if not labels[half:].any():
        return None
    t0 = time.perf_counter()
    factories = detector_factories()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = {name: factories[name]().fit(case["train"]).score(test) for name in ("autoencoder", "lstm")}
        first, first_labels = test[:half], labels[:half]
        scores["window"] = EnsembleDetector(evidence=()).fit(first, first_labels, case["metrics"]).score(test)
        scores["stacked"] = stacked(first, first_labels, case).score(test)
        scores["stacked_free"] = stacked(first, first_labels, case, monotone=False).score(test)
        scores["stacked_inject"] = stacked(*injected_everywhere(first, first_labels), case).score(test)
    record = {name: round(M.pr_auc(labels[half:], s[half:]), 4) for name, s in scores.items()}
    return {"entity": case["entity"], **record, "seconds": round(time.perf_counter() - t0, 1)}


def table(title: str, records: list[dict]) -> list[str]:
    lines = [f"\n{title}\n", "| entity | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for r in records:
        lines.append(f"| {r['entity']} | " + " | ".join(f"{r[v]:.3f}" for v in VARIANTS) + " |")
    means = {v: float(np.mean([r[v] for r in records])) for v in VARIANTS}
    lines.append("| **mean** | " + " | ".join(f"**{means[v]:.3f}**" for v in VARIANTS) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    parser.add_argument("--out", default=None, help="write the records as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    sets = {"shipped": shipped_cases(args.data), "held-out synthetic": synthetic_cases()}
    results = {}
    for name, cases in sets.items():
        results[name] = []
        for case in cases:
            record = measure(case)
            if record:
                print(json.dumps(record), flush=True)
                results[name].append(record)
    lines = []
    for name, records in results.items():
        lines += table(f"PR-AUC on the second halves, {name} ({len(records)} entities)", records)
    print("\n".join(lines))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
