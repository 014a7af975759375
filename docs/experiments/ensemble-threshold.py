"""The stacked ensemble's operational threshold: DSPOT over its normal validation rows' tail against the
decision threshold it learnt on its labelled validation rows, and a few other label-free rules, on the
shipped entities, on held-out synthetic fleets, and on fleets of other seeds looked at once, after the
served rule was chosen (docs/experiments/ensemble-threshold.md).

    .venv/bin/python docs/experiments/ensemble-threshold.py [--data data] [--fresh-seeds 303,404,505]
    # about two minutes on 2 cores

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
from detect.thresholds import DSPOT, MOST_ROWS, NORMAL_QUANTILE, SPOT, DecisionThreshold  # noqa: E402


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def best_f1_or_tail(c: dict) -> float:
    """The rule served until 2026-12-06: the best validation F1's threshold, the normal tail's 99th
    percentile where that is no decision (`detect.thresholds.decision_threshold` before the midpoint)."""
    y, s = c["val_labels"].astype(bool), c["val_scores"]
    f1, threshold = M.best_f1(y, s)
    share = y.mean()
    if not np.isfinite(threshold) or f1 <= 2 * share / (1 + share) + 1e-9 or np.mean(s >= threshold) > MOST_ROWS:
        return float(np.quantile(s[~y], NORMAL_QUANTILE))
    return float(threshold)


#: rule -> (online threshold, the scores it judges) from a fitted case (`fitted`)
RULES = {
    "dspot (served before)": lambda c: (DSPOT().fit(c["cal"]), c["scores"]),
    "spot": lambda c: (SPOT().fit(c["cal"]), c["scores"]),
    "dspot over log-odds": lambda c: (DSPOT().fit(logit(c["cal"])), logit(c["scores"])),
    "spot over log-odds": lambda c: (SPOT().fit(logit(c["cal"])), logit(c["scores"])),
    "validation F1, the normal tail where that flags most rows (served 2026-12-06)": lambda c: (
        DecisionThreshold(best_f1_or_tail(c)),
        c["scores"],
    ),
    "**halfway in log-odds between validation F1 and the normal tail (served now)**": lambda c: (
        DecisionThreshold(c["thr"]),
        c["scores"],
    ),
    "0.5": lambda c: (DecisionThreshold(0.5), c["scores"]),
    "99th pct of normal validation": lambda c: (DecisionThreshold(float(np.quantile(c["cal"], 0.99))), c["scores"]),
    "99.9th pct of normal validation": lambda c: (
        DecisionThreshold(float(np.quantile(c["cal"], 0.999))),
        c["scores"],
    ),
}


def fitted(case: dict, **config) -> dict | None:
    """The ensemble as `EnsembleDetector.fit` fits it (with `config` over its defaults), step by step to keep
    its validation rows' scores."""
    test, labels = case["test"], case["labels"]
    half = len(test) // 2
    if not labels[half:].any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = EnsembleDetector(**config)
        features, target, fit_mask, val_mask = det.prepare(
            test[:half], labels[:half], case["metrics"], normal=case["train"]
        )
        det.fit_members(features[fit_mask], target[fit_mask], {})
        det.fit_vote(features[val_mask], target[val_mask])
        val_members = np.clip(det.member_matrix(features[val_mask]), 1e-6, 1 - 1e-6)
        members = det.member_matrix(det.features(test))[half:]
    return {
        "cal": det.calibration_scores_,
        "thr": det.threshold_,
        "val_labels": target[val_mask],
        "val_scores": val_members @ det.weights_,
        "scores": members @ det.weights_,  # = det.score(test)[half:]
        "labels": labels[half:],
        "val_members": val_members,  # (rows, 4) member probabilities, for other votes (ensemble-variants.py)
        "members": members,
        "weights": det.weights_,
    }


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
                spot, scores = rule(c)
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
    parser.add_argument(
        "--fresh-seeds", default="303,404,505", help="synthetic fleets no rule was chosen on (comma-separated)"
    )
    args = parser.parse_args()
    fresh = tuple(int(seed) for seed in args.fresh_seeds.split(",") if seed)
    sets = [("shipped", shipped_cases(args.data)), ("held-out synthetic", synthetic_cases())]
    if fresh:
        sets.append((f"fresh synthetic, seeds {', '.join(map(str, fresh))}", synthetic_cases(fresh)))
    lines = []
    for title, cases in sets:
        judged = [c for c in map(fitted, cases) if c is not None]
        lines += table(f"Second halves, {title} ({len(judged)} entities with an incident there)", judged)
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
