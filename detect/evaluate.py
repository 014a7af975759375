"""Evaluation harness: fit each detector on an entity's train series, score its labelled test series.

Reports, per (entity, detector): best point-wise F1 and PR-AUC first, then what an operator would
receive. The operational threshold is DSPOT's (SPOT over a moving baseline, detect/thresholds.py):
fitted on the detector's calibration scores (training/validation, never test labels) and updated online
over the test series in time order from its unlabelled scores; the supervised ensemble's is the decision
threshold it learnt on its labelled validation rows (the first half's), which no score moves. Rows above it
are grouped into alerts (detect/alerting.py); event recall/precision and mean time to detect count those
alerts. The old rule (the detector's stored threshold, the 99th percentile of validation scores; the
ensemble's decision threshold) is kept beside it as `*_p99`. Root-cause HitRate@100%/150% where
interpretation labels exist. A figure that cannot be computed is null, and `null_reason` says why; a
detector that cannot score an entity leaves a null record, never an abort.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from detect import metrics as M
from detect.alerting import online_alerts
from detect.base import Detector
from detect.bundle import detector_classes
from detect.data import Series, load_benchmark

log = logging.getLogger(__name__)

COLUMNS = [
    "f1",
    "pr_auc",
    "f1_operational",
    "f1_operational_p99",
    "pa_f1",
    "event_recall",
    "event_precision",
    "mttd_rows",
    "alerts",
    "event_recall_p99",
    "event_precision_p99",
    "hitrate_100",
    "hitrate_150",
    "pr_auc_second_half",
]
# figures that need an incident among the evaluated rows: all but the alert count and the root-cause and
# second-half figures (those have reasons of their own to be null)
DETECTION_FIGURES = tuple(c for c in COLUMNS if c not in ("alerts", "hitrate_100", "hitrate_150", "pr_auc_second_half"))


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
    series (and normal from the train series) and every figure of its record covers the second half
    only (`eval_rows`).
    """
    train = series.train[series.metrics].to_numpy()
    test = series.test[series.metrics].to_numpy()
    y = series.labels
    half = len(test) // 2
    supervised = getattr(detector, "supervised", False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if supervised:  # its evidence detectors learn normal from the train series
            detector.fit(test[:half], y[:half], series.metrics, normal=train)
        else:
            detector.fit(train)
        t1 = time.perf_counter()
        scores = detector.score(test)
        contributions = detector.explain(test)
    t2 = time.perf_counter()
    second_half_pr_auc = M.pr_auc(y[half:], scores[half:]) if y[half:].any() else None
    if supervised:
        y, scores, contributions = y[half:], scores[half:], contributions[half:]
        interpretation = [(a - half, b - half, d) for a, b, d in series.interpretation if a >= half]
    else:
        interpretation = series.interpretation
    record: dict[str, Any] = {
        "dataset": series.dataset,
        "entity": series.entity,
        "detector": detector.name,
        "f1": M.best_f1(y, scores)[0],
        "pr_auc": M.pr_auc(y, scores),
        "pa_f1": M.point_adjusted_f1(y, scores),
        **operational_figures(y, scores, contributions, detector),
        "hitrate_100": M.hitrate(contributions, interpretation, y, 100) if interpretation else None,
        "hitrate_150": M.hitrate(contributions, interpretation, y, 150) if interpretation else None,
        "pr_auc_second_half": second_half_pr_auc,
        "eval_rows": "test[second half]" if supervised else "test",
        # a supervised detector without a labelled incident to learn from learns from injected ones
        "injected_incidents": getattr(detector, "injected_incidents_", None),
        "anomaly_ratio": float(y.mean()),
        "fit_seconds": round(t1 - t0, 3),
        "score_seconds": round(t2 - t1, 3),
    }
    return with_null_reasons(record, bool(y.any()), bool(interpretation))


def operational_figures(
    labels: np.ndarray, scores: np.ndarray, contributions: np.ndarray, detector: Detector
) -> dict[str, Any]:
    """What an operator receives: the operational threshold online (`Detector.online_threshold`: DSPOT, or
    the incident predictor's decision threshold), the alerts it raises, and the old p99 rule."""
    event_recall_p99, event_precision_p99 = M.event_scores(labels, scores, detector.threshold_)
    figures: dict[str, Any] = {
        "f1_operational_p99": M.f1_at(labels, scores, detector.threshold_),
        "event_recall_p99": event_recall_p99,
        "event_precision_p99": event_precision_p99,
        "threshold": detector.threshold_,
        "null_reason": {},
    }
    try:
        spot = detector.online_threshold()
    except ValueError as exc:  # too few calibration scores for a tail fit: these figures cannot exist
        for key in ("f1_operational", "event_recall", "event_precision", "mttd_rows", "alerts"):
            figures[key] = None
            figures["null_reason"][key] = str(exc)
        return figures
    thresholds, alerts = online_alerts(scores, spot, contributions)  # time order, no labels
    event_recall, event_precision, mttd = M.alert_scores(labels, alerts)
    return {
        **figures,
        "f1_operational": M.f1_at(labels, scores, thresholds),
        "event_recall": event_recall,
        "event_precision": event_precision,
        "mttd_rows": mttd,
        "alerts": len(alerts),
        "threshold_spot_final": spot.threshold_,
    }


def with_null_reasons(record: dict[str, Any], has_incident: bool, has_interpretation: bool) -> dict[str, Any]:
    """Null the figures the evaluated rows cannot define, and say why in `null_reason`."""
    reasons: dict[str, str] = record.get("null_reason", {})
    if not has_incident:  # detection figures are undefined, not zero
        for key in DETECTION_FIGURES:
            record[key] = None
            reasons[key] = "no incident in the evaluated rows"
    if record.get("mttd_rows") is None and "mttd_rows" not in reasons:
        reasons["mttd_rows"] = "no incident was alerted on"
    for key in ("hitrate_100", "hitrate_150"):
        if not has_interpretation:
            reasons[key] = "no root-cause labels (interpretation.txt) for the evaluated rows"
        elif record[key] is None or math.isnan(record[key]):
            record[key] = None
            reasons[key] = "no labelled row inside an interpreted segment"
    if record.get("pr_auc_second_half") is None:
        reasons["pr_auc_second_half"] = "no incident in the second half"
    record["null_reason"] = reasons
    return record


def failed_record(series: Series, name: str, exc: Exception) -> dict[str, Any]:
    """A detector that cannot score an entity: every figure null, with the reason."""
    reason = f"{type(exc).__name__}: {exc}"
    return {
        "dataset": series.dataset,
        "entity": series.entity,
        "detector": name,
        **dict.fromkeys(COLUMNS),
        "error": reason,
        "null_reason": dict.fromkeys(COLUMNS, reason),
    }


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of every figure per detector, over the entities evaluated."""
    out = []
    for name in dict.fromkeys(r["detector"] for r in results):
        rows = [r for r in results if r["detector"] == name]
        mean = {"detector": name, "entities": len(rows), "not_scored": sum("error" in r for r in rows)}
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
    jobs: int = 1,
) -> dict[str, Any]:
    """Every detector on every entity. With `jobs` > 1 that many (entity, detector) pairs run at once, each
    in a process of its own with its share of the cores (`worker_pool`); the records come in the same order
    as one at a time, and are the same but where torch's fewer threads move a last digit (README)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    detectors = parse_detectors(detectors)
    pairs = [(series, name) for series in load_benchmark(data_dir, entities) for name in detectors]
    if jobs == 1 or len(pairs) < 2:
        results = []
        for series, name in pairs:
            if progress:
                progress(f"{series.name}: {name}")
            results.append(evaluate_pair(series, name))
    else:
        results = _evaluate_in_processes(pairs, jobs, progress)
    return {"results": results, "summary": summarise(results), "data": str(data_dir), "detectors": detectors}


def evaluate_pair(series: Series, name: str) -> dict[str, Any]:
    """One detector on one entity; a detector that cannot score it gives a null record with the reason."""
    try:
        record = evaluate_series(series, detector_factories()[name]())
    except Exception as exc:  # one entity a detector cannot score must not cost the whole run
        log.warning("not evaluated", extra={"entity": series.name, "detector": name, "error": str(exc)})
        return failed_record(series, name, exc)
    log.info("evaluated", extra=record)
    return record


def _evaluate_in_processes(
    pairs: list[tuple[Series, str]], jobs: int, progress: Callable[[str], None] | None
) -> list[dict[str, Any]]:
    """`evaluate_pair` of every pair in `jobs` worker processes (`worker_pool`), reported as each finishes,
    returned in the pairs' order."""
    from concurrent.futures import as_completed

    with worker_pool(min(jobs, len(pairs))) as pool:
        futures = {pool.submit(evaluate_pair, series, name): i for i, (series, name) in enumerate(pairs)}
        results: list[dict[str, Any]] = [{} for _ in pairs]
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if progress:
                progress(f"{pairs[i][0].name}: {pairs[i][1]} done")
    return results


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Any]:
    """A pool of `workers` fresh processes (spawned: a forked copy of a process that has torch's thread
    pools is not safe), each with its share of the cores for its thread pools (`worker_threads`). torch's
    results differ in their last digits with its thread count, and a threshold can turn that into a
    different alert: on 2 cores `--jobs 2` fits with 1 thread in each worker where `--jobs 1` fits with
    2 (README, Quality)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with (
        _environment(worker_thread_environment(worker_threads(workers))),  # inherited by the workers the submits start
        ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        yield pool


def worker_threads(workers: int) -> int:
    """Each worker's share of the machine's cores (at least 1), unless the user set OMP_NUM_THREADS."""
    import os

    from detect.ensemble import environment_threads

    return environment_threads("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // workers)


def worker_thread_environment(threads: int) -> dict[str, str]:
    """What a worker process reads its thread pools' sizes from as it starts: OpenMP's, which torch's
    intra-op pool follows too, the BLAS libraries' (XGBoost, LightGBM, numpy) and the ensemble's own
    (`detect.ensemble.fit_threads`).
    Workers that each start pools as large as the machine, side by side, spin against each other: on 2
    cores `--jobs 2` was twice as slow as `--jobs 1` (38 s against 20 s for two SMD entities)."""
    from detect.ensemble import FIT_THREADS_ENV

    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", FIT_THREADS_ENV)
    return {name: str(threads) for name in names}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ inside the block (child processes started there inherit them), then
    restored."""
    import os

    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
        "f1_operational: rows at or above DSPOT's threshold (SPOT at risk 1e-3 over the mean of the last 60 "
        "scores learnt from; fitted on validation scores, updated online from unlabelled test scores); the "
        "ensemble's: the decision threshold it learnt on its labelled validation rows, served as is. "
        "event_recall, event_precision, mttd_rows, alerts: "
        "alerts (3 of 5 rows above threshold, resolved after 10 quiet rows), mean rows from incident start "
        "to the alert. *_p99: the old rule (the detector's stored threshold; rows and row runs). "
        "hitrate_*: root-cause ranking. "
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
