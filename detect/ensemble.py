"""Ensemble incident predictor: RandomForest + XGBoost + LightGBM + a logistic baseline, soft vote.

Input rows are flat feature vectors from the FeatureSpec (lags, rolling stats, differences, rates of
change). Target: an incident is under way or starts within the next `horizon` rows. The vote weights
are fitted on a validation tail of the training data (time order, never shuffled), as is the
operational threshold. On the synthetic fleet it also learns the incident kind (root-cause class).
Labels with too few incidents never stop it: where they hold fewer than the two that learning and
validating need, it adds incidents injected into the entity's own normal rows in the synthetic
generator's shapes (detect/synthetic.py).

Saved state never needs unpickling: XGBoost as its JSON model, LightGBM as its text model, the
forest as an ONNX graph (skl2onnx), the logistic model and scaler as arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from detect.base import Detector
from detect.config import config_dataclass
from detect.features import FeatureSpec, entity_features
from detect.metrics import best_f1, segments
from detect.synthetic import inject_incidents

log = logging.getLogger(__name__)

MEMBERS = ("rf", "xgb", "lgbm", "logistic")
# where the labels hold no incident, inject one per this many rows (at least MIN_INJECTED) to learn from
ROWS_PER_INJECTED, MIN_INJECTED = 1000, 4


def incident_target(labels: np.ndarray, horizon: int) -> np.ndarray:
    """1 where an incident is under way at t or starts within t+1..t+horizon."""
    y = np.asarray(labels).astype(np.int8)
    padded = np.concatenate([y, np.zeros(horizon, dtype=np.int8)])
    window = np.lib.stride_tricks.sliding_window_view(padded, horizon + 1)
    return window.max(axis=1).astype(np.int8)


def with_enough_incidents(
    X: np.ndarray, labels: np.ndarray, horizon: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(X, labels, lead target, incidents injected) as the ensemble learns from them. Real incidents are
    learnt where there are any; the fit and the validation part each need one, so where the labels hold
    fewer than two (none, or one that no split can share), incidents injected into the rows that no real
    incident holds are added in the synthetic generator's shapes. A real incident's rows stay as they are."""
    target = incident_target(labels, horizon)
    if len(segments(target)) >= 2:
        return X, labels, target, 0
    injected_X, injected = inject_incidents(X, max(MIN_INJECTED, len(X) // ROWS_PER_INJECTED), seed=seed)
    real = np.asarray(labels).astype(bool)
    injected = injected.astype(bool) & ~real
    count = len(segments(injected))
    log.info(
        "too few labelled incidents to learn and validate on: adding injected ones",
        extra={"labelled": len(segments(real)), "injected": count},
    )
    labels = (real | injected).astype(np.int8)
    return np.where(injected[:, None], injected_X, X), labels, incident_target(labels, horizon), count


def vote_weights(P: np.ndarray, y: np.ndarray, maxiter: int = 400) -> tuple[np.ndarray, float]:
    """Non-negative weights summing to 1 over the columns of member probabilities `P` that minimise the
    log-loss of the weighted vote against `y`, and that log-loss."""

    def loss(theta: np.ndarray) -> float:
        p = np.clip(P @ softmax(theta), 1e-6, 1 - 1e-6)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    res = minimize(loss, np.zeros(P.shape[1]), method="Nelder-Mead", options={"maxiter": maxiter})
    return softmax(res.x), float(res.fun)


def split_with_incidents_on_both_sides(target: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) masks: the newest `val_fraction` of the rows for validation when both parts then
    hold an incident; otherwise every third tenth of the rows (interleaved blocks), with the first incident
    moved to the fit part or the last to the validation part where one of them would hold none. Both
    parts hold an incident whenever `target` holds two."""
    n = len(target)
    rows = np.arange(n)
    val = rows >= int(n * (1 - val_fraction))
    if target[val].any() and target[~val].any():
        return ~val, val
    val = (rows // max(n // 10, 1)) % 3 == 2
    runs = segments(target)
    if runs and not target[val].any():
        val[slice(*runs[-1])] = True
    if runs and not target[~val].any():
        val[slice(*runs[0])] = False
    return ~val, val


@config_dataclass
class EnsembleConfig:
    """Hyperparameters of the ensemble (Ray Tune searches the members' ones); flat, as `--set` names them."""

    horizon: int = 10  # rows ahead: a row is positive when an incident is under way or starts within them
    val_fraction: float = 0.3  # the newest share of the training rows, for vote weights and the threshold
    rf_trees: int = 200  # random forest
    rf_max_depth: int = 12
    xgb_rounds: int = 200  # XGBoost, on Ray (XGBoostTrainer)
    xgb_max_depth: int = 6
    xgb_eta: float = 0.1
    lgbm_rounds: int = 200  # LightGBM, on Ray (LightGBMTrainer)
    lgbm_leaves: int = 31
    lgbm_lr: float = 0.05
    logistic_c: float = 1.0  # logistic baseline: inverse L2 strength
    # engineered features (detect.features.FeatureSpec)
    lags: tuple[int, ...] = (1, 5)
    rolling: tuple[int, ...] = (10, 30)
    seed: int = 0


def xgb_params(cfg: EnsembleConfig, pos_weight: float) -> dict[str, Any]:
    return {
        "objective": "binary:logistic",
        "eval_metric": "aucpr",
        "max_depth": cfg.xgb_max_depth,
        "eta": cfg.xgb_eta,
        "scale_pos_weight": pos_weight,
        "seed": cfg.seed,
        "nthread": 2,
        "tree_method": "hist",
    }


def lgbm_params(cfg: EnsembleConfig, pos_weight: float) -> dict[str, Any]:
    return {
        "objective": "binary",
        "num_leaves": cfg.lgbm_leaves,
        "learning_rate": cfg.lgbm_lr,
        "verbose": -1,
        "scale_pos_weight": pos_weight,
        "seed": cfg.seed,
        "num_threads": 2,
    }


class EnsembleDetector(Detector):
    """Supervised: `fit(X, labels)` with X one entity's (rows, metrics) telemetry in time order."""

    name = "ensemble"
    supervised = True

    def __init__(self, config: EnsembleConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        cfg = config if isinstance(config, EnsembleConfig) else EnsembleConfig.from_dict(config or {})
        self.config = EnsembleConfig.from_dict({**asdict(cfg), **overrides})

    # -- training ----------------------------------------------------------------------------------
    def prepare(self, X: np.ndarray, labels: np.ndarray, metrics: list[str] | None = None):
        """Features and lead target of the labels with enough incidents (`with_enough_incidents`), split in
        time order into (fit, validation) parts that each hold one (`split_with_incidents_on_both_sides`)."""
        X = self._check(X, fitting=True)
        labels = np.asarray(labels)
        if labels.shape != (len(X),):
            raise ValueError(f"ensemble: labels must have one value per row ({len(X)}), got shape {labels.shape}")
        self.n_metrics_ = X.shape[1]
        names = tuple(metrics) if metrics else tuple(f"m{i:02d}" for i in range(X.shape[1]))
        self.spec_ = FeatureSpec(metrics=names, lags=self.config.lags, rolling=self.config.rolling)
        X, labels, target, self.injected_incidents_ = with_enough_incidents(
            X, labels, self.config.horizon, self.config.seed
        )
        features = entity_features(X, self.spec_).astype(np.float32)
        fit_mask, val_mask = split_with_incidents_on_both_sides(target, self.config.val_fraction)
        if not (target[fit_mask].any() and target[val_mask].any()):
            raise ValueError(f"ensemble: {len(X)} rows hold too few incidents to learn and validate on")
        return features, target, fit_mask, val_mask

    def fit(
        self,
        X: np.ndarray,
        labels: np.ndarray,
        metrics: list[str] | None = None,
        kinds: np.ndarray | None = None,
        train_boosters: Callable[[np.ndarray, np.ndarray], dict[str, Any]] | None = None,
    ) -> EnsembleDetector:
        """Fit every member on the fit part, the vote weights and threshold on the validation part.

        `train_boosters(features, target)` may train the "xgb" / "lgbm" members elsewhere (Ray Train's
        trainers, train/boosters.py); by default they train in-process.
        """
        features, target, fit_mask, val_mask = self.prepare(X, labels, metrics)
        boosters = train_boosters(features[fit_mask], target[fit_mask]) if train_boosters else {}
        self.fit_members(features[fit_mask], target[fit_mask], boosters)
        self.fit_vote(features[val_mask], target[val_mask])
        self.validation_["injected_incidents"] = self.injected_incidents_
        if kinds is not None:
            self.fit_kinds(features, np.asarray(kinds), target)
        return self

    def pos_weight(self, target: np.ndarray) -> float:
        return float((len(target) - target.sum()) / max(target.sum(), 1))

    def fit_members(self, F: np.ndarray, y: np.ndarray, boosters: dict[str, Any]) -> None:
        import lightgbm as lgb
        import xgboost as xgb
        from sklearn.ensemble import RandomForestClassifier

        cfg, w = self.config, self.pos_weight(y)
        self.mean_, self.std_ = F.mean(axis=0), np.maximum(F.std(axis=0), 1e-6)
        self.xgb_ = boosters.get("xgb") or xgb.train(xgb_params(cfg, w), xgb.DMatrix(F, label=y), cfg.xgb_rounds)
        self.lgbm_ = boosters.get("lgbm") or lgb.train(lgbm_params(cfg, w), lgb.Dataset(F, label=y), cfg.lgbm_rounds)
        self.rf_ = RandomForestClassifier(
            n_estimators=cfg.rf_trees,
            max_depth=cfg.rf_max_depth,
            n_jobs=2,
            class_weight="balanced_subsample",
            random_state=cfg.seed,
        ).fit(F, y)
        self.logistic_ = self._fit_logistic((F - self.mean_) / self.std_, y)
        self.rf_onnx_ = None
        self.importance_ = self._metric_importance()

    def _fit_logistic(self, Z: np.ndarray, y: np.ndarray) -> np.ndarray:
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=self.config.logistic_c, class_weight="balanced", max_iter=500).fit(Z, y)
        return np.concatenate([lr.coef_[0], lr.intercept_]).astype(np.float64)

    def fit_vote(self, F: np.ndarray, y: np.ndarray) -> None:
        """Vote weights that minimise validation log-loss (`vote_weights`); threshold = best validation F1."""
        P = np.clip(self.member_matrix(F), 1e-6, 1 - 1e-6)
        self.weights_, log_loss = vote_weights(P, y)
        val_scores = self.calibration_scores_ = P @ self.weights_
        f1, thr = best_f1(y, val_scores)
        self.threshold_ = thr if np.isfinite(thr) else 0.5
        self.validation_ = {"f1": f1, "log_loss": log_loss, "rows": int(len(y)), "positives": int(y.sum())}

    def fit_kinds(self, features: np.ndarray, kinds: np.ndarray, target: np.ndarray) -> None:
        """Incident kind (root-cause class) of rows inside incidents: LightGBM multiclass."""
        import lightgbm as lgb

        mask = (kinds != "") & (kinds != None)  # noqa: E711 - object arrays may hold None
        self.kind_names_ = sorted(set(kinds[mask].tolist()))
        if len(self.kind_names_) < 2:
            self.kind_model_ = None
            return
        codes = np.array([self.kind_names_.index(k) for k in kinds[mask]])
        params = {
            "objective": "multiclass",
            "num_class": len(self.kind_names_),
            "verbose": -1,
            "num_threads": 2,
            "seed": self.config.seed,
            "learning_rate": 0.1,
            "num_leaves": 15,
        }
        self.kind_model_ = lgb.train(params, lgb.Dataset(features[mask], label=codes), 100)

    # -- scoring -------------------------------------------------------------------------------------
    def member_matrix(self, F: np.ndarray) -> np.ndarray:
        """(rows, 4) incident probability of rf, xgb, lgbm, logistic."""
        import xgboost as xgb

        F = np.asarray(F, dtype=np.float32)
        rf = self._rf_proba(F)
        xg = self.xgb_.predict(xgb.DMatrix(F))
        lg = self.lgbm_.predict(F)
        z = (F - self.mean_) / self.std_
        logit = z @ self.logistic_[:-1] + self.logistic_[-1]
        lo = 1 / (1 + np.exp(-np.clip(logit, -50, 50)))
        return np.column_stack([rf, xg, lg, lo]).astype(np.float64)

    def _rf_proba(self, F: np.ndarray) -> np.ndarray:
        if getattr(self, "rf_", None) is not None:
            return self.rf_.predict_proba(F)[:, 1]
        import onnxruntime as ort

        if getattr(self, "_rf_session", None) is None:
            self._rf_session = ort.InferenceSession(self.rf_onnx_, providers=["CPUExecutionProvider"])
        out = self._rf_session.run(None, {self._rf_session.get_inputs()[0].name: F})
        probs = out[1]
        return np.asarray([p[1] for p in probs]) if isinstance(probs, list) else np.asarray(probs)[:, 1]

    def features(self, X: np.ndarray) -> np.ndarray:
        return entity_features(self._check(X), self.spec_).astype(np.float32)

    def member_scores(self, X: np.ndarray) -> dict[str, np.ndarray]:
        P = self.member_matrix(self.features(X))
        return {name: P[:, i] for i, name in enumerate(MEMBERS)}

    def score(self, X: np.ndarray) -> np.ndarray:
        """Incident probability per row (weighted soft vote)."""
        return self.member_matrix(self.features(X)) @ self.weights_

    def _metric_importance(self) -> np.ndarray:
        """Share of the boosters' gain that each feature carries."""
        gain = np.zeros(self.spec_.n_features)
        for key, value in self.xgb_.get_score(importance_type="gain").items():
            gain[int(key[1:])] += value
        lg = self.lgbm_.feature_importance(importance_type="gain")
        gain = gain / max(gain.sum(), 1e-12) + lg / max(lg.sum(), 1e-12)
        return gain

    def context_rows(self) -> int:
        return self.spec_.history - 1

    def explain(self, X: np.ndarray) -> np.ndarray:
        """Per-metric contribution: importance x |standardised value| summed over each metric's features."""
        F = self.features(X)
        z = np.abs((F - self.mean_) / self.std_) * self.importance_
        M = self.spec_.n_metrics
        return z.reshape(len(F), -1, M).sum(axis=1)  # feature blocks are laid out metric-major per block

    def predict_kind(self, X: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Most likely incident kind per row and the class probabilities (rows, kinds)."""
        if getattr(self, "kind_model_", None) is None:
            raise ValueError("ensemble: no incident-kind model (train with kinds, e.g. on the synthetic fleet)")
        proba = self.kind_model_.predict(self.features(X))
        return [self.kind_names_[i] for i in proba.argmax(axis=1)], proba

    # -- persistence ---------------------------------------------------------------------------------
    def export_rf_onnx(self) -> bytes:
        from skl2onnx import to_onnx

        if self.rf_onnx_ is None:
            onnx_model = to_onnx(
                self.rf_,
                np.zeros((1, self.spec_.n_features), dtype=np.float32),
                options={id(self.rf_): {"zipmap": False}},
                target_opset=17,
            )
            self.rf_onnx_ = onnx_model.SerializeToString()
        return self.rf_onnx_

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {
            "config": asdict(self.config),
            "spec": self.spec_.to_json(),
            "weights": self.weights_.tolist(),
            "validation": self.validation_,
            "xgb": self.xgb_.save_raw("json").decode(),
            "lgbm": self.lgbm_.model_to_string(),
            "kind_names": getattr(self, "kind_names_", []),
            "kind_model": self.kind_model_.model_to_string() if getattr(self, "kind_model_", None) else None,
        }
        arrays = {
            "mean": self.mean_,
            "std": self.std_,
            "logistic": self.logistic_,
            "importance": self.importance_,
            "rf_onnx": np.frombuffer(self.export_rf_onnx(), dtype=np.uint8),
        }
        return params, arrays

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        import lightgbm as lgb
        import xgboost as xgb

        self.config = EnsembleConfig.from_dict(params["config"])
        self.spec_ = FeatureSpec.from_json(params["spec"])
        self.weights_ = np.asarray(params["weights"])
        self.validation_ = params["validation"]
        self.xgb_ = xgb.Booster()
        self.xgb_.load_model(bytearray(params["xgb"].encode()))
        self.lgbm_ = lgb.Booster(model_str=params["lgbm"])
        self.kind_names_ = params["kind_names"]
        self.kind_model_ = lgb.Booster(model_str=params["kind_model"]) if params["kind_model"] else None
        self.mean_, self.std_, self.logistic_ = arrays["mean"], arrays["std"], arrays["logistic"]
        self.importance_ = arrays["importance"]
        self.rf_, self.rf_onnx_, self._rf_session = None, arrays["rf_onnx"].tobytes(), None
