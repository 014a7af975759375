"""The stacked ensemble's operational threshold: DSPOT over its normal validation rows' tail against the
decision threshold it learnt on its labelled validation rows, and a few other label-free rules, on the
shipped entities and on held-out synthetic fleets (docs/experiments/ensemble-threshold.md).

    .venv/bin/python docs/experiments/ensemble-threshold.py [--data data]   # about a minute on 2 cores

Per entity the ensemble learns from the first half of the test series (labels) and the train series
(normal), as `raywatch evaluate` fits it; every rule is then run over the second half's scores in time order
without labels, with the alert rule and learning of `online_alerts`, and judged on the second half only.
No rule sees a label of the rows it is judged on.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attribution import shipped_cases, synthetic_cases  # noqa: E402

import detect.metrics as M  # noqa: E402
from detect.alerting import online_alerts  # noqa: E402
from detect.ensemble import EnsembleDetector  # noqa: E402
from detect.thresholds import DSPOT, SPOT, DecisionThreshold  # noqa: E402


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


#: rule -> (online threshold, the scores it judges) from (calibration scores, decision threshold, scores)
RULES = {
    "dspot (served before)": lambda cal, thr, s: (DSPOT().fit(cal), s),
    "spot": lambda cal, thr, s: (SPOT().fit(cal), s),
    "dspot over log-odds": lambda cal, thr, s: (DSPOT().fit(logit(cal)), logit(s)),
    "spot over log-odds": lambda cal, thr, s: (SPOT().fit(logit(cal)), logit(s)),
    "decision (validation F1, the normal tail where that flags most rows; served now)": lambda cal, thr, s: (
        DecisionThreshold(thr),
        s,
    ),
    "0.5": lambda cal, thr, s: (DecisionThreshold(0.5), s),
    "99th pct of normal validation": lambda cal, thr, s: (DecisionThreshold(float(np.quantile(cal, 0.99))), s),
    "99.9th pct of normal validation": lambda cal, thr, s: (DecisionThreshold(float(np.quantile(cal, 0.999))), s),
}


def fitted(case: dict) -> dict | None:
    test, labels = case["test"], case["labels"]
    half = len(test) // 2
    if not labels[half:].any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = EnsembleDetector().fit(test[:half], labels[:half], case["metrics"], normal=case["train"])
        scores = det.score(test)[half:]
    return {"cal": det.calibration_scores_, "thr": det.threshold_, "scores": scores, "labels": labels[half:]}


def table(title: str, cases: list[dict]) -> list[str]:
    lines = [
        f"\n{title}\n",
        "| rule | f1_operational | event_precision | event_recall | alerts | entities | per entity f1_operational |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rule in RULES.items():
        rows, per = [], []
        for c in cases:
            try:
                spot, scores = rule(c["cal"], c["thr"], c["scores"])
            except ValueError:  # too few calibration scores for a tail: the figure is null there
                per.append("null")
                continue
            thresholds, alerts = online_alerts(scores, spot)
            recall, precision, _ = M.alert_scores(c["labels"], alerts)
            f1 = M.f1_at(c["labels"], scores, thresholds)
            rows.append((f1, precision, recall, len(alerts)))
            per.append(f"{f1:.2f}")
        f1, precision, recall, alerts = np.array(rows, dtype=float).mean(axis=0)
        lines.append(
            f"| {name} | {f1:.3f} | {precision:.3f} | {recall:.3f} | {alerts:.1f} | {len(rows)} | {' '.join(per)} |"
        )
    best = np.mean([M.best_f1(c["labels"], c["scores"])[0] for c in cases])
    lines.append(f"\nBest F1 over the whole PR curve (an oracle threshold), mean: {best:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    args = parser.parse_args()
    lines = []
    for title, cases in (("shipped", shipped_cases(args.data)), ("held-out synthetic", synthetic_cases())):
        judged = [c for c in map(fitted, cases) if c is not None]
        lines += table(f"Second halves, {title} ({len(judged)} entities with an incident there)", judged)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
