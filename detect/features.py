"""The one feature pipeline: telemetry -> model inputs, described by a JSON-serialisable FeatureSpec.

Training (batch path) and serving (streaming path, one sample per entity at a time) compute the same
window statistics in the same order (`_window_features` over built windows, `_sliced_features` over
slices of the padded series for many rows at once), so the two paths give bit-identical features.

Warm-up rule: before an entity has `spec.history` samples, its history is padded by repeating its
first sample, so every row (the first one included) gets features and a window.
NaN/inf rule: inf is rejected; in the streaming path a NaN is replaced by the entity's last value
(a NaN in an entity's first sample is rejected). The batch path expects frames already checked by
`detect.data.validate_values` and rejects any non-finite value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from detect.data import TelemetryError

_CHUNK = 4096  # rows per batch-path chunk, bounds the temporaries at a few chunk * metrics arrays


@dataclass(frozen=True)
class FeatureSpec:
    """Which metrics, and which window statistics, a model is trained on."""

    metrics: tuple[str, ...]
    window: int = 30  # W: rows in each sequence-model window
    lags: tuple[int, ...] = (1, 5)
    rolling: tuple[int, ...] = (10, 30)  # rolling mean/std/min/max over these lengths
    diffs: tuple[int, ...] = (1,)  # x[t] - x[t-d]
    rates: tuple[int, ...] = (5,)  # (x[t] - x[t-k]) / k, change per step
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        for name in ("lags", "rolling", "diffs", "rates"):
            values = tuple(int(v) for v in getattr(self, name))
            if any(v < 1 for v in values):
                raise ValueError(f"FeatureSpec.{name}: every entry must be >= 1, got {values}")
            object.__setattr__(self, name, values)
        if not self.metrics:
            raise ValueError("FeatureSpec.metrics: at least one metric is required")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("FeatureSpec.metrics: metric names must be unique")
        if self.window < 1:
            raise ValueError(f"FeatureSpec.window must be >= 1, got {self.window}")

    @property
    def n_metrics(self) -> int:
        return len(self.metrics)

    @property
    def history(self) -> int:
        """Rows of history needed to compute the newest row's features and window."""
        reach = [self.window, *self.rolling, *(k + 1 for k in (*self.lags, *self.diffs, *self.rates))]
        return max(reach)

    def feature_names(self) -> list[str]:
        names = list(self.metrics)
        for k in self.lags:
            names += [f"{m}__lag{k}" for m in self.metrics]
        for w in self.rolling:
            for stat in ("mean", "std", "min", "max"):
                names += [f"{m}__{stat}{w}" for m in self.metrics]
        for d in self.diffs:
            names += [f"{m}__diff{d}" for m in self.metrics]
        for k in self.rates:
            names += [f"{m}__rate{k}" for m in self.metrics]
        return names

    @property
    def n_features(self) -> int:
        per_metric = 1 + len(self.lags) + 4 * len(self.rolling) + len(self.diffs) + len(self.rates)
        return per_metric * len(self.metrics)  # == len(self.feature_names()), without building the names

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"FeatureSpec JSON has unknown fields {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        return cls.from_json(Path(path).read_text())

    def check_metrics(self, names: Sequence[str], source: str = "input") -> None:
        """Refuse input whose metric names differ from the trained ones, naming the difference."""
        names = list(names)
        if names == list(self.metrics):
            return
        missing = [m for m in self.metrics if m not in names]
        extra = [m for m in names if m not in self.metrics]
        if missing or extra:
            raise TelemetryError(
                f"{source}: metrics differ from the model's FeatureSpec: missing {missing}, unexpected {extra}"
            )
        raise TelemetryError(
            f"{source}: metrics are in a different order than the model's FeatureSpec {list(self.metrics)}"
        )


