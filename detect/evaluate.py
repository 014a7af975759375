"""Evaluation harness: fit each detector on an entity's train series, score its labelled test series.

Reports, per (entity, detector): best point-wise F1 and PR-AUC first, then the F1 at the operational
threshold (chosen on training data only), point-adjusted F1, event recall/precision at the
operational threshold, and root-cause HitRate@100%/150% where interpretation labels exist.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from detect import metrics as M
from detect.base import Detector
from detect.bundle import detector_classes
from detect.data import Series, load_benchmark

log = logging.getLogger(__name__)

COLUMNS = [
    "f1",
    "pr_auc",
    "f1_operational",
    "pa_f1",
    "event_recall",
    "event_precision",
    "hitrate_100",
    "hitrate_150",
    "pr_auc_second_half",
]


def detector_factories() -> dict[str, Callable[[], Detector]]:
    """Every detector `evaluate` knows, by name: the peers and raywatch's own kinds."""
    return detector_classes()


def parse_detectors(names: str | list[str]) -> list[str]:
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    known = detector_factories()
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"unknown detector(s) {unknown or wanted}; choose from {sorted(known)}")
    return wanted


def evaluate_series(series: Series, detector: Detector) -> dict[str, Any]:
    """Fit on train, score test, and compute every quality figure for one entity.

    A supervised detector (the ensemble) instead learns from the first half of the labelled test
    series and every figure of its record covers the second half only (`eval_rows`).
    """
    train = series.train[series.metrics].to_numpy()
    test = series.test[series.metrics].to_numpy()
    y = series.labels
    half = len(test) // 2
    supervised = getattr(detector, "supervised", False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if supervised:
            detector.fit(test[:half], y[:half], series.metrics)
        else:
            detector.fit(train)
        t1 = time.perf_counter()
        scores = detector.score(test)
        contributions = detector.explain(test) if series.interpretation else None
    t2 = time.perf_counter()
    second_half_pr_auc = M.pr_auc(y[half:], scores[half:]) if y[half:].any() else None
    if supervised:
        y, scores = y[half:], scores[half:]
        contributions = contributions[half:] if contributions is not None else None
        interpretation = [(a - half, b - half, d) for a, b, d in series.interpretation if a >= half]
    else:
        interpretation = series.interpretation
    f1, _ = M.best_f1(y, scores)
    thr = detector.threshold_
    event_recall, event_precision = M.event_scores(y, scores, thr)
    record: dict[str, Any] = {
        "dataset": series.dataset,
        "entity": series.entity,
        "detector": detector.name,
        "f1": f1,
        "pr_auc": M.pr_auc(y, scores),
        "f1_operational": M.f1_at(y, scores, thr),
        "threshold": thr,
        "pa_f1": M.point_adjusted_f1(y, scores),
        "event_recall": event_recall,
        "event_precision": event_precision,
        "hitrate_100": M.hitrate(contributions, interpretation, y, 100) if contributions is not None else None,
        "hitrate_150": M.hitrate(contributions, interpretation, y, 150) if contributions is not None else None,
        "pr_auc_second_half": second_half_pr_auc,
        "eval_rows": "test[second half]" if supervised else "test",
        "anomaly_ratio": float(y.mean()),
        "fit_seconds": round(t1 - t0, 3),
        "score_seconds": round(t2 - t1, 3),
    }
    if not y.any():  # no incident in the evaluated rows: detection figures are undefined, not zero
        for key in ("f1", "pr_auc", "f1_operational", "pa_f1", "event_recall", "event_precision"):
            record[key] = None
    return record


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of every figure per detector, over the entities evaluated."""
    out = []
    for name in dict.fromkeys(r["detector"] for r in results):
        rows = [r for r in results if r["detector"] == name]
        mean = {"detector": name, "entities": len(rows)}
        for col in COLUMNS:
            vals = [r[col] for r in rows if r.get(col) is not None and not math.isnan(r[col])]
            mean[col] = float(np.mean(vals)) if vals else None
        out.append(mean)
    return out


def evaluate(
    data_dir: str | Path | None,
    detectors: list[str],
    entities: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    factories = detector_factories()
    series_list = load_benchmark(data_dir, entities)
    results = []
    for series in series_list:
        for name in detectors:
            if progress:
                progress(f"{series.name}: {name}")
            record = evaluate_series(series, factories[name]())
            log.info("evaluated", extra=record)
            results.append(record)
    return {"results": results, "summary": summarise(results), "data": str(data_dir), "detectors": detectors}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(report: dict[str, Any]) -> str:
    head = ["entity", "detector", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        lines.append(
            "| " + " | ".join([f"{r['dataset']}/{r['entity']}", r["detector"], *(_fmt(r[c]) for c in COLUMNS)]) + " |"
        )
    for s in report["summary"]:
        lines.append(
            "| "
            + " | ".join([f"**mean ({s['entities']})**", f"**{s['detector']}**", *(_fmt(s[c]) for c in COLUMNS)])
            + " |"
        )
    note = (
        "\nf1, pr_auc, pa_f1: best threshold over the whole PR curve (point-wise; pa_f1 point-adjusted). "
        "f1_operational, event_*: threshold chosen on training data only. hitrate_*: root-cause ranking. "
        "pr_auc_second_half: PR-AUC on the second half of each test series, where the supervised ensemble "
        "(trained on the first half) is evaluated; the ensemble's other figures also cover that half only."
    )
    return "\n".join(lines) + "\n" + note + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    md = out.with_suffix(".md")
    md.write_text(markdown_table(report))
    return out, md
