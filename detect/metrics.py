"""Detection-quality metrics: point-wise F1 and PR-AUC first, event-wise and point-adjusted beside them.

Convention: a row is flagged anomalous when its score is >= the threshold (as in sklearn's
precision_recall_curve).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

if TYPE_CHECKING:
    from detect.alerting import Alert


def segments(labels: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of 1s as (start, stop) with stop exclusive."""
    y = np.asarray(labels).astype(np.int8)
    edges = np.diff(np.concatenate([[0], y, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _f1(tp: np.ndarray | float, fp: np.ndarray | float, fn: np.ndarray | float) -> np.ndarray:
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best point-wise F1 over the whole precision-recall curve, and the threshold reaching it."""
    y = np.asarray(labels)
    if y.sum() == 0:
        return 0.0, float("inf")
    precision, recall, thresholds = precision_recall_curve(y, scores)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=(precision + recall) > 0
    )
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("inf")


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray) -> float:
    """Point-wise F1 of the rule score >= threshold (one threshold, or one per row)."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    return float(_f1((pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()))


def pr_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve (average precision)."""
    y = np.asarray(labels)
    return float(average_precision_score(y, scores)) if y.sum() else 0.0


def point_adjusted_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 after point adjustment: a segment counts as fully detected if any of its rows is flagged.

    Exact over every candidate threshold, O(n log n): for threshold t a segment is detected iff its
    maximum score >= t, and false positives are the normal rows scoring >= t.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    segs = segments(y)
    if not segs:
        return 0.0
    seg_max = np.array([s[a:b].max() for a, b in segs])
    seg_len = np.array([b - a for a, b in segs], dtype=np.float64)
    normal = np.sort(s[~y])
    order = np.argsort(-seg_max)
    # candidate thresholds: each segment maximum (anything in between only adds false positives)
    cand = seg_max[order]
    tp = np.cumsum(seg_len[order])
    fp = len(normal) - np.searchsorted(normal, cand, side="left")
    fn = seg_len.sum() - tp
    return float(_f1(tp, fp, fn).max())


def event_scores(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(event recall, event precision) at a threshold.

    Recall: share of true anomaly segments with at least one flagged row. Precision: share of
    flagged runs (contiguous flagged rows) that overlap a true segment.
    """
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    true_segs = segments(y)
    pred_segs = segments(pred)
    recall = float(np.mean([pred[a:b].any() for a, b in true_segs])) if true_segs else 0.0
    precision = float(np.mean([y[a:b].any() for a, b in pred_segs])) if pred_segs else 0.0
    return recall, precision


def alert_scores(labels: np.ndarray, alerts: Sequence[Alert]) -> tuple[float, float, float | None]:
    """(event recall, event precision, mean time to detect in rows) counting alerts, not rows.

    Recall: share of incidents that an alert episode (first to last above-threshold row) overlaps.
    Precision: share of alerts that overlap an incident. Time to detect: rows from an incident's start
    to the row its first overlapping alert was raised (0 when raised before the incident began);
    None when no incident is detected.
    """
    true_segs = segments(labels)
    overlaps = [[a for a in alerts if a.start < stop and start <= a.end] for start, stop in true_segs]
    recall = float(np.mean([bool(hit) for hit in overlaps])) if true_segs else 0.0
    precision = (
        float(np.mean([any(a.start < b and s <= a.end for s, b in true_segs) for a in alerts])) if alerts else 0.0
    )
    delays = [max(0, min(a.opened for a in hit) - start) for (start, _), hit in zip(true_segs, overlaps) if hit]
    return recall, precision, float(np.mean(delays)) if delays else None


def hitrate(
    contributions: np.ndarray,
    interpretation: Sequence[tuple[int, int, Sequence[int]]],
    labels: np.ndarray,
    percent: int = 100,
) -> float:
    """HitRate@P% of a root-cause ranking (OmniAnomaly, KDD 2019).

    For every labelled row inside an interpreted segment with root-cause set G, take the
    floor(P% * |G|) metrics with the largest contribution; the hit is |top ∩ G| / |G|. Mean over rows.
    """
    contributions = np.asarray(contributions)
    y = np.asarray(labels).astype(bool)
    hits = []
    for start, end, dims in interpretation:
        truth = set(dims)
        k = int(np.floor(percent / 100 * len(truth)))
        rows = [r for r in range(start, min(end + 1, len(y))) if y[r]]
        if not rows or k == 0:
            continue
        top = np.argsort(-contributions[rows], axis=1, kind="stable")[:, :k]
        hits += [len(truth.intersection(t.tolist())) / len(truth) for t in top]
    return float(np.mean(hits)) if hits else float("nan")


def operational_threshold(train_scores: np.ndarray, quantile: float) -> float:
    """Threshold from training/validation scores only: their `quantile` quantile."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    return float(np.quantile(np.asarray(train_scores, dtype=np.float64), quantile))
