"""The one small interface every raywatch detector shares: fit / score / explain / save / load.

Inputs are one entity's time-ordered telemetry as a (rows, metrics) float array. `score` returns one
anomaly score per row (higher = more anomalous); `explain` returns each metric's contribution per
row (the root-cause ranking). A fitted detector holds `threshold_`, chosen on training data only.
Saved state is JSON plus `.npz` arrays: loading never unpickles.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from detect.metrics import operational_threshold
from detect.thresholds import DSPOT, DecisionThreshold, spot_state
from detect.thresholds import operational_threshold as tail_threshold


class NotFittedError(RuntimeError):
    """A detector was used before `fit`."""


class Detector(ABC):
    """Base class; subclasses set `name`, implement `_fit`, `score`, `explain`, `_state`, `_restore`."""

    name: ClassVar[str]
    #: training-score quantile used as the operational threshold
    threshold_quantile: float = 0.99
    #: rows over which `explain` holds each metric's peak contribution (detect/attribution.py); 0: none,
    #: each row explained on its own. Serving holds them the same way across requests.
    attribution_half_life_rows: ClassVar[float] = 0.0

    def fit(self, X: np.ndarray) -> Detector:
        X = self._check(X, fitting=True)
        self.n_metrics_ = X.shape[1]
        self._fit(X)
        self.calibrate_on(self.score(X))  # training scores; detectors with a validation split override `fit`
        return self

    def calibrate_on(self, scores: np.ndarray) -> float:
        """Keep `scores` as the calibration scores and set the stored threshold to their `threshold_quantile`
        quantile; returns it. A tail-fitted threshold (detect/thresholds.py) starts from the calibration
        scores; they are not saved with the detector, the DSPOT fitted on them is (`served_spot`). Training
        calls it with the training or validation scores, a retraining job's recalibration with recent ones
        (`train.kinds.DetectorKind.recalibrated`)."""
        self.calibration_scores_ = scores
        self.threshold_ = operational_threshold(scores, self.threshold_quantile)
        return self.threshold_

    def _fit(self, X: np.ndarray) -> None:
        """Learn from X; detectors that override `fit` itself need not implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement _fit or override fit")

    @abstractmethod
    def score(self, X: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def explain(self, X: np.ndarray) -> np.ndarray: ...

    def predict(self, X: np.ndarray) -> np.ndarray:
        """1 where the score reaches the operational threshold."""
        return (self.score(X) >= self.threshold_).astype(np.int8)

    def _check(self, X: np.ndarray, fitting: bool = False) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) == 0:
            raise ValueError(f"{self.name}: expected a non-empty (rows, metrics) array, got shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError(f"{self.name}: input holds NaN or inf")
        if not fitting:
            if not hasattr(self, "n_metrics_"):
                raise NotFittedError(f"{self.name}: call fit() first")
            if X.shape[1] != self.n_metrics_:
                raise ValueError(f"{self.name}: trained on {self.n_metrics_} metrics, got {X.shape[1]}")
        return X

    def context_rows(self) -> int:
        """Rows before a served row that its score depends on: the history a caller must send, or the
        ingress keep, to score a row exactly as the batch path does (0: each row on its own)."""
        return 0

    def online_threshold(self) -> DSPOT | DecisionThreshold:
        """The operational threshold as `raywatch evaluate` judges it and the ingress serves it, fresh: DSPOT
        fitted on the calibration scores (`detect.thresholds.operational_threshold`). ValueError where they
        are too few for a tail."""
        return tail_threshold(self.calibration_scores_)

    def served_spot(self) -> dict[str, Any] | None:
        """The state of the operational threshold (DSPOT, `detect.thresholds.operational_threshold`) fitted
        on this detector's calibration scores, saved with it: the serving ingress judges each served row
        against its threshold and keeps it learning from there, as `raywatch evaluate` does. None where
        there is no tail to fit."""
        scores = getattr(self, "calibration_scores_", None)
        return spot_state(scores) if scores is not None else getattr(self, "spot_state_", None)

    # persistence: params.json + arrays.npz
    @abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...

    @abstractmethod
    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None: ...

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, named arrays): what `save` writes and `from_state` reads back (a detector
        holding others, the stacked ensemble, saves theirs inside its own)."""
        params, arrays = self._state()
        meta = {
            "detector": self.name,
            "n_metrics": self.n_metrics_,
            "threshold": self.threshold_,
            "spot": self.served_spot(),
            "params": params,
        }
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Detector:
        if meta["detector"] != cls.name:
            raise ValueError(f"holds a {meta['detector']!r} detector, not {cls.name!r}")
        obj = cls.__new__(cls)
        obj.n_metrics_ = int(meta["n_metrics"])
        obj.threshold_ = float(meta["threshold"])
        obj.spot_state_ = meta.get("spot")  # absent in bundles saved before served SPOT: the stored threshold
        obj._restore(meta["params"], arrays)
        return obj

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta, arrays = self.to_state()
        (path / "detector.json").write_text(json.dumps(meta, indent=2))
        np.savez(path / "arrays.npz", **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        path = Path(path)
        meta = json.loads((path / "detector.json").read_text())
        if meta["detector"] != cls.name:
            raise ValueError(f"{path}: holds a {meta['detector']!r} detector, not {cls.name!r}")
        with np.load(path / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls.from_state(meta, arrays)
