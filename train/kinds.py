"""Detector kinds as plug-ins: what each stage needs of a kind, in one place per kind.

Stages look a kind up (`kind_named(name)`, `kind_of(detector)`) instead of branching on its name:
its config class, what it learns from, a new detector, fitting on Ray, how it is judged, its ONNX
graphs, the serving runtime for them, the rows of context a served row needs, its Tune search space
and trial, and its compression (which variants apply, its distilled student, its threshold).
A new kind (a stacked ensemble over other kinds' outputs) is one more class registered in `KINDS`; its
plain-data traits (deployment name, needs labels, forecasts) go in `detect/kinds.py`. A fleet model is
not a kind but an entry of the autoencoder's bundles (train/fleet.py, detect/fleet.py).

It lives in `train/` because fitting on Ray and exporting graphs are training's; serving and tuning,
above it, look kinds up here.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np

from detect import metrics as M
from detect.base import Detector
from detect.data import Series
from detect.ensemble import MEMBERS, EnsembleConfig, EnsembleDetector, incident_target
from detect.features import entity_windows
from detect.kinds import KindTraits, traits_of
from detect.runtime import EnsembleRuntime, SequenceRuntime, smooth_causal
from detect.sequence import SEQUENCE_DETECTORS, SequenceConfig, train_epochs
from detect.thresholds import decision_threshold, spot_state
from train.boosters import train_boosters_with_ray
from train.distill import StudentConfig, distill_ensemble, distill_sequence
from train.export import EVIDENCE_PREFIX, evidence_graphs, export_ensemble, export_sequence
from train.torch_train import continue_with_ray_train, fit_many_with_ray_train, fit_with_ray_train

MIN_LABELLED_ROWS = 300  # fewest labelled rows a supervised kind learns from


class DetectorKind:
    """The interface every kind gives the stages."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    compressions: ClassVar[tuple[str, ...]]  # the compressed variants that apply (train/compress.py gates them)
    trains_in_epochs: ClassVar[bool]  # Tune's ASHA stops its trials early, epoch by epoch

    @property
    def traits(self) -> KindTraits:
        return traits_of(self.name)

    @property
    def learns_from_labels(self) -> bool:
        return self.traits.learns_from_labels

    def new(self, config: Any = None, **overrides: Any) -> Detector:
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------------
    def training_data(self, series: Series) -> tuple[np.ndarray, np.ndarray | None]:
        """What a detector of this kind learns from in a benchmark series: (rows, labels or None)."""
        raise NotImplementedError

    def normal_rows(self, series: Series) -> np.ndarray | None:
        """Rows believed normal that a kind learning from labels also reads (None: it reads none)."""
        return None

    def judged_rows(self, series: Series, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) of the test rows this kind is judged on: the rows it never learnt from."""
        return scores, series.labels

    def evaluate(self, series: Series, det: Detector) -> dict[str, Any]:
        """The figures logged with a version (test labels used for reporting only)."""
        raise NotImplementedError

    def fit_records(self, det: Detector) -> tuple[list[tuple[int | None, dict[str, float]]], dict[str, Any]]:
        """What a fit leaves for MLflow: ([(step, metrics)], {artifact name: JSON-able})."""
        return [], {}

    def fit_on_ray(
        self,
        det: Detector,
        rows: np.ndarray,
        labels: np.ndarray | None,
        metrics: list[str],
        start_from: Detector | None = None,
        **ray: Any,
    ) -> Detector:
        """Fit `det` through Ray Train (`ray`: num_workers, use_gpu, run_name, cpus_per_worker). With
        `start_from` (a fitted detector of this kind: the retraining job's champion) a kind that can
        continue training from it does; one that cannot fits afresh."""
        raise NotImplementedError

    def fit_many_on_ray(
        self,
        fits: dict[str, tuple[Detector, np.ndarray, np.ndarray | None, list[str]]],
        start_from: dict[str, Detector] | None = None,
        **ray: Any,
    ) -> dict[str, Detector | ValueError]:
        """Fit new detectors, one per entity (`fits`: entity -> (detector, rows, labels, metrics)), as
        `fit_on_ray` fits each (from `start_from[entity]` where given); an entity whose rows cannot be
        fitted gets the ValueError that says why, and the others are fitted still. One Ray run each here;
        a kind that can fits them in one."""
        out: dict[str, Detector | ValueError] = {}
        for entity, (det, rows, labels, metrics) in fits.items():
            try:
                out[entity] = self.fit_on_ray(
                    det, rows, labels, metrics, start_from=(start_from or {}).get(entity), **ray
                )
            except ValueError as exc:
                out[entity] = exc
        return out

    def export_graphs(self, det: Detector) -> dict[str, bytes]:
        """The FP32 ONNX graphs serving runs."""
        raise NotImplementedError

    def runtime(
        self,
        det: Detector,
        graphs: dict[str, bytes],
        threshold: float | None = None,
        threads: int = 1,
        parallel_rows: int | None = None,
    ) -> Any:
        """An ONNX Runtime scorer for `graphs` (FP32, INT8 or a student)."""
        raise NotImplementedError

    # -- tuning ----------------------------------------------------------------------------------------
    def search_space(self) -> dict[str, Any]:
        """Ray Tune distributions over this kind's config."""
        raise NotImplementedError

    def tune_trial(self, config: dict[str, Any], data: list[tuple[np.ndarray, np.ndarray | None]]) -> None:
        """One Tune trial over every entity's training data; reports `val_loss` (per epoch when it has them)."""
        raise NotImplementedError

    # -- compression --------------------------------------------------------------------------------
    def transfer_set(self, series: Series) -> list[np.ndarray]:
        """What a student learns from (no labels needed)."""
        return [self.training_data(series)[0]]

    def distill(self, det: Detector, transfer: list[np.ndarray], cfg: StudentConfig, **ray: Any) -> dict[str, bytes]:
        """A student's graphs, named as the serving runtime reads them."""
        raise NotImplementedError

    def calibrate_threshold(self, det: Detector, runtime: Any, series: Series) -> tuple[float, np.ndarray]:
        """A compressed variant's own operational threshold and the calibration scores it came from (what
        its served SPOT starts from), from training data only (as its teacher's)."""
        raise NotImplementedError

    def recalibrated(self, det: Detector, normal_scores: np.ndarray) -> Detector | None:
        """A copy of `det` whose operational threshold (the DSPOT it serves, and its stored threshold) is
        fitted on `normal_scores`, its own scores of recent rows believed normal in time order, as training
        fitted it on calibration scores: the same model, alerting where those rows put its tail. The
        retraining job's answer when no challenger beats the champion (train/retrain.py). None where the
        scores are too few for a tail."""
        scores = np.asarray(normal_scores, dtype=np.float64)
        if spot_state(scores) is None:
            return None
        out = copy.deepcopy(det)
        out.calibrate_on(scores)
        return out

    def checked_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` as this kind's config class accepts it (an unknown key fails, named); options meant for
        other kinds (`raywatch up --epochs` hands `epochs` to every kind) are left out."""
        own = {k: v for k, v in config.items() if k != "epochs" or "epochs" in self.config_class.__dataclass_fields__}
        self.config_class.from_dict(own)
        return own


class SequenceKind(DetectorKind):
    """Autoencoder and LSTM: windows of all metrics, trained with PyTorch on `TorchTrainer`."""

    config_class = SequenceConfig
    compressions = ("int8", "fp16", "student")
    trains_in_epochs = True

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]

    def new(self, config: Any = None, **overrides: Any) -> Detector:
        return SEQUENCE_DETECTORS[self.name](config, **overrides)

    def training_data(self, series):
        return series.train[series.metrics].to_numpy(), None

    def fit_on_ray(self, det, rows, labels, metrics, start_from=None, **ray):
        if start_from is not None and start_from.normaliser_ is None:  # a fleet model fits afresh
            return continue_with_ray_train(det, start_from, rows, **ray)
        return fit_with_ray_train(det, rows, metrics, **ray)

    def fit_many_on_ray(self, fits, start_from=None, **ray):
        """Fresh models of several entities in one `TorchTrainer` run (`fit_many_with_ray_train`): a run's
        start and end cost more than a small model's fit. One model (a drift job's) keeps its own run, with
        a checkpoint every epoch, and warm starts each continue from their detector's weights."""
        if start_from or len(fits) < 2:
            return super().fit_many_on_ray(fits, start_from, **ray)
        out, prepared = {}, {}
        for entity, (det, rows, _, metrics) in fits.items():
            try:
                prepared[entity] = (det, *det.prepare(rows, metrics))
            except ValueError as exc:
                out[entity] = exc
        if prepared:
            fit_many_with_ray_train(list(prepared.values()), **ray)
            out |= {entity: det for entity, (det, _, _) in prepared.items()}
        return out

    def evaluate(self, series, det):
        if not len(series.test):
            return {"note": "no labels", "used_gpu": det.used_gpu_}
        test = series.test[series.metrics].to_numpy()
        scores = det.score(test)
        half = len(test) // 2
        second = series.labels[half:]
        return {
            "f1": M.best_f1(series.labels, scores)[0],
            "pr_auc": M.pr_auc(series.labels, scores),
            "f1_operational": M.f1_at(series.labels, scores, det.threshold_),
            "pr_auc_second_half": M.pr_auc(second, scores[half:]) if second.any() else None,
            "used_gpu": det.used_gpu_,
        }

    def fit_records(self, det):
        keys = ("train_loss", "val_loss", "rows_per_s")
        return [(int(h["epoch"]), {k: h[k] for k in keys}) for h in det.history_], {}

    def search_space(self):
        from ray import tune  # deferred: Tune is only needed while searching

        space = {
            "window": tune.choice([8, 16, 32]),
            "hidden": tune.choice([32, 64, 128, 256]),
            "lr": tune.loguniform(1e-4, 3e-3),
            "batch_size": tune.choice([128, 256, 512]),
        }
        if "latent" in SEQUENCE_DETECTORS[self.name].network_class.config_fields:  # the autoencoder's bottleneck
            space["latent"] = tune.choice([8, 16, 32])
        return space

    def tune_trial(self, config, data):
        import torch  # deferred: runs inside a Tune trial process
        from ray import tune

        torch.set_num_threads(1)
        prepared = []
        for X, _ in data:
            det = self.new(config)
            train_w, val_w = det.prepare(X)
            prepared.append((det, det.new_network(), train_w, val_w))
        optimizers = [torch.optim.Adam(net.parameters(), lr=det.config.lr) for det, net, _, _ in prepared]
        for epoch in range(config["epochs"]):
            losses = []
            for (det, net, train_w, val_w), opt in zip(prepared, optimizers):
                step_cfg = det.config
                step_cfg.epochs = epoch + 1
                history = train_epochs(net, train_w, val_w, step_cfg, start_epoch=epoch, optimizer=opt)
                losses.append(history[-1]["val_loss"])
            tune.report({"val_loss": float(np.mean(losses)), "epoch": epoch})

    def distill(self, det, transfer, cfg, **ray):
        return {"scorer": distill_sequence(det, transfer, cfg, **ray)}

    def calibrate_threshold(self, det, runtime, series):
        X, _ = self.training_data(series)
        n_val = int(len(X) * det.config.val_fraction)
        windows = entity_windows(X, det.spec_)[len(X) - n_val :]
        val_scores = smooth_causal(runtime.errors(windows).astype(np.float64), det.config.smooth).sum(axis=1)
        return M.operational_threshold(val_scores, det.threshold_quantile), val_scores

    def export_graphs(self, det):
        return {"scorer": export_sequence(det)}

    def runtime(self, det, graphs, threshold=None, threads=1, parallel_rows=None):
        thr = det.threshold_ if threshold is None else threshold
        return SequenceRuntime(graphs["scorer"], det.spec_, det.config.smooth, thr, threads, det.normaliser_)


class EnsembleKind(DetectorKind):
    """Boosters, forest and logistic baseline over engineered features, learning from incident labels."""

    name = EnsembleDetector.name
    config_class = EnsembleConfig
    compressions = ("student",)  # trees have no int8 weights to quantize
    trains_in_epochs = False

    def new(self, config: Any = None, **overrides: Any) -> Detector:
        return EnsembleDetector(config, **overrides)

    def training_data(self, series):
        """The first half of the labelled test series; it is judged on the second half, in time order."""
        test = series.test[series.metrics].to_numpy()
        half = len(test) // 2
        return test[:half], series.labels[:half]

    def judged_rows(self, series, scores):
        half = len(series.test) // 2
        return scores[half:], series.labels[half:]

    def evaluate(self, series, det):
        test = series.test[series.metrics].to_numpy()
        scores, y = self.judged_rows(series, det.score(test))  # features need history: score the whole series
        lead = incident_target(series.labels, det.config.horizon)[len(test) // 2 :]
        if not y.any():
            return {
                "pr_auc_second_half": None,
                "f1": None,
                "pr_auc_lead": None,
                "note": "no incident in the second half",
            }
        return {
            "pr_auc_second_half": M.pr_auc(y, scores),
            "f1": M.best_f1(y, scores)[0],
            "f1_operational": M.f1_at(y, scores, det.threshold_),
            "pr_auc_lead": M.pr_auc(lead, scores),
        }

    def fit_records(self, det):
        metrics = {"val_f1": det.validation_["f1"], "val_log_loss": det.validation_["log_loss"]}
        return [(None, metrics)], {"vote_weights": {"weights": dict(zip(MEMBERS, det.weights_.tolist()))}}

    def search_space(self):
        from ray import tune  # deferred: Tune is only needed while searching

        return {
            "xgb_max_depth": tune.choice([3, 4, 6, 8]),
            "xgb_eta": tune.loguniform(0.02, 0.3),
            "lgbm_leaves": tune.choice([15, 31, 63]),
            "lgbm_lr": tune.loguniform(0.01, 0.2),
            "rf_max_depth": tune.choice([6, 10, 14]),
            "logistic_c": tune.loguniform(0.01, 10.0),
        }

    def tune_trial(self, config, data):
        from ray import tune  # deferred: runs inside a Tune trial process

        losses = [self.new(config, rf_trees=100).fit(X, y).validation_["log_loss"] for X, y in data]
        tune.report({"val_loss": float(np.mean(losses)), "epoch": 0})

    def transfer_set(self, series):
        """The unlabelled train series and the labelled training half: distillation needs no labels."""
        return [series.train[series.metrics].to_numpy(), self.training_data(series)[0]]

    def distill(self, det, transfer, cfg, **ray):
        # a stacked student still reads its teacher's evidence: their graphs go with it
        return {"student": distill_ensemble(det, transfer, cfg, **ray), **evidence_graphs(det)}

    def calibrate_threshold(self, det, runtime, series):
        X, y = self.training_data(series)
        _, target, _, val_mask = det.prepare(X, y, series.metrics)
        val_scores = runtime.score_series(X)[val_mask]
        # by the teacher's rule (`EnsembleDetector.fit_vote`), on the variant's own validation scores
        chosen = decision_threshold(target[val_mask], val_scores)
        return chosen.threshold, val_scores[target[val_mask] == 0]

    def recalibrated(self, det, normal_scores):
        """None: the incident predictor's threshold is its decision threshold on labelled validation rows
        (`detect.thresholds.decision_threshold`), not a tail of normal scores alone (detect/ensemble.py)."""
        return None

    def checked_config(self, config):
        """As every kind's, with `epochs` (as `raywatch up --epochs` hands it to every kind) read as the
        epochs of the evidence detectors, the ensemble's only part trained in epochs."""
        config = dict(config)
        if "epochs" in config:
            config.setdefault("evidence_epochs", config.pop("epochs"))
        return super().checked_config(config)

    def normal_rows(self, series):
        """The unlabelled train series: what the stacked ensemble's evidence detectors learn normal from."""
        return series.train[series.metrics].to_numpy()

    def fit_on_ray(self, det, rows, labels, metrics, num_workers=1, run_name="ensemble", normal=None, **_unused):
        """The boosters on Ray Train; the evidence detectors on `normal` rows, by default the rows not
        labelled as incidents (a retraining job's served rows, unlabelled ones included)."""
        known = labels >= 0
        if known.sum() < MIN_LABELLED_ROWS:  # with no incident among them it learns from injected ones
            raise ValueError(
                f"the ensemble learns from labels: {int(known.sum())} labelled rows (need {MIN_LABELLED_ROWS})"
            )

        def boosters(features, target):
            return train_boosters_with_ray(features, target, det.config, num_workers=num_workers, run_name=run_name)

        normal = rows[labels != 1] if normal is None else normal
        det.fit(rows[known], labels[known], metrics, train_boosters=boosters, normal=normal)
        return det

    def export_graphs(self, det):
        return export_ensemble(det)

    @staticmethod
    def _evidence_runtime(evidence, graphs, threads):
        """An evidence detector's runtime as its own kind builds it, from its graph in `graphs` (exported
        here for a version registered without it)."""
        graph = graphs.get(f"{EVIDENCE_PREFIX}{evidence.name}") or export_sequence(evidence)
        return kind_of(evidence).runtime(evidence, {"scorer": graph}, threads=threads)

    def runtime(self, det, graphs, threshold=None, threads=1, parallel_rows=None):
        thr = det.threshold_ if threshold is None else threshold
        members = {name: g for name, g in graphs.items() if not name.startswith(EVIDENCE_PREFIX)}
        weights = None if "student" in members else dict(zip(MEMBERS, det.weights_.tolist()))
        explain = (det.mean_, np.abs(det.importance_ / det.std_))  # per-metric contributions of served rows
        evidence = [
            (self._evidence_runtime(e, graphs, threads), s) for e, s in zip(det.evidence_, det.evidence_scales_)
        ]
        return EnsembleRuntime(members, det.spec_, weights, thr, threads, parallel_rows, explain, evidence)


KINDS: dict[str, DetectorKind] = {
    kind.name: kind for kind in (*(SequenceKind(name) for name in SEQUENCE_DETECTORS), EnsembleKind())
}


def kind_named(name: str) -> DetectorKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown detector kind {name!r}; choose from {sorted(KINDS)}") from None


def kind_of(det: Detector) -> DetectorKind:
    return kind_named(det.name)


def export_graphs(det: Detector) -> dict[str, bytes]:
    """The FP32 ONNX graphs of a fitted raywatch detector."""
    return kind_of(det).export_graphs(det)


def runtime_for(det: Detector, graphs: dict[str, bytes], **options: Any) -> Any:
    """An ONNX Runtime scorer for a detector's graphs (FP32, INT8 or student); `options` as
    `DetectorKind.runtime` takes them (threshold, threads, parallel_rows)."""
    return kind_of(det).runtime(det, graphs, **options)
