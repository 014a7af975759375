"""The stacked ensemble's decision threshold from more of its labels: is the newest 30% of the labelled rows
(the validation part, where `EnsembleDetector.fit_vote` picks its best-F1 threshold) too few?
(docs/experiments/ensemble-threshold.md, "More labels for the threshold").

    .venv/bin/python docs/experiments/ensemble-threshold-more-labels.py [--data data]   # 3 min on 2 cores

Per entity the ensemble is fitted as `raywatch evaluate` fits it (first half of the test series with its
labels, the train series as normal); every threshold below is picked on the first half only, and judged
on the second half's scores in time order with the served alert rule (`online_alerts`). Held out: the
synthetic fleets of `make bench-attribution`.

- `validation, lead target` (served): best F1 on the validation rows against the target the members learn
  (an incident under way or starting within `horizon` rows);
- `validation, incident labels`: the same rows against the labels evaluate judges (an incident under way);
- `out of fold, K blocks`: the members refitted K times, each time without one of K time blocks of the
  labelled rows, that block scored; best F1 over every block's scores (all the labels, none in-sample);
- `all labelled rows, in-sample`: best F1 over the final model's scores of every labelled row, the fit part
  included (all the labels, most of them seen by the members).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attribution import shipped_cases, synthetic_cases  # noqa: E402

import detect.metrics as M  # noqa: E402
from detect.alerting import online_alerts  # noqa: E402
from detect.ensemble import EnsembleDetector, with_enough_incidents  # noqa: E402
from detect.thresholds import DecisionThreshold  # noqa: E402


def out_of_fold(det: EnsembleDetector, features: np.ndarray, target: np.ndarray, blocks: int) -> np.ndarray:
    """Each time block's scores from the members refitted without it (NaN where the rest holds one class)."""
    scores = np.full(len(target), np.nan)
    for block in np.array_split(np.arange(len(target)), blocks):
        rest = np.ones(len(target), dtype=bool)
        rest[block] = False
        if target[rest].all() or not target[rest].any():
            continue
        refit = copy.copy(det)
        refit.fit_members(features[rest], target[rest], {})
        scores[block] = np.clip(refit.member_matrix(features[block]), 1e-6, 1 - 1e-6) @ det.weights_
    return scores


def thresholds(case: dict) -> dict | None:
    test, labels = case["test"], np.asarray(case["labels"])
    half = len(test) // 2
    if not labels[half:].any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = EnsembleDetector().fit(test[:half], labels[:half], case["metrics"], normal=case["train"])
        scores = det.score(test)[half:]
        features, target, _, val = det.prepare(test[:half], labels[:half], case["metrics"], case["train"])
        _, learnt_labels, _, _ = with_enough_incidents(
            det._check(test[:half]), labels[:half], det.config.horizon, det.config.seed
        )
        in_sample = np.clip(det.member_matrix(features), 1e-6, 1 - 1e-6) @ det.weights_
        picked = {
            "validation, lead target (served)": det.threshold_,
            "validation, incident labels": M.best_f1(learnt_labels[val], in_sample[val])[1],
            "all labelled rows, in-sample": M.best_f1(target, in_sample)[1],
        }
        for blocks in (3, 5):
            oof = out_of_fold(det, features, target, blocks)
            ok = np.isfinite(oof)
            picked[f"out of fold, {blocks} blocks"] = M.best_f1(target[ok], oof[ok])[1]
    return {"picked": picked, "scores": scores, "labels": labels[half:]}


def table(title: str, cases: list[dict]) -> list[str]:
    lines = [
        f"\n{title}\n",
        "| threshold picked on | f1_operational | event_precision | event_recall | per entity f1_operational |",
        "|---|---|---|---|---|",
    ]
    for name in cases[0]["picked"]:
        rows = []
        for c in cases:
            served, alerts = online_alerts(c["scores"], DecisionThreshold(float(c["picked"][name])))
            recall, precision, _ = M.alert_scores(c["labels"], alerts)
            rows.append((M.f1_at(c["labels"], c["scores"], served), precision, recall))
        f1, precision, recall = np.mean(rows, axis=0)
        per = " ".join(f"{r[0]:.2f}" for r in rows)
        lines.append(f"| {name} | {f1:.3f} | {precision:.3f} | {recall:.3f} | {per} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    args = parser.parse_args()
    lines = []
    for title, cases in (("shipped", shipped_cases(args.data)), ("held-out synthetic", synthetic_cases())):
        judged = [c for c in map(thresholds, cases) if c is not None]
        lines += table(f"Second halves, {title} ({len(judged)} entities with an incident there)", judged)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
