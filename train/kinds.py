"""Detector kinds as plug-ins: what each stage needs of a kind, in one place per kind.

Stages look a kind up (`kind_named("lstm")`, `kind_of(detector)`) instead of branching on its name:
its config class, a new detector, fitting on Ray, its ONNX graphs, the serving runtime for them, and the
rows of context a served row needs. A new kind (a stacked ensemble over other kinds' outputs, a fleet
model) is one more class registered in `KINDS`.

It lives in `train/` because fitting on Ray and exporting graphs are training's; serving and tuning,
above it, look kinds up here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from detect.base import Detector
from detect.ensemble import MEMBERS, EnsembleConfig, EnsembleDetector
from detect.runtime import EnsembleRuntime, SequenceRuntime
from detect.sequence import SEQUENCE_DETECTORS, SequenceConfig
from train.boosters import train_boosters_with_ray
from train.export import export_ensemble, export_sequence
from train.torch_train import fit_with_ray_train

MIN_LABELLED_ROWS = 300  # fewest labelled rows a supervised kind learns from
MIN_POSITIVES = 5  # fewest labelled incident rows a supervised kind learns from


class DetectorKind:
    """The interface every kind gives the stages."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    learns_from_labels: ClassVar[bool] = False  # supervised: needs incident labels to fit

    def new(self, config: Any = None, **overrides: Any) -> Detector:
        raise NotImplementedError

    def fit_on_ray(
        self, det: Detector, rows: np.ndarray, labels: np.ndarray | None, metrics: list[str], **ray: Any
    ) -> Detector:
        """Fit `det` through Ray Train (`ray`: num_workers, use_gpu, run_name, cpus_per_worker)."""
        raise NotImplementedError

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

    def context_rows(self, det: Detector) -> int:
        """Rows before a served row that its score depends on (history a caller must send or the ingress keep)."""
        raise NotImplementedError

    def checked_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` as this kind's config class accepts it (an unknown key fails, named); options meant for
        other kinds (`raywatch up --epochs` hands `epochs` to every kind) are left out."""
        own = {k: v for k, v in config.items() if k != "epochs" or "epochs" in self.config_class.__dataclass_fields__}
        self.config_class.from_dict(own)
        return own


class SequenceKind(DetectorKind):
    """Autoencoder and LSTM: windows of all metrics, trained with PyTorch on `TorchTrainer`."""

    config_class = SequenceConfig

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]

    def new(self, config: Any = None, **overrides: Any) -> Detector:
        return SEQUENCE_DETECTORS[self.name](config, **overrides)

    def fit_on_ray(self, det, rows, labels, metrics, **ray):
        return fit_with_ray_train(det, rows, metrics, **ray)

    def export_graphs(self, det):
        return {"scorer": export_sequence(det)}

    def runtime(self, det, graphs, threshold=None, threads=1, parallel_rows=None):
        thr = det.threshold_ if threshold is None else threshold
        return SequenceRuntime(graphs["scorer"], det.spec_, det.config.smooth, thr, threads)

    def context_rows(self, det):
        return det.config.window + det.config.smooth - 2


class EnsembleKind(DetectorKind):
    """Boosters, forest and logistic baseline over engineered features, learning from incident labels."""

    name = "ensemble"
    config_class = EnsembleConfig
    learns_from_labels = True

    def new(self, config: Any = None, **overrides: Any) -> Detector:
        return EnsembleDetector(config, **overrides)

    def fit_on_ray(self, det, rows, labels, metrics, num_workers=1, run_name="ensemble", **_unused):
        known = labels >= 0
        if known.sum() < MIN_LABELLED_ROWS or labels[known].sum() < MIN_POSITIVES:
            raise ValueError(
                f"the ensemble learns from labels: {int(known.sum())} labelled rows with "
                f"{int(labels[known].sum())} incident rows (need {MIN_LABELLED_ROWS} and {MIN_POSITIVES})"
            )

        def boosters(features, target):
            return train_boosters_with_ray(features, target, det.config, num_workers=num_workers, run_name=run_name)

        det.fit(rows[known], labels[known], metrics, train_boosters=boosters)
        return det

    def export_graphs(self, det):
        return export_ensemble(det)

    def runtime(self, det, graphs, threshold=None, threads=1, parallel_rows=None):
        thr = det.threshold_ if threshold is None else threshold
        weights = None if "student" in graphs else dict(zip(MEMBERS, det.weights_.tolist()))
        explain = (det.mean_, np.abs(det.importance_ / det.std_))  # per-metric contributions of served rows
        return EnsembleRuntime(graphs, det.spec_, weights, thr, threads, parallel_rows, explain)

    def context_rows(self, det):
        return det.spec_.history - 1


KINDS: dict[str, DetectorKind] = {kind.name: kind for kind in (SequenceKind("autoencoder"), SequenceKind("lstm"))}
KINDS[EnsembleKind.name] = EnsembleKind()


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
