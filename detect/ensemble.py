"""Ensemble incident predictor: RandomForest + XGBoost + LightGBM + a logistic baseline, soft vote.

Stacked on the sequence detectors (the default, `evidence`): an autoencoder and an LSTM are fitted on
the entity's normal rows, and the members learn from their evidence (scores, largest per-metric errors
and their recent maxima: detect/evidence.py), held monotone in it, so that no label set can teach them
that a large error is normal. With `evidence=()` the members learn from the window features instead
(FeatureSpec: lags, rolling stats, differences, rates of change), as before round 2's stacking; a
model saved that way is served that way. Target: an incident is under way or starts within the next
`horizon` rows. The vote weights are fitted on a validation tail of the training data (time order,
never shuffled), as is the operational threshold. On the synthetic fleet it also learns the incident
kind (root-cause class, over the window features). Labels with too few incidents never stop it: where
they hold fewer than the two that learning and validating need, it adds incidents injected into the
entity's own normal rows in the synthetic generator's shapes (detect/synthetic.py).

Saved state never needs unpickling: XGBoost as its JSON model, LightGBM as its text model, the
forest as an ONNX graph (skl2onnx), the logistic model and scaler as arrays, the evidence detectors
as theirs (nested in the ensemble's own).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from detect import evidence as E
from detect.base import Detector
from detect.config import config_dataclass
from detect.features import FeatureSpec, entity_features
from detect.metrics import segments
from detect.synthetic import inject_incidents
from detect.thresholds import DecisionThreshold, decision_threshold

log = logging.getLogger(__name__)

#: environment variable naming how many threads an in-process fit may use (`fit_threads`)
FIT_THREADS_ENV = "RAYWATCH_FIT_THREADS"


def fit_threads() -> int:
    """Threads the members' in-process fits use (XGBoost, LightGBM, the forest): `RAYWATCH_FIT_THREADS`, else
    `OMP_NUM_THREADS` (Ray sets it to a task's CPUs), else 2. Processes that fit side by side must share
    the cores: `raywatch evaluate --jobs 2` on 2 cores, with 2 threads in each worker's OpenMP pools,
    took 38 s for two entities where one worker took 20 s (detect.evaluate gives each worker its share)."""
    return environment_threads(FIT_THREADS_ENV, "OMP_NUM_THREADS") or 2


def environment_threads(*names: str) -> int | None:
    """The first of the environment variables `names` set to a positive whole number, or None."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


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
    # the sequence detectors the members are stacked on (detect/evidence.py); () = the window features
    evidence: tuple[str, ...] = ("autoencoder", "lstm")
    evidence_epochs: int = 0  # epochs of each evidence detector; 0 = its own default
    seed: int = 0


def monotone_constraints(cfg: EnsembleConfig, n_features: int) -> list[int] | None:
    """Per feature, +1 where the members must not fall as it grows: every evidence column; None over
    window features (a level may mean trouble in either direction)."""
    return [E.MONOTONE] * n_features if cfg.evidence else None


def xgb_params(cfg: EnsembleConfig, pos_weight: float, n_features: int) -> dict[str, Any]:
    monotone = monotone_constraints(cfg, n_features)
    return {
        "objective": "binary:logistic",
        "eval_metric": "aucpr",
        "max_depth": cfg.xgb_max_depth,
        "eta": cfg.xgb_eta,
        "scale_pos_weight": pos_weight,
        "seed": cfg.seed,
        "nthread": fit_threads(),
        "tree_method": "hist",
        **({"monotone_constraints": "(" + ",".join(map(str, monotone)) + ")"} if monotone else {}),
    }


def lgbm_params(cfg: EnsembleConfig, pos_weight: float, n_features: int) -> dict[str, Any]:
    monotone = monotone_constraints(cfg, n_features)
    return {
        "objective": "binary",
        "num_leaves": cfg.lgbm_leaves,
        "learning_rate": cfg.lgbm_lr,
        "verbose": -1,
        "scale_pos_weight": pos_weight,
        "seed": cfg.seed,
        "num_threads": fit_threads(),
        **({"monotone_constraints": monotone} if monotone else {}),
    }


def non_negative_logistic(Z: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """(coefficients, intercept) of a logistic regression with balanced class weights and L2 penalty
    1 / (2c), its coefficients bounded at zero or above (L-BFGS-B): LogisticRegression's loss, held
    monotone."""
    y = np.asarray(y, dtype=np.float64)
    pos = max(y.sum(), 1.0)
    weight = np.where(y == 1, len(y) / (2 * pos), len(y) / (2 * max(len(y) - pos, 1.0)))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        margin = Z @ theta[:-1] + theta[-1]
        p = 1 / (1 + np.exp(-np.clip(margin, -50, 50)))
        value = np.sum(weight * (np.logaddexp(0, margin) - y * margin)) + theta[:-1] @ theta[:-1] / (2 * c)
        residual = weight * (p - y)
        return value, np.concatenate([Z.T @ residual + theta[:-1] / c, [residual.sum()]])

    bounds = [(0.0, None)] * Z.shape[1] + [(None, None)]
    result = minimize(loss, np.zeros(Z.shape[1] + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    return result.x.astype(np.float64)


def _sequence_detector(name: str, epochs: int) -> Detector:
    from detect.sequence import SEQUENCE_DETECTORS  # deferred: torch only where it is used

    if name not in SEQUENCE_DETECTORS:
        raise ValueError(f"ensemble: unknown evidence detector {name!r}; choose from {sorted(SEQUENCE_DETECTORS)}")
    return SEQUENCE_DETECTORS[name](**({"epochs": epochs} if epochs else {}))


class EnsembleDetector(Detector):
    """Supervised: `fit(X, labels)` with X one entity's (rows, metrics) telemetry in time order."""

    name = "ensemble"
    supervised = True

    def __init__(self, config: EnsembleConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        cfg = config if isinstance(config, EnsembleConfig) else EnsembleConfig.from_dict(config or {})
        self.config = EnsembleConfig.from_dict({**asdict(cfg), **overrides})

    # -- training ----------------------------------------------------------------------------------
    def prepare(
        self, X: np.ndarray, labels: np.ndarray, metrics: list[str] | None = None, normal: np.ndarray | None = None
    ):
        """Features and lead target of the labels with enough incidents (`with_enough_incidents`), split in
        time order into (fit, validation) parts that each hold one (`split_with_incidents_on_both_sides`).
        Unless they are fitted already, the evidence detectors are fitted first (`fit_evidence`), on
        `normal` rows or, without them, on X's rows not labelled as incidents."""
        X = self._check(X, fitting=True)
        labels = np.asarray(labels)
        if labels.shape != (len(X),):
            raise ValueError(f"ensemble: labels must have one value per row ({len(X)}), got shape {labels.shape}")
        self.n_metrics_ = X.shape[1]
        names = tuple(metrics) if metrics else tuple(f"m{i:02d}" for i in range(X.shape[1]))
        self.spec_ = FeatureSpec(metrics=names, lags=self.config.lags, rolling=self.config.rolling)
        learnt, learnt_labels, target, self.injected_incidents_ = with_enough_incidents(
            X, labels, self.config.horizon, self.config.seed
        )
        if getattr(self, "evidence_", None) is None:
            self.fit_evidence(X if normal is None else normal, labels if normal is None else None)
        X, labels = learnt, learnt_labels
        features = self.features(X)
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
        normal: np.ndarray | None = None,
    ) -> EnsembleDetector:
        """Fit the evidence detectors on `normal` rows (default: X's rows not labelled as incidents), then
        every member on the fit part, the vote weights and threshold on the validation part.

        `train_boosters(features, target)` may train the "xgb" / "lgbm" members elsewhere (Ray Train's
        trainers, train/boosters.py); by default they train in-process.
        """
        self.evidence_ = None  # fitted afresh by `prepare`
        features, target, fit_mask, val_mask = self.prepare(X, labels, metrics, normal)
        boosters = train_boosters(features[fit_mask], target[fit_mask]) if train_boosters else {}
        self.fit_members(features[fit_mask], target[fit_mask], boosters)
        self.fit_vote(features[val_mask], target[val_mask])
        self.validation_["injected_incidents"] = self.injected_incidents_
        if kinds is not None:
            self.fit_kinds(entity_features(self._check(X), self.spec_), np.asarray(kinds), target)
        return self

    def fit_evidence(self, rows: np.ndarray, labels: np.ndarray | None = None) -> None:
        """The sequence detectors the members are stacked on, fitted on `rows` (less those labelled as
        incidents), with their scales (`detect.evidence.evidence_scale`); none over window features."""
        self.evidence_: list[Detector] = []
        self.evidence_scales_: list[float] = []
        if not self.config.evidence:
            return
        rows = self._check(rows, fitting=True)
        if labels is not None:
            rows = rows[np.asarray(labels) != 1]
        for name in self.config.evidence:
            det = _sequence_detector(name, self.config.evidence_epochs).fit(rows)
            self.evidence_.append(det)
            self.evidence_scales_.append(E.evidence_scale(det.calibration_scores_))

    def pos_weight(self, target: np.ndarray) -> float:
        return float((len(target) - target.sum()) / max(target.sum(), 1))

    def fit_members(self, F: np.ndarray, y: np.ndarray, boosters: dict[str, Any]) -> None:
        import lightgbm as lgb
        import xgboost as xgb
        from sklearn.ensemble import RandomForestClassifier

        cfg, w, n = self.config, self.pos_weight(y), F.shape[1]
        self.n_features_ = n
        self.mean_, self.std_ = F.mean(axis=0), np.maximum(F.std(axis=0), 1e-6)
        self.xgb_ = boosters.get("xgb") or xgb.train(xgb_params(cfg, w, n), xgb.DMatrix(F, label=y), cfg.xgb_rounds)
        self.lgbm_ = boosters.get("lgbm") or lgb.train(lgbm_params(cfg, w, n), lgb.Dataset(F, label=y), cfg.lgbm_rounds)
        self.rf_ = RandomForestClassifier(
            n_estimators=cfg.rf_trees,
            max_depth=cfg.rf_max_depth,
            n_jobs=fit_threads(),
            class_weight="balanced_subsample",
            random_state=cfg.seed,
            monotonic_cst=monotone_constraints(cfg, n),
        ).fit(F, y)
        self.logistic_ = self._fit_logistic((F - self.mean_) / self.std_, y)
        self.rf_onnx_ = None
        self.importance_ = self._metric_importance()

    def _fit_logistic(self, Z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Coefficients and intercept of an L2 logistic regression with balanced class weights; over the
        evidence (monotone) its coefficients are held at zero or above."""
        from sklearn.linear_model import LogisticRegression

        if not any(monotone_constraints(self.config, Z.shape[1]) or ()):
            lr = LogisticRegression(C=self.config.logistic_c, class_weight="balanced", max_iter=500).fit(Z, y)
            return np.concatenate([lr.coef_[0], lr.intercept_]).astype(np.float64)
        return non_negative_logistic(Z, y, self.config.logistic_c)

    def fit_vote(self, F: np.ndarray, y: np.ndarray) -> None:
        """Vote weights that minimise validation log-loss (`vote_weights`); the threshold is the validation
        rows' decision threshold (`detect.thresholds.decision_threshold`: halfway in log-odds between the
        best F1's and the normal rows' tail, the tail alone where best F1 flags nearly everything), which is
        also the operational threshold (`online_threshold`). The calibration scores
        are those of the validation rows that are normal: not served, kept so that tail rules can be
        compared with it (docs/experiments/ensemble-threshold.py)."""
        P = np.clip(self.member_matrix(F), 1e-6, 1 - 1e-6)
        self.weights_, log_loss = vote_weights(P, y)
        val_scores = P @ self.weights_
        self.calibration_scores_ = val_scores[y == 0]
        chosen = decision_threshold(y, val_scores)
        self.threshold_ = chosen.threshold
        self.validation_ = {
            "f1": chosen.best_f1,
            "log_loss": log_loss,
            "rows": int(len(y)),
            "positives": int(y.sum()),
            "threshold_rule": chosen.rule,
        }

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
            "num_threads": fit_threads(),
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
        """What the members read per row: the evidence (detect/evidence.py) or the window features."""
        X = self._check(X)
        if not self.evidence_:
            return entity_features(X, self.spec_).astype(np.float32)
        return E.evidence_features(self.evidence_errors(X), self.evidence_scales_)

    def evidence_errors(self, X: np.ndarray) -> list[np.ndarray]:
        """Each evidence detector's smoothed normalised per-metric errors of every row of X."""
        return [det.metric_errors(X) for det in self.evidence_]

    def member_scores(self, X: np.ndarray) -> dict[str, np.ndarray]:
        P = self.member_matrix(self.features(X))
        return {name: P[:, i] for i, name in enumerate(MEMBERS)}

    def score(self, X: np.ndarray) -> np.ndarray:
        """Incident probability per row (weighted soft vote)."""
        return self.member_matrix(self.features(X)) @ self.weights_

    def _metric_importance(self) -> np.ndarray:
        """Share of the boosters' gain that each feature carries."""
        gain = np.zeros(self.n_features_)
        for key, value in self.xgb_.get_score(importance_type="gain").items():
            gain[int(key[1:])] += value
        lg = self.lgbm_.feature_importance(importance_type="gain")
        gain = gain / max(gain.sum(), 1e-12) + lg / max(lg.sum(), 1e-12)
        return gain

    def online_threshold(self) -> DecisionThreshold:
        """The decision threshold learnt on the labelled validation rows (`fit_vote`), served as is. Not
        DSPOT over the normal rows' tail, as the unsupervised detectors: that bar ignores what the labels
        taught about where incidents start, and was measured worse on the held-out synthetic fleets as on
        the shipped entities (f1_operational 0.572 against 0.787 held out; README, issue 19)."""
        return DecisionThreshold(self.threshold_)

    def served_spot(self) -> dict[str, Any]:
        return self.online_threshold().state()

    def context_rows(self) -> int:
        if self.evidence_:  # the evidence detectors' windows, then the evidence's running maxima
            return max(det.context_rows() for det in self.evidence_) + E.CONTEXT
        return self.spec_.history - 1

    def explain(self, X: np.ndarray) -> np.ndarray:
        """Per-metric contribution. Stacked: the evidence detectors' per-metric errors on one scale
        (`detect.evidence.contributions`). Over window features: importance x |standardised value| summed
        over each metric's features."""
        if self.evidence_:
            return E.contributions(self.evidence_errors(X), self.evidence_scales_)
        F = self.features(X)
        z = np.abs((F - self.mean_) / self.std_) * self.importance_
        M = self.spec_.n_metrics
        return z.reshape(len(F), -1, M).sum(axis=1)  # feature blocks are laid out metric-major per block

    def predict_kind(self, X: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Most likely incident kind per row and the class probabilities (rows, kinds)."""
        if getattr(self, "kind_model_", None) is None:
            raise ValueError("ensemble: no incident-kind model (train with kinds, e.g. on the synthetic fleet)")
        proba = self.kind_model_.predict(entity_features(self._check(X), self.spec_).astype(np.float32))
        return [self.kind_names_[i] for i in proba.argmax(axis=1)], proba

    # -- persistence ---------------------------------------------------------------------------------
    def export_rf_onnx(self) -> bytes:
        from skl2onnx import to_onnx

        if self.rf_onnx_ is None:
            onnx_model = to_onnx(
                self.rf_,
                np.zeros((1, self.n_features_), dtype=np.float32),
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
            "evidence": [],
            "evidence_scales": list(self.evidence_scales_),
        }
        arrays = {
            "mean": self.mean_,
            "std": self.std_,
            "logistic": self.logistic_,
            "importance": self.importance_,
            "rf_onnx": np.frombuffer(self.export_rf_onnx(), dtype=np.uint8),
        }
        for i, det in enumerate(self.evidence_):
            meta, det_arrays = det.to_state()
            params["evidence"].append(meta)
            arrays.update({f"evidence{i}.{key}": value for key, value in det_arrays.items()})
        return params, arrays

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        import lightgbm as lgb
        import xgboost as xgb

        from detect.sequence import SEQUENCE_DETECTORS

        stacked = "evidence" in params  # saved before stacking: window features, whatever the config says
        self.config = EnsembleConfig.from_dict({**params["config"], **({} if stacked else {"evidence": ()})})
        self.spec_ = FeatureSpec.from_json(params["spec"])
        self.evidence_ = [
            SEQUENCE_DETECTORS[meta["detector"]].from_state(
                meta, {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"evidence{i}.")}
            )
            for i, meta in enumerate(params.get("evidence", []))
        ]
        self.evidence_scales_ = list(params.get("evidence_scales", []))
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
        self.n_features_ = len(self.mean_)
