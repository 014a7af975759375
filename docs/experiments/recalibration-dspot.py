"""A kept champion's served threshold refitted on its recent rows believed normal, offline: does the loop's
recalibration help after a change (docs/experiments/recalibration-dspot.md; issue 18)?

    .venv/bin/python docs/experiments/recalibration-dspot.py [--data data]   # under a minute on 2 cores

Per entity the autoencoder of `benchmarks/replay.py` (hidden 32, 3 epochs) is fitted on the train split and
scores the test split as is and with the replay's shift from half-way on. The static champion serves the
DSPOT fitted on its calibration scores throughout (`online_alerts`, as the ingress serves it). The
recalibrated one serves that until a job two drift windows after the midpoint (`drift_window_rows`, the
retraining gate's persistence), then DSPOT fitted on its scores of those two windows' rows, minus:

- `believed normal` (merged): the rows `train.promotion.suspected_anomalies` withholds from a challenger
  (those at or above the champion's stored threshold, at most its top 10%);
- `top 1% trimmed`: the window's top 1% of scores;
- `every row`: nothing (the recalibration of flooding-recalibration.md, over DSPOT).

Judged on the rows after the midpoint, without labels in any rule: point-wise F1 of the served flags, and
event precision / recall of the alerts they make (`group_alerts`, `alert_scores`). Held out: synthetic
fleets (seeds 101, 202, 303; 3 machines each) trained on 3 clean days and tested on 10 days with 2
incidents a day, on which nothing here was chosen.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import detect.metrics as M  # noqa: E402
from detect.alerting import group_alerts, online_alerts  # noqa: E402
from detect.data import list_entities, load_series, rows_per_day  # noqa: E402
from detect.drift import drift_window_rows  # noqa: E402
from detect.sequence import AutoencoderDetector  # noqa: E402
from detect.synthetic import generate_fleet, inject_mean_shift  # noqa: E402
from detect.thresholds import DSPOT, threshold_from_state  # noqa: E402
from train.promotion import PromotionRule, suspected_anomalies  # noqa: E402

DAY = 1440
RULES = ("static", "believed normal", "top 1% trimmed", "every row")


def cases_shipped(data: str):
    for dataset, name in list_entities(data):
        s = load_series(dataset, name, data)
        yield (
            f"{dataset}/{name}",
            s.train[s.metrics].to_numpy(float),
            s.test[s.metrics].to_numpy(float),
            (
                s.labels.astype(int),
                s.metrics,
                rows_per_day(dataset),
            ),
        )


def cases_synthetic():
    for seed in (101, 202, 303):
        clean = generate_fleet(n_machines=3, n_steps=13 * DAY, incidents=False, seed=seed)
        fleet = generate_fleet(n_machines=3, n_steps=13 * DAY, incidents_per_machine=26, seed=seed)
        for entity in sorted(fleet.frame.entity.unique()):
            rows = fleet.frame[fleet.frame.entity == entity]
            train = clean.frame[clean.frame.entity == entity][fleet.metrics].to_numpy(float)[: 3 * DAY]
            test, labels = rows[fleet.metrics].to_numpy(float)[3 * DAY :], rows.label.to_numpy()[3 * DAY :]
            yield f"synthetic-{seed}/{entity}", train, test, (labels.astype(int), fleet.metrics, DAY)


def calibration(rule: str, window: np.ndarray, stored_threshold: float) -> np.ndarray:
    if rule == "believed normal":
        no_labels = np.full(len(window), -1)
        return window[~suspected_anomalies(window, stored_threshold, no_labels, PromotionRule().max_suspect_share)]
    if rule == "top 1% trimmed":
        return window[window < np.quantile(window, 0.99)]
    return window


def judged(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> tuple[float, float, float]:
    recall, precision, _ = M.alert_scores(labels, group_alerts(scores, thresholds))
    return M.f1_at(labels, scores, thresholds), precision, recall


def fitted(cases):
    """Each case with an incident after its midpoint, with the replay's autoencoder fitted on its train
    split: (name, detector, train, test, labels, metrics, rows per day, midpoint)."""
    for name, train, test, (labels, metrics, day) in cases:
        half = len(test) // 2
        if not labels[half:].any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det = AutoencoderDetector(epochs=3, hidden=32).fit(train, metrics)
        yield name, det, train, test, labels, metrics, day, half


def measure(cases) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    out: dict[tuple[str, str], list] = {}
    for name, det, _, test, labels, metrics, day, half in fitted(cases):
        job = half + 2 * drift_window_rows(day)
        for variant, rows in (("as_is", test), ("shift", inject_mean_shift(test, metrics, half)[0])):
            scores = det.score(rows)
            static, _ = online_alerts(scores, threshold_from_state(det.served_spot()))
            per = {"static": judged(labels[half:], scores[half:], static[half:])}
            for rule in RULES[1:]:
                after, _ = online_alerts(scores[job:], DSPOT().fit(calibration(rule, scores[half:job], det.threshold_)))
                served = np.concatenate([static[:job], after])
                per[rule] = judged(labels[half:], scores[half:], served[half:])
            for rule, figures in per.items():
                out.setdefault((variant, rule), []).append(figures)
            print(name, variant, " ".join(f"{r} {f[0]:.3f}" for r, f in per.items()), file=sys.stderr, flush=True)
    return out


def table(title: str, results) -> list[str]:
    lines = [f"\n### {title}\n", "| variant | rule | F1 after the midpoint | event precision | event recall |"]
    lines.append("|---|---|---|---|---|")
    for (variant, rule), rows in results.items():
        f1, precision, recall = np.mean(rows, axis=0)
        lines.append(f"| {variant} | {rule} | {f1:.3f} | {precision:.3f} | {recall:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    args = parser.parse_args()
    shipped = measure(cases_shipped(args.data))
    synthetic = measure(cases_synthetic())
    n_shipped = len(next(iter(shipped.values())))
    n_synthetic = len(next(iter(synthetic.values())))
    lines = table(f"Shipped entities ({n_shipped} with an incident after the midpoint)", shipped)
    lines += table(f"Held-out synthetic fleets ({n_synthetic} machines)", synthetic)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
