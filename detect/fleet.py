"""Fleet models: one sequence model per metric schema, trained across many entities, that scores an entity
it has never seen from its first rows (cold start).

A fleet model cannot learn one entity's units, so every window it reads is put in the entity's own units
first: centred on the entity's median and divided by its robust spread (interquartile range / 1.349),
per metric. These come from the entity's first `BASELINE_ROWS` rows (fewer while it is younger: then
from every row before the window), and are then frozen: an incident later in the series cannot hide
itself by moving them, and an entity's state is two numbers per metric. While an entity has few rows,
its spread is shrunk toward the fleet's typical spread of the metric (`prior_scale`, `prior_rows`
pseudo-rows), so its first windows are neither blown up nor silent.

`WindowNormaliser.series_windows` (training, evaluation: every row of a series) and `tail_windows`
(serving: the last rows) compute the same windows. Serving passes a young entity's rows from its first
one (the ingress history holds them) and a grown one's frozen `entity_baseline`, kept by the ingress.
A fleet model lives in a detector kind's bundle beside the per-entity ones, under `fleet_key(metrics)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from detect.features import FeatureSpec, entity_windows, tail_windows

FLEET_PREFIX = "fleet:"
BASELINE_ROWS = 192  # an entity's first rows, from which its statistics are frozen
# rows past BASELINE_ROWS after which serving passes the frozen baseline instead of the rows from the first:
# more than any window plus smoothing, so every window it scores then starts after the baseline rows
BASELINE_MARGIN = 64
IQR_TO_SIGMA = 1.349  # the interquartile range of a normal distribution, in standard deviations


def fleet_key(metrics: Iterable[str]) -> str:
    """The bundle key of the fleet model for a metric schema: the same names in any order give the same key."""
    names = sorted(metrics)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return f"{FLEET_PREFIX}{len(names)}m-{digest}"


def is_fleet_key(key: str | None) -> bool:
    return bool(key) and key.startswith(FLEET_PREFIX)


def entity_baseline(first_rows: np.ndarray) -> np.ndarray:
    """An entity's frozen statistics from its first rows: (2, M), its median and robust spread per metric."""
    q25, q50, q75 = np.percentile(np.asarray(first_rows, dtype=np.float64), [25, 50, 75], axis=0)
    return np.stack([q50, (q75 - q25) / IQR_TO_SIGMA])


@dataclass
class WindowNormaliser:
    """Puts each window of an entity's series in that entity's units (see the module docstring)."""

    prior_scale: np.ndarray  # (M,) the fleet's typical robust spread of each metric
    prior_rows: int = 16  # weight of the prior spread, in rows
    floor: float = 1e-3  # smallest scale: a metric constant everywhere must not blow up

    @classmethod
    def fit(cls, series: Sequence[np.ndarray], prior_rows: int = 16) -> WindowNormaliser:
        """The prior from training series of many entities: each metric's median spread across them."""
        if not series:
            raise ValueError("a fleet normaliser needs at least one entity's series")
        spreads = np.stack([entity_baseline(np.asarray(X)[:BASELINE_ROWS])[1] for X in series])
        return cls(np.maximum(np.median(spreads, axis=0), 1e-3), prior_rows)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"fleet_prior_scale": self.prior_scale, "fleet_params": np.array([self.prior_rows, self.floor])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> WindowNormaliser | None:
        if "fleet_prior_scale" not in arrays:
            return None
        prior_rows, floor = arrays["fleet_params"].tolist()
        return cls(np.asarray(arrays["fleet_prior_scale"], dtype=np.float64), int(prior_rows), floor)

    def _scale(self, spread: np.ndarray, rows: np.ndarray | float) -> np.ndarray:
        weight = self.prior_rows
        return np.maximum(np.sqrt((rows * spread**2 + weight * self.prior_scale**2) / (rows + weight)), self.floor)

    def _stats(self, values: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(centre, scale), (k, M) each, of the windows starting at `starts` (row indices into a series
        that starts at `values[0]`; a window padded with the first row starts at a negative index)."""
        k, m = len(starts), values.shape[1]
        centre, scale = np.empty((k, m)), np.empty((k, m))
        grown = starts >= BASELINE_ROWS
        if grown.any():
            centre[grown], spread = entity_baseline(values[:BASELINE_ROWS])
            scale[grown] = self._scale(spread, BASELINE_ROWS)
        for i in np.flatnonzero(~grown):  # a young entity: every row before the window
            before = values[: max(int(starts[i]), 0)]
            if len(before):
                centre[i], spread = entity_baseline(before)
                scale[i] = self._scale(spread, len(before))
            else:  # nothing before the window: its own first row is the centre, the fleet's spread the scale
                centre[i], scale[i] = values[0], self._scale(np.zeros(m), 0)
        return centre, scale

    @staticmethod
    def _normalised(windows: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return ((windows - centre[:, None, :]) / scale[:, None, :]).astype(np.float32)

    def series_windows(self, values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
        """Every row's window of one entity's (T, M) series from its first row, normalised: (T, W, M)."""
        values = np.asarray(values, dtype=np.float64)
        windows = entity_windows(values, spec, dtype=np.float64)
        return self._normalised(windows, *self._stats(values, np.arange(len(values)) - spec.window + 1))

    def tail_windows(
        self, values: np.ndarray, spec: FeatureSpec, n: int, baseline: np.ndarray | None = None
    ) -> np.ndarray:
        """The windows of the last `n` rows, normalised: equal to `series_windows(series)[-n:]` when
        `values` is the series from its first row, or when `baseline` is the series' `entity_baseline`
        and every one of those windows starts `BASELINE_ROWS` rows or more into the series."""
        values = np.asarray(values, dtype=np.float64)
        windows = tail_windows(values, spec, n, spec.window)
        if baseline is None:
            return self._normalised(
                windows, *self._stats(values, np.arange(len(values) - n, len(values)) - spec.window + 1)
            )
        centre, spread = np.asarray(baseline, dtype=np.float64)
        scale = self._scale(spread, BASELINE_ROWS)
        return self._normalised(
            windows, np.broadcast_to(centre, (n, len(centre))), np.broadcast_to(scale, (n, len(scale)))
        )
