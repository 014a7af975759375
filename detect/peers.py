"""Peer baselines every raywatch detector is compared with: PCA, IsolationForest, ECOD.

They score raw rows (no window features), as in the figures of shared/data/README.md.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest

from detect.base import Detector

log = logging.getLogger(__name__)


class PCADetector(Detector):
    """Reconstruction error after projecting on the components that keep `variance` of the variance."""

    name = "pca"

    def __init__(self, variance: float = 0.95) -> None:
        self.variance = variance

    def _fit(self, X: np.ndarray) -> None:
        pca = PCA(n_components=self.variance, svd_solver="full").fit(X)
        self.mean_ = pca.mean_
        self.components_ = pca.components_

    def explain(self, X: np.ndarray) -> np.ndarray:
        X = self._check(X)
        centred = X - self.mean_
        recon = centred @ self.components_.T @ self.components_
        return (centred - recon) ** 2

    def score(self, X: np.ndarray) -> np.ndarray:
        return self.explain(X).sum(axis=1)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"variance": self.variance}, {"mean": self.mean_, "components": self.components_}

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.variance = params["variance"]
        self.mean_, self.components_ = arrays["mean"], arrays["components"]


class _RobustExplainMixin:
    """Per-metric contribution = |x - training median| / training IQR, for detectors without their own."""

    def _fit_robust(self, X: np.ndarray) -> None:
        self.median_ = np.median(X, axis=0)
        q75, q25 = np.percentile(X, [75, 25], axis=0)
        self.scale_ = np.where(q75 - q25 > 1e-9, q75 - q25, np.maximum(X.std(axis=0), 1e-6))

    def _robust_explain(self, X: np.ndarray) -> np.ndarray:
        return np.abs(X - self.median_) / self.scale_


class IsolationForestDetector(_RobustExplainMixin, Detector):
    """IsolationForest (200 trees); score = the negated sklearn score_samples."""

    name = "iforest"

    def __init__(self, n_estimators: int = 200, seed: int = 0) -> None:
        self.n_estimators = n_estimators
        self.seed = seed

    def _fit(self, X: np.ndarray) -> None:
        self._fit_robust(X)
        self.train_ = X
        self.model_ = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(X)

    def score(self, X: np.ndarray) -> np.ndarray:
        return -self.model_.score_samples(self._check(X))

    def explain(self, X: np.ndarray) -> np.ndarray:
        return self._robust_explain(self._check(X))

    # refitting from the stored training rows with the same seed rebuilds the same forest
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"n_estimators": self.n_estimators, "seed": self.seed}, {"train": self.train_}

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.n_estimators, self.seed = params["n_estimators"], params["seed"]
        self._fit(arrays["train"])


class ECODDetector(Detector):
    """ECOD (PyOD): empirical-CDF tail probabilities; per-metric tail scores explain each row."""

    name = "ecod"

    def _fit(self, X: np.ndarray) -> None:
        from pyod.models.ecod import ECOD

        self.train_ = X
        self.model_ = ECOD().fit(X)

    def explain(self, X: np.ndarray) -> np.ndarray:
        X = self._check(X)
        with np.errstate(all="ignore"):
            self.model_.decision_function(X)
        return np.asarray(self.model_.O[-len(X) :])  # PyOD keeps the per-dimension scores in .O

    def score(self, X: np.ndarray) -> np.ndarray:
        return self.explain(X).sum(axis=1)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {"train": self.train_}

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._fit(arrays["train"])


PEERS: dict[str, type[Detector]] = {cls.name: cls for cls in (PCADetector, IsolationForestDetector, ECODDetector)}
