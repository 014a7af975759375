"""The stacked ensemble's lead horizon against point-wise F1 at its served threshold (issue 19; see
docs/experiments/ensemble-threshold.md, "The lead horizon").

    .venv/bin/python docs/experiments/ensemble-horizon.py [--horizons 10,0,3] [--sets shipped,held-out,fresh]

Per entity the ensemble learns from the first half of the test series (labels) and the train series
(normal), as `raywatch evaluate` fits it, with the given `horizon` (its target: an incident under way or
starting within that many rows); its decision threshold (`detect.thresholds.decision_threshold`, chosen
on its own validation rows) is run over the second half's scores in time order, and judged there against
the incident labels. No threshold sees a label of the rows it is judged on.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attribution import shipped_cases, synthetic_cases  # noqa: E402

import detect.metrics as M  # noqa: E402
from detect.alerting import online_alerts  # noqa: E402
from detect.thresholds import DecisionThreshold  # noqa: E402

# the ensemble fitted as in ensemble-threshold.py (`fitted`), with a horizon of its own
_spec = importlib.util.spec_from_file_location("ensemble_threshold", Path(__file__).with_name("ensemble-threshold.py"))
threshold_experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(threshold_experiment)

SETS = {
    "shipped": lambda: shipped_cases(str(ROOT / "data")),
    "held-out": synthetic_cases,  # seeds 101 and 202
    "fresh": lambda: synthetic_cases((303, 404, 505)),
}


def figures(c: dict, scores: np.ndarray, threshold: float) -> tuple[float, float, float, float]:
    """(f1_operational, event precision, event recall, PR-AUC) of a fitted case's second-half `scores` at
    `threshold`, run over them in time order."""
    thresholds, alerts = online_alerts(scores, DecisionThreshold(threshold))
    recall, precision, _ = M.alert_scores(c["labels"], alerts)
    return M.f1_at(c["labels"], scores, thresholds), precision, recall, M.pr_auc(c["labels"], scores)


def judged(case: dict, horizon: int) -> tuple[float, float, float, float] | None:
    """`figures` of the ensemble fitted with `horizon` at its served threshold; None without an incident in
    the second half."""
    c = threshold_experiment.fitted(case, horizon=horizon)
    return None if c is None else figures(c, c["scores"], c["thr"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizons", default="10,0,3")
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args()
    print("| set | horizon | f1_operational | event_precision | event_recall | pr_auc | per entity f1_operational |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        cases = SETS[name]()
        for horizon in map(int, args.horizons.split(",")):
            rows = [r for r in (judged(c, horizon) for c in cases) if r is not None]
            mean = np.mean(rows, axis=0)
            per = " ".join(f"{r[0]:.2f}" for r in rows)
            print(
                f"| {name} | {horizon} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} | {per} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
