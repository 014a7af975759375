"""The stacked ensemble's probabilities smoothed in time before its decision threshold (issue 19; not merged):
a causal mean, median, minimum or exponential average of the last k scores, the threshold chosen by the
served rule (`detect.thresholds.decision_threshold`) on the validation rows' smoothed scores, and judged on
the second half's smoothed scores (docs/experiments/ensemble-score-smoothing.md).

    .venv/bin/python docs/experiments/ensemble-score-smoothing.py [--data data]   # about a minute on 2 cores

The ensemble is fitted per entity as `raywatch evaluate` fits it (`ensemble-threshold.py`'s `fitted`), on the
shipped entities, the held-out synthetic fleets (seeds 101, 202) and the fresh ones (303, 404, 505). No
threshold sees a label of the rows it is judged on.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attribution import shipped_cases, synthetic_cases  # noqa: E402

import detect.metrics as M  # noqa: E402
from detect.thresholds import decision_threshold  # noqa: E402


def _threshold_experiment():
    spec = importlib.util.spec_from_file_location(
        "ensemble_threshold", Path(__file__).with_name("ensemble-threshold.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def windows(s: np.ndarray, k: int) -> np.ndarray:
    """The last k scores at each row (the first row repeated before the start): causal, as serving would be."""
    return sliding_window_view(np.r_[np.full(k - 1, s[0]), s], k)


def ema(s: np.ndarray, a: float) -> np.ndarray:
    out, m = np.empty_like(s), s[0]
    for j, x in enumerate(s):
        m = a * x + (1 - a) * m
        out[j] = m
    return out


SMOOTHERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"none (served)": lambda s: s}
SMOOTHERS |= {f"mean of {k}": (lambda s, k=k: windows(s, k).mean(axis=1)) for k in (2, 3, 5, 8)}
SMOOTHERS |= {f"median of {k}": (lambda s, k=k: np.median(windows(s, k), axis=1)) for k in (3, 5)}
SMOOTHERS |= {f"min of {k}": (lambda s, k=k: windows(s, k).min(axis=1)) for k in (2, 3)}
SMOOTHERS |= {f"exponential, alpha {a}": (lambda s, a=a: ema(s, a)) for a in (0.5, 0.3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    args = parser.parse_args()
    fitted = _threshold_experiment().fitted
    sets = {
        "shipped": shipped_cases(args.data),
        "held-out synthetic (101, 202)": synthetic_cases(),
        "fresh synthetic (303, 404, 505)": synthetic_cases((303, 404, 505)),
    }
    judged = {name: [c for c in map(fitted, cases) if c is not None] for name, cases in sets.items()}
    print("| smoothing | " + " | ".join(f"{name} ({len(cases)})" for name, cases in judged.items()) + " |")
    print("|---" * (len(judged) + 1) + "|")
    for name, smooth in SMOOTHERS.items():
        cells = []
        for cases in judged.values():
            f1s = []
            for c in cases:
                threshold = decision_threshold(c["val_labels"], smooth(c["val_scores"])).threshold
                scores = smooth(c["scores"])
                f1s.append(M.f1_at(c["labels"], scores, np.full(len(scores), threshold)))
            cells.append(f"{np.mean(f1s):.3f} ({' '.join(f'{f:.2f}' for f in f1s)})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
