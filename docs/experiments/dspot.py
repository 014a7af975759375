"""DSPOT against SPOT for the sequence detectors' served threshold, on the shipped entities and on held-out
synthetic fleets (docs/experiments/dspot.md).

    .venv/bin/python docs/experiments/dspot.py [--data data] [--cache FILE]   # about 6 minutes on 2 cores

DSPOT (Siffer et al., KDD 2017, section 4.3; `detect.thresholds.DSPOT`) models the peaks over a moving local
baseline: the baseline M_t is the mean of the last `depth` scores learnt from, SPOT runs on the residuals
X_t - M_t, and row t is judged against M_t + z_q. Both are fitted on the validation scores (DSPOT on their
residuals) and run over the test scores in time order without labels, with the alert rule and learning
of `online_alerts` (an alert's rows are learnt by neither the tail nor the baseline). The risk stays at
the platform's 1e-3: only the depth varies. Scores are computed once per detector and entity (as
`raywatch evaluate` fits them) and kept in `--cache`, so the thresholds can be judged again without
refitting.
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attribution import synthetic_cases  # noqa: E402

import detect.metrics as M  # noqa: E402
from detect.alerting import online_alerts  # noqa: E402
from detect.thresholds import DSPOT, SPOT  # noqa: E402

# the cases and their scores as the risk-level sweep makes them (its file name is not a module name)
_SPEC = importlib.util.spec_from_file_location("spot_risk_level", Path(__file__).with_name("spot-risk-level.py"))
_SWEEP = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_SWEEP)
shipped_cases, scored = _SWEEP.shipped_cases, _SWEEP.scored

DEPTHS = (0, 10, 30, 50, 60, 120, 200, 250)  # 0: plain SPOT (served before DSPOT); 60: what is served now


def judged(calibration: np.ndarray, scores: np.ndarray, labels: np.ndarray, depth: int) -> tuple[float, ...]:
    spot = SPOT().fit(calibration) if depth == 0 else DSPOT(depth=depth).fit(calibration)
    thresholds, alerts = online_alerts(scores, spot)
    recall, precision, _ = M.alert_scores(labels, alerts)
    return M.f1_at(labels, scores, thresholds), precision, recall, len(alerts), M.best_f1(labels, scores)[0]


def table(label: str, runs: dict[str, list]) -> str:
    lines = [
        f"\n{label}\n",
        "| detector | depth | f1_operational | event_precision | event_recall | alerts | f1 (best) | per case f1_operational |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cases in runs.items():
        for depth in DEPTHS:
            rows = np.array([judged(c, s, y, depth) for c, s, y in cases], dtype=float)
            f1, precision, recall, alerts, best = rows.mean(axis=0)
            each = " ".join(f"{v:.2f}" for v in rows[:, 0])
            lines.append(
                f"| {name} | {depth or 'SPOT'} | {f1:.3f} | {precision:.3f} | {recall:.3f} | {alerts:.1f} | {best:.3f} | {each} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    parser.add_argument("--cache", help="pickle of the scores: read when it exists, else written")
    args = parser.parse_args()
    cache = Path(args.cache) if args.cache else None
    if cache and cache.exists():
        runs = pickle.loads(cache.read_bytes())
    else:
        runs = {"shipped": scored(shipped_cases(args.data)), "synthetic": scored(synthetic_cases())}
        if cache:
            cache.write_bytes(pickle.dumps(runs))
    print(table("shipped entities (mean of 6)", runs["shipped"]))
    print(table("synthetic fleets, seeds 101 and 202 (mean of 6)", runs["synthetic"]))


if __name__ == "__main__":
    main()
