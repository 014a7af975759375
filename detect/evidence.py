"""The detectors' evidence as the incident predictor's features: what the stacked ensemble learns from.

The ensemble (detect/ensemble.py) stacks the sequence detectors (the autoencoder and the LSTM, fitted
on the entity's normal rows). Per detector, from its smoothed per-metric errors normalised by their
training spread (the errors `SequenceDetector.explain` and the serving runtime rank metrics by):

- the largest `TOP_METRICS` of them, so that a fault in a few metrics shows as clearly as one in many;
- their sum (the detector's score) and its largest value over the last `ROLLING` rows;

and, over all detectors, the largest score as a multiple of that detector's own 99th percentile on its
calibration rows (`evidence_scale`), with its rolling maxima. All are logged (log1p or log).

Every column grows with the evidence: more error never means less incident. The members are held to
that (monotone constraints: `MONOTONE`), so labels that disagree with the detectors in the rows the
ensemble learns from cannot teach it that a large error is normal. On the six shipped entities a
first-half label set says exactly that on some machines (the evidence's PR-AUC on the first half of
smd/machine-1-6 is 0.107, on its second half 0.98); unconstrained members over these columns reach a
second-half PR-AUC of 0.366, constrained ones 0.484 (docs/experiments/monotone-stacking.md).

The columns carry no metric's identity, so a model learnt on one entity reads any other's the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TOP_METRICS = 3  # largest per-metric errors kept per detector
ROLLING = (10, 30)  # rows over which each score's running maximum is taken
CONTEXT = max(ROLLING) - 1  # rows of scores before a row that its features read
MONOTONE = 1  # every column: the incident probability may only grow with it
SCALE_QUANTILE = 0.99  # of a detector's calibration scores: where its evidence reads 1


def n_features(detectors: int) -> int:
    """Columns of the evidence features for `detectors` evidence detectors."""
    return detectors * (TOP_METRICS + 1 + len(ROLLING)) + 1 + len(ROLLING)


def evidence_scale(calibration_scores: np.ndarray) -> float:
    """A detector's scale: its 99th percentile on its calibration rows (what it calls unusual)."""
    return max(float(np.quantile(np.asarray(calibration_scores, dtype=np.float64), SCALE_QUANTILE)), 1e-9)


def rolling_max(values: np.ndarray, rows: int) -> np.ndarray:
    """Each row's largest value over it and the `rows - 1` before it (fewer at the series' start)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    padded = np.concatenate([np.full(rows - 1, values[0]), values])
    return np.lib.stride_tricks.sliding_window_view(padded, rows).max(axis=1)


def evidence_features(errors: Sequence[np.ndarray], scales: Sequence[float]) -> np.ndarray:
    """(rows, n_features(len(errors))) float32 features from each evidence detector's (rows, metrics)
    smoothed normalised per-metric errors of the same rows, oldest first, and its scale."""
    if len(errors) != len(scales) or not errors:
        raise ValueError(f"evidence: {len(errors)} error matrices for {len(scales)} scales")
    columns: list[np.ndarray] = []
    ratios = []
    for err, scale in zip(errors, scales):
        err = np.maximum(np.asarray(err, dtype=np.float64), 0.0)
        top = -np.sort(-err, axis=1)[:, :TOP_METRICS]
        if top.shape[1] < TOP_METRICS:  # fewer metrics than kept: the missing ones show no error
            top = np.pad(top, ((0, 0), (0, TOP_METRICS - top.shape[1])))
        total = err.sum(axis=1)
        level = np.log1p(total)
        columns += [np.log1p(top), level[:, None], *(rolling_max(level, w)[:, None] for w in ROLLING)]
        ratios.append(total / scale)
    combined = np.log(np.maximum(np.max(ratios, axis=0), 1e-9))
    columns += [combined[:, None], *(rolling_max(combined, w)[:, None] for w in ROLLING)]
    return np.column_stack(columns).astype(np.float32)


def contributions(errors: Sequence[np.ndarray], scales: Sequence[float]) -> np.ndarray:
    """Per metric, the detectors' errors on one scale (each over its own `scale`), summed: which metrics
    the evidence comes from (the stacked ensemble's explanation)."""
    return sum(np.asarray(err, dtype=np.float64) / scale for err, scale in zip(errors, scales))
