"""Does stacking the sequence detectors into the ensemble make a better incident predictor? (issue 19, item 3)

Every variant is judged on the second half of each test series, the rows the supervised ensemble never
learns from, by PR-AUC (and best F1). Side by side, in one run, on the same rows:

- `autoencoder`, `lstm`: the unsupervised detectors as `raywatch evaluate` fits them (train series);
- `evidence`: label-free combination of the two, max over detectors of score / the 99th percentile of its
  own calibration scores (what each detector calls unusual, on one scale);
- `ensemble`: the window-feature ensemble (`evidence=()`, shipped before the stacking), learning from the
  first half's labels (with injected incidents where they hold fewer than two), vote weights on its
  validation tail (the ensemble served now: docs/experiments/monotone-stacking.py);
- `stacked`: the same members learning from the window features plus the evidence column, weights on
  the validation tail;
- `stacked_oof`: `stacked` with a fifth member (the evidence, calibrated by a logistic fit) and vote
  weights fitted on blocked out-of-fold predictions (4 contiguous blocks), the textbook way to stack.

The diagnostic column `evidence_ap_first_half` is the evidence's PR-AUC on the first half: the labels
every supervised variant learns from. Where it is far below the second half's, those labels teach the
members that the detectors' evidence does not find incidents, and no label-fitted vote can keep it.

Two sets of entities: the six shipped ones (data/), and two synthetic fleets of 3 machines
(`benchmarks/attribution.py`'s: trained on incident-free days, judged on 3 days with incidents of the
same shapes throughout, so there the first half's labels do describe the second half's incidents).

    python benchmarks/stacking.py [--data DIR]          # make bench-stacking; about 10 min on 2 cores

Writes benchmarks/results/stacking.json (records per entity and variant) and stacking.md.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import numpy as np
from attribution import shipped_cases, synthetic_cases
from serving import log, save_tables
from sklearn.linear_model import LogisticRegression

from detect import metrics as M
from detect.ensemble import (
    EnsembleConfig,
    EnsembleDetector,
    split_with_incidents_on_both_sides,
    vote_weights,
    with_enough_incidents,
)
from detect.evaluate import detector_factories
from detect.evidence import evidence_scale
from detect.features import FeatureSpec, entity_features

VARIANTS = ("autoencoder", "lstm", "evidence", "ensemble", "stacked", "stacked_oof")
FOLDS = 4


class EvidenceStack(EnsembleDetector):
    """The ensemble's members over the window features plus one evidence column (benchmark only: the
    per-metric importance that serving's explanations use is not defined for the extra column)."""

    def _metric_importance(self) -> np.ndarray:
        return np.zeros(0)


def evidence_of(detectors: list[Any]):
    """Label-free: max over detectors of score / the 99th percentile of its calibration scores, logged."""
    scales = [evidence_scale(d.calibration_scores_) for d in detectors]  # the served ensemble's scale

    def evidence(X: np.ndarray) -> np.ndarray:
        ratio = np.max([d.score(X) / s for d, s in zip(detectors, scales)], axis=0)
        return np.log(np.maximum(ratio, 1e-9))

    return evidence