def _window_features(win: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Features of the newest row of each history window. win: (n, history, M) float64, C-contiguous."""
    h = win.shape[1]
    last = win[:, h - 1, :]
    parts = [last]
    parts += [win[:, h - 1 - k, :] for k in spec.lags]
    for w in spec.rolling:
        tail = win[:, h - w :, :]
        parts += [tail.mean(axis=1), tail.std(axis=1), tail.min(axis=1), tail.max(axis=1)]
    parts += [last - win[:, h - 1 - d, :] for d in spec.diffs]
    parts += [(last - win[:, h - 1 - k, :]) / k for k in spec.rates]
    return np.concatenate(parts, axis=1)


def _padded(values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    if values.ndim != 2 or values.shape[1] != spec.n_metrics:
        raise TelemetryError(f"expected an array of shape (rows, {spec.n_metrics}), got {values.shape}")
    if len(values) == 0:
        raise TelemetryError("empty telemetry: at least one row is required")
    if not np.isfinite(values).all():
        row, col = np.argwhere(~np.isfinite(values))[0]
        raise TelemetryError(f"metric {spec.metrics[col]!r} row {row}: non-finite value {values[row, col]}")
    pad = np.repeat(values[:1], spec.history - 1, axis=0)
    return np.concatenate([pad, values]).astype(np.float64)


def _running(op: np.ufunc, values: np.ndarray, w: int) -> np.ndarray:
    """op (np.minimum or np.maximum) over each w rows of values: row s of the result covers rows
    s .. s + w - 1. By doubling (spans 1, 2, 4, ...) then one overlapping step: about log2(w)
    whole-array operations instead of w."""
    out, span = values, 1
    while 2 * span <= w:
        out = op(out[:-span], out[span:])
        span *= 2
    if span < w:
        out = op(out[: len(out) - (w - span)], out[w - span :])
    return out


def _sliced_features(padded: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """`_window_features` of every window of a padded (n + history - 1, M) array, bit for bit, without
    building the (n, history, M) windows: window offset k of all n rows is the slice padded[k : k + n],
    so each statistic is a few whole-array operations per offset. Sums run over the offsets in the
    order numpy's reduction over a window's rows takes (first to last), so the means and standard
    deviations round exactly as `_window_features` rounds them; min and max are exact in any order.
    About 4x faster from some tens of rows on (1,000 rows x 38 metrics: 12 -> 3 ms)."""
    h = spec.history
    n = len(padded) - h + 1

    def at(k: int) -> np.ndarray:  # element [:, k, :] of the windows
        return padded[k : k + n]

    last = at(h - 1)
    parts = [last]
    parts += [at(h - 1 - k) for k in spec.lags]
    deviation = np.empty_like(last)
    for w in spec.rolling:
        first = h - w
        total = at(first).copy()
        for k in range(first + 1, h):
            total += at(k)
        mean = total / w  # np.mean: the sum, then a true division by the count
        squares = np.zeros_like(mean)
        for k in range(first, h):  # np.std (ddof 0): the sum of squared deviations from that mean
            np.subtract(at(k), mean, out=deviation)
            deviation *= deviation
            squares += deviation
        low = _running(np.minimum, padded, w)[first : first + n]
        high = _running(np.maximum, padded, w)[first : first + n]
        parts += [mean, np.sqrt(squares / w), low, high]
    parts += [last - at(h - 1 - d) for d in spec.diffs]
    parts += [(last - at(h - 1 - k)) / k for k in spec.rates]
    return np.concatenate(parts, axis=1)


_SLICED_FROM = 32  # rows from which _sliced_features beats building the windows


def entity_features(values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Batch path for one entity's time-ordered (T, M) array -> (T, n_features) float64."""
    padded = _padded(np.asarray(values, dtype=np.float64), spec)
    out = np.empty((len(values), spec.n_features), dtype=np.float64)
    for start in range(0, len(values), _CHUNK):
        chunk = padded[start : start + _CHUNK + spec.history - 1]
        out[start : start + len(chunk) - spec.history + 1] = _sliced_features(chunk, spec)
    return out


def entity_windows(values: np.ndarray, spec: FeatureSpec, dtype=np.float32) -> np.ndarray:
    """Batch path for sequence models: (T, M) -> (T, W, M), row t = the W rows ending at t."""
    padded = _padded(np.asarray(values, dtype=np.float64), spec)
    view = np.lib.stride_tricks.sliding_window_view(padded, spec.window, axis=0)  # (T+h-W, M, W)
    offset = spec.history - spec.window
    return np.ascontiguousarray(view[offset:].transpose(0, 2, 1), dtype=dtype)


def tail_windows(values: np.ndarray, spec: FeatureSpec, n: int, length: int) -> np.ndarray:
    """The `length`-row windows ending at each of the last `n` rows of one entity's (T, M) array,
    shape (n, length, M) float64: row i equals `entity_windows(values)[-n:][i]` (length = spec.window)
    and feeds `_window_features` for the ensemble (length = spec.history). What serving computes."""
    if not 1 <= n <= len(values):
        raise TelemetryError(f"expected 1 to {len(values)} new rows, got {n}")
    padded = _padded(np.asarray(values, dtype=np.float64), spec)[-(n + length - 1) :]
    view = np.lib.stride_tricks.sliding_window_view(padded, length, axis=0)  # (n, M, length)
    return np.ascontiguousarray(view.transpose(0, 2, 1))


def window_features(windows: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Features of the newest row of each (n, spec.history, M) window (from `tail_windows`)."""
    return _window_features(np.ascontiguousarray(windows, dtype=np.float64), spec)


def tail_features(values: np.ndarray, spec: FeatureSpec, n: int) -> np.ndarray:
    """Features of the last `n` rows of one entity's (T, M) array (older rows are context), shape
    (n, n_features): equal to `window_features(tail_windows(values, spec, n, spec.history), spec)` and
    to `entity_features(values, spec)[-n:]`. What the ensemble's replicas compute per request."""
    if n < _SLICED_FROM:
        return window_features(tail_windows(values, spec, n, spec.history), spec)
    if not 1 <= n <= len(values):
        raise TelemetryError(f"expected 1 to {len(values)} new rows, got {n}")
    return _sliced_features(_padded(np.asarray(values, dtype=np.float64), spec)[-(n + spec.history - 1) :], spec)


def frame_features(frame: pd.DataFrame, spec: FeatureSpec, entity_col: str | None = "entity") -> np.ndarray:
    """Batch path over a frame that may hold many entities (each in time order); rows keep their order."""
    missing = [m for m in spec.metrics if m not in frame.columns]
    if missing:
        raise TelemetryError(f"frame: missing metric column(s) {missing} required by the FeatureSpec")
    values = frame[list(spec.metrics)].to_numpy(dtype=np.float64)
    if entity_col is None or entity_col not in frame.columns:
        return entity_features(values, spec)
    out = np.empty((len(frame), spec.n_features), dtype=np.float64)
    for _, idx in frame.groupby(entity_col, sort=False).indices.items():
        out[idx] = entity_features(values[idx], spec)
    return out


def spec_for(metrics: Sequence[str], **overrides) -> FeatureSpec:
    """A FeatureSpec with the defaults for these metrics; `overrides` replace any field."""
    return FeatureSpec(metrics=tuple(metrics), **overrides)


__all__ = [
    "FeatureSpec",
    "entity_features",
    "entity_windows",
    "frame_features",
    "spec_for",
    "tail_features",
    "tail_windows",
    "window_features",
]
