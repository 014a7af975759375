"""The stacked ensemble's vote and a few of its knobs against f1_operational at its served decision threshold
(issue 19; docs/experiments/ensemble-threshold.md, "The vote, the validation share and the evidence columns").

    .venv/bin/python docs/experiments/ensemble-variants.py [--sets shipped,held-out,fresh]
    # about seven minutes on 2 cores for the shipped and held-out sets

Per entity the ensemble learns from the first half of the test series (labels) and the train series
(normal), as `raywatch evaluate` fits it (`ensemble-threshold.py`'s `fitted`), with each variant's
changes. Each variant's decision threshold is `detect.thresholds.decision_threshold` on its own validation
scores; it runs over the second half's scores in time order and is judged there against the incident
labels. No threshold sees a label of the rows it is judged on.

Two kinds of variant:
- a vote over the same fitted members (`VOTES`): their probabilities combined another way;
- a refit (`REFITS`): `EnsembleDetector` config fields, or the evidence columns' constants of
  `detect.evidence` (set on the module for the refit, then put back; an experiment only).
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

# the sets, the fit and log-odds (ensemble-threshold.py's `fitted`, `logit`) and the figures of ensemble-horizon.py
_spec = importlib.util.spec_from_file_location("ensemble_horizon", Path(__file__).with_name("ensemble-horizon.py"))
horizon_experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(horizon_experiment)  # also puts the repository on sys.path
SETS, fitted, logit, figures = (
    horizon_experiment.SETS,
    horizon_experiment.threshold_experiment.fitted,
    horizon_experiment.threshold_experiment.logit,
    horizon_experiment.figures,
)

from scipy.special import expit  # noqa: E402

import detect.evidence as E  # noqa: E402
from detect.thresholds import decision_threshold  # noqa: E402

#: vote name -> (member probabilities (rows, 4), fitted weights) -> incident probability per row
VOTES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "weights fitted on validation log-loss (served)": lambda P, w: P @ w,
    "equal weights": lambda P, w: P.mean(axis=1),
    "equal weights, in log-odds": lambda P, w: expit(logit(P).mean(axis=1)),
    "fitted weights, in log-odds": lambda P, w: expit(logit(P) @ w),
}

#: refit name -> (EnsembleConfig fields, detect.evidence constants)
REFITS: dict[str, tuple[dict, dict]] = {
    "validation share 0.4 (served 0.3)": ({"val_fraction": 0.4}, {}),
    "validation share 0.5": ({"val_fraction": 0.5}, {}),
    "running maxima over 10, 30 and 60 rows (served 10, 30)": ({}, {"ROLLING": (10, 30, 60)}),
    "1 largest metric error per detector (served 3)": ({}, {"TOP_METRICS": 1}),
    "5 largest metric errors per detector": ({}, {"TOP_METRICS": 5}),
}


def by_vote(c: dict, vote: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[float, float, float, float]:
    threshold = decision_threshold(c["val_labels"], vote(c["val_members"], c["weights"])).threshold
    return figures(c, vote(c["members"], c["weights"]), threshold)


def refitted(cases: list[dict], config: dict, constants: dict) -> list[dict]:
    saved = {name: getattr(E, name) for name in (*constants, "CONTEXT")}
    try:
        for name, value in constants.items():
            setattr(E, name, value)
        E.CONTEXT = max(E.ROLLING) - 1
        return [c for c in (fitted(case, **config) for case in cases) if c is not None]
    finally:
        for name, value in saved.items():
            setattr(E, name, value)


def row(set_name: str, variant: str, figures: list[tuple[float, float, float, float]]) -> str:
    mean = np.mean(figures, axis=0)
    per = " ".join(f"{f[0]:.2f}" for f in figures)
    return f"| {set_name} | {variant} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} | {per} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="shipped,held-out")
    args = parser.parse_args()
    print("| set | variant | f1_operational | event_precision | event_recall | pr_auc | per entity f1_operational |")
    print("|---|---|---|---|---|---|---|")
    for set_name in args.sets.split(","):
        cases = SETS[set_name]()
        served = refitted(cases, {}, {})
        for variant, vote in VOTES.items():
            print(row(set_name, variant, [by_vote(c, vote) for c in served]), flush=True)
        for variant, (config, constants) in REFITS.items():
            fits = refitted(cases, config, constants)
            print(row(set_name, variant, [figures(c, c["scores"], c["thr"]) for c in fits]), flush=True)


if __name__ == "__main__":
    main()