def learning_rows(case: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first half, as the ensemble learns from it (`with_enough_incidents`): rows, labels, lead target."""
    half = len(case["test"]) // 2
    cfg = EnsembleConfig()
    X, y, target, _ = with_enough_incidents(case["test"][:half], case["labels"][:half], cfg.horizon, cfg.seed)
    return X, y, target


def stacked_scores(case: dict[str, Any], evidence, with_oof: bool) -> np.ndarray:
    """Scores of every test row from members fitted on the first half's stacked features."""
    X, _, target = learning_rows(case)
    stack = EvidenceStack(evidence=())
    spec = FeatureSpec(metrics=tuple(case["metrics"]), lags=stack.config.lags, rolling=stack.config.rolling)

    def features(rows: np.ndarray) -> np.ndarray:
        return np.column_stack([entity_features(rows, spec), evidence(rows)]).astype(np.float32)

    F, test_F = features(X), features(case["test"])
    if not with_oof:
        fit_mask, val_mask = split_with_incidents_on_both_sides(target, stack.config.val_fraction)
        stack.fit_members(F[fit_mask], target[fit_mask], {})
        stack.fit_vote(F[val_mask], target[val_mask])
        return stack.member_matrix(test_F) @ stack.weights_
    blocks = np.arange(len(F)) * FOLDS // len(F)
    out_of_fold = np.full((len(F), 5), np.nan)
    for b in range(FOLDS):
        held = blocks == b
        if target[~held].any() and target[held].any():
            out_of_fold[held] = five_members(F[~held], target[~held])(F[held])
    known = ~np.isnan(out_of_fold[:, 0])
    weights, _ = vote_weights(np.clip(out_of_fold[known], 1e-6, 1 - 1e-6), target[known], maxiter=600)
    return five_members(F, target)(test_F) @ weights


def five_members(F: np.ndarray, y: np.ndarray):
    """The four members over the stacked features and the evidence column calibrated by a logistic fit."""
    members = EvidenceStack(evidence=())
    members.fit_members(F, y, {})
    calibration = LogisticRegression(class_weight="balanced").fit(F[:, -1:], y)
    return lambda rows: np.column_stack([members.member_matrix(rows), calibration.predict_proba(rows[:, -1:])[:, 1]])


def measure(case: dict[str, Any]) -> list[dict[str, Any]]:
    test, labels = case["test"], case["labels"]
    half = len(test) // 2
    if not labels[half:].any():
        log(f"{case['entity']}: no incident in the second half, left out")
        return []
    factories = detector_factories()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detectors = [factories[name]().fit(case["train"], case["metrics"]) for name in ("autoencoder", "lstm")]
        evidence = evidence_of(detectors)
        X, y, first = learning_rows(case)
        scores = {
            "autoencoder": detectors[0].score(test),
            "lstm": detectors[1].score(test),
            "evidence": evidence(test),
            "ensemble": EnsembleDetector(evidence=()).fit(X, y, case["metrics"]).score(test),
            "stacked": stacked_scores(case, evidence, with_oof=False),
            "stacked_oof": stacked_scores(case, evidence, with_oof=True),
        }
    first_ap = M.pr_auc(first, evidence(X)) if first.any() else None
    return [
        {
            "entity": case["entity"],
            "variant": name,
            "pr_auc": round(M.pr_auc(labels[half:], s[half:]), 4),
            "f1": round(M.best_f1(labels[half:], s[half:])[0], 4),
            "evidence_ap_first_half": None if first_ap is None else round(first_ap, 4),
        }
        for name, s in scores.items()
    ]


def tables(records: list[dict[str, Any]], seconds: float) -> list[str]:
    md = [
        "# Stacking the sequence detectors into the incident predictor",
        "",
        f"`python benchmarks/stacking.py`, {time.strftime('%Y-%m-%d %H:%M')}, {seconds:.0f} s. PR-AUC on the "
        "second half of each test series (the rows no variant learns from); the supervised variants learn "
        "from the first half. See the script's docstring for each variant.",
        "",
        "| entity | " + " | ".join(VARIANTS) + " | evidence PR-AUC, first half |",
        "|---|" + "---|" * (len(VARIANTS) + 1),
    ]
    entities = list(dict.fromkeys(r["entity"] for r in records))
    for entity in entities:
        rows = {r["variant"]: r for r in records if r["entity"] == entity}
        first = rows["evidence"]["evidence_ap_first_half"]
        md.append(
            f"| {entity} | "
            + " | ".join(f"{rows[v]['pr_auc']:.3f}" for v in VARIANTS)
            + f" | {'–' if first is None else f'{first:.3f}'} |"
        )
    for group in ("shipped", "synthetic"):
        members = [e for e in entities if e.startswith("synthetic") == (group == "synthetic")]
        if members:
            means = [
                np.mean([r["pr_auc"] for r in records if r["variant"] == v and r["entity"] in members])
                for v in VARIANTS
            ]
            md.append(f"| **mean, {group} ({len(members)})** | " + " | ".join(f"**{m:.3f}**" for m in means) + " | |")
    md += [
        "",
        "How to read it: `ensemble` against `stacked` and `stacked_oof` is what stacking buys the incident predictor;",
        "`evidence` and the two detectors are what it would have to beat (issue 19 asks for the ensemble's PR-AUC",
        "to reach the best single detector's). The last column is the evidence's PR-AUC on the labels the",
        "supervised variants learn from: where it is low, those labels say that the detectors' evidence misses",
        "incidents that it finds in the second half, and a vote fitted on them weighs it down.",
    ]
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the shipped entities' folder (default: data/)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    records = []
    cases = shipped_cases(args.data) + synthetic_cases()
    for k, case in enumerate(cases, 1):
        log(f"[{k}/{len(cases)}] {case['entity']}")
        records += measure(case)
    seconds = time.perf_counter() - started
    save_tables("stacking", {"records": records, "seconds": round(seconds, 1)}, tables(records, seconds), show=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
