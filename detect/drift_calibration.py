"""Per-entity calibration of the drift tests: how far apart an entity's own normal days already are.

The iid tests of `detect.drift` (KS per metric, MMD, KS on the scores) ask "could these two samples come
from one distribution of independent rows?". Server telemetry answers no between any two normal days:
rows are autocorrelated, and day-level variation (a busier Monday, a batch job, a slow trend) moves a
metric's daily distribution by more than row-level sampling noise ever would. On the shipped SMD/ASD
series the iid tests flag (nearly) every held-out normal day.

The calibration keeps the tests' statistics and replaces their null distribution by one measured on the
entity's training period:

- **Null sample.** The training series is cut into whole test windows (`DriftConfig.span` rows: one day
  at the defaults). Each window in turn is tested, exactly as the monitor tests a served window, against
  a reference built (`reference_sample`) from all the other training windows: leave one window out.
  Whole windows are the resampling unit, so the autocorrelation inside a window and the day-to-day
  variation between windows are both in the null; no independence of rows is assumed.
- **Effective sample size.** A two-sample distance of n independent rows shrinks like 1/sqrt(n). Real
  windows behave like fewer rows ("effective sample size"), a different number per metric. Each
  statistic's null law is therefore taken as its iid law with a free scale (the scale is
  1/sqrt(n_eff)): the Kolmogorov law for a KS distance, the half-normal law for the square root of
  MMD^2 (its tail when one kernel direction dominates). The scale is a one-sided upper confidence bound
  (`DriftConfig.calibration_confidence`, 99%) given the largest of the N null distances: with few
  training days the bound is wide, and fitting to the largest, not the typical, value keeps the rare
  unusual training day (the weekly peak, a re-deploy) inside what counts as normal.
- **Decision.** A window's calibrated p-value is the fitted law's tail probability of its distance. It
  never goes below the iid p-value (the effective sample size never exceeds the real one), and then the
  configured level and multiple-testing correction apply as before. Two further choices sit with the
  tests in `detect.drift`: calibrated KS counts a metric only if it also moved at least
  `ks_min_shift_sigma` (0.5) reference stds (KS, a rank test, reports a quantised metric's step to the
  adjacent value at full strength), and MMD divides each standardised metric by its largest day-to-day
  move in the training days (`move_scales`), so that metrics whose normal days differ a lot do not
  drown the kernel.

Nothing here is tuned to a particular entity: the inputs are the entity's own training windows, the test
level, the confidence and the two laws (global constants, chosen while looking at the six shipped
entities; benchmarks/results/drift.md). The price is sensitivity: a metric whose normal days already
differ a lot needs a larger change before it counts, and one whose critical KS distance is above 1
cannot count at all (`blind_features`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CALIBRATION_FORMAT = 1  # version of the arrays `to_arrays` writes


def _law(name: str) -> Any:
    from scipy import stats

    return {"kolmogorov": stats.kstwobign, "halfnormal": stats.halfnorm}[name]


def max_quantile(n: int, confidence: float) -> float:
    """The probability level q at which the largest of `n` draws is at or below its q**n quantile with
    probability 1 - `confidence`: q**n = 1 - confidence. A scale fitted there is a one-sided upper
    confidence bound: the true null scale is smaller with probability `confidence`."""
    if n < 1:
        raise ValueError(f"max_quantile needs at least one draw, got {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return (1.0 - confidence) ** (1.0 / n)


def fit_scale(null_distances: Sequence[float], law: str, confidence: float) -> float:
    """Upper confidence bound (at `confidence`) on the scale of `law` given the largest of the null
    distances. 0 when every null distance is 0 (a metric constant on every training window)."""
    values = np.asarray(null_distances, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"fit_scale needs finite, non-negative distances, got {values!r}")
    return float(values.max() / _law(law).ppf(max_quantile(len(values), confidence)))


def tail_p_values(distances: np.ndarray, scales: np.ndarray, law: str) -> np.ndarray:
    """Probability, under the fitted law, of a distance at least this large. A zero scale (no
    variation on any training day) gives p = 1 for distance 0 and p = 0 for any distance above it."""
    d = np.asarray(distances, dtype=np.float64)
    s = np.asarray(scales, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s > 0, d / np.where(s > 0, s, 1.0), np.where(d > 0, np.inf, 0.0))
    return np.asarray(_law(law).sf(z), dtype=np.float64)


def critical_distance(scale: float | np.ndarray, level: float, law: str) -> np.ndarray:
    """The distance whose tail probability under the fitted law is `level` (for reports)."""
    return np.asarray(scale, dtype=np.float64) * float(_law(law).isf(level))


@dataclass(frozen=True)
class DriftCalibration:
    """An entity's fitted null scales, for the window they were measured with.

    `ks_scales` has one entry per input metric (KS distance units), `mmd_scale` is on sqrt(MMD^2),
    `score_scale` on the KS distance of the anomaly scores; None where that test was not calibrated.
    """

    window: int  # rows per test window after thinning, as in DriftConfig
    thin: int
    windows: int  # training windows in the null sample
    ks_scales: tuple[float, ...]
    mmd_scale: float | None = None
    score_scale: float | None = None
    # per metric, its largest move between a training window and the rest (Wasserstein-1 in reference
    # stds), at least 1: MMD divides each standardised metric by it (see EntityDriftDetectors)
    move_scales: tuple[float, ...] | None = None

    def fits(self, window: int, thin: int, features: int) -> str | None:
        """Why this calibration cannot serve a test of this shape, or None when it can."""
        if (window, thin) != (self.window, self.thin):
            return f"calibrated for windows of {self.thin} x {self.window} rows, tested with {thin} x {window}"
        if features != len(self.ks_scales) or len(self.move_scales or self.ks_scales) != features:
            return f"calibrated for {len(self.ks_scales)} features, tested with {features}"
        return None

    def ks_p_values(self, distances: np.ndarray) -> np.ndarray:
        return tail_p_values(distances, np.asarray(self.ks_scales), "kolmogorov")

    def mmd_p_value(self, mmd2: float) -> float | None:
        if self.mmd_scale is None:
            return None
        return float(tail_p_values(np.sqrt(max(mmd2, 0.0)), np.asarray(self.mmd_scale), "halfnormal"))

    def score_p_value(self, distance: float) -> float | None:
        if self.score_scale is None:
            return None
        return float(tail_p_values(distance, np.asarray(self.score_scale), "kolmogorov"))

    def blind_features(self, level: float) -> list[int]:
        """Metrics whose KS distance cannot reach `level` (their critical distance is above 1)."""
        return [int(i) for i in np.flatnonzero(critical_distance(np.asarray(self.ks_scales), level, "kolmogorov") > 1)]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain float arrays for a bundle's NPZ file (read back with allow_pickle=False)."""
        missing = np.nan
        return {
            "calibration_meta": np.array(
                [
                    CALIBRATION_FORMAT,
                    self.window,
                    self.thin,
                    self.windows,
                    missing if self.mmd_scale is None else self.mmd_scale,
                    missing if self.score_scale is None else self.score_scale,
                ],
                dtype=np.float64,
            ),
            "calibration_ks_scales": np.asarray(self.ks_scales, dtype=np.float64),
            **({} if self.move_scales is None else {"calibration_move_scales": np.asarray(self.move_scales)}),
        }

    @classmethod
    def from_arrays(cls, arrays: Any) -> DriftCalibration | None:
        """The calibration stored by `to_arrays`, or None when the file has none (older bundles)."""
        if "calibration_meta" not in getattr(arrays, "files", arrays):
            return None
        meta = np.asarray(arrays["calibration_meta"], dtype=np.float64)
        if int(meta[0]) != CALIBRATION_FORMAT:
            raise ValueError(f"unknown drift calibration format {int(meta[0])}")

        def optional(value: float) -> float | None:
            return None if np.isnan(value) else float(value)

        return cls(
            window=int(meta[1]),
            thin=int(meta[2]),
            windows=int(meta[3]),
            ks_scales=tuple(float(v) for v in np.asarray(arrays["calibration_ks_scales"], dtype=np.float64)),
            mmd_scale=optional(meta[4]),
            score_scale=optional(meta[5]),
            move_scales=(
                tuple(float(v) for v in np.asarray(arrays["calibration_move_scales"], dtype=np.float64))
                if "calibration_move_scales" in getattr(arrays, "files", arrays)
                else None
            ),
        )
