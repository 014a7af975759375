"""The one path from fitted detectors to a version's bundle: training, registering detectors fitted
elsewhere, and retraining all build what they register here, so every version carries the same parts.

A bundle holds, per entity, the fitted detector, its metrics, its FP32 ONNX graphs (what serving runs)
and its drift reference (a sample of the rows it learnt from, its scores on them, and the drift
calibration fitted for the test windows of the entity's sampling rate, `detect.drift.entity_drift_config`,
and that rate).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from detect.bundle import ModelBundle
from detect.data import entity_rows_per_day
from detect.drift import drift_reference, entity_drift_config
from train.kinds import export_graphs


def fitted_bundle(
    kind: str,
    detectors: dict[str, Any],
    metrics: dict[str, list[str]],
    fitted_on: dict[str, np.ndarray],
    evaluation: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    rows_per_day: dict[str, int | None] | None = None,
) -> ModelBundle:
    """A bundle of `detectors` (entity -> fitted detector), each fitted on `fitted_on[entity]`, sampled
    `rows_per_day[entity]` times a day (`detect.data.Series.rows_per_day`; from the entity's name where
    not given). A fleet model (detect/fleet.py), fitted on many entities, has no `fitted_on` rows and no
    drift reference: the drift monitors watch entities with a model of their own."""
    references, reference_scores = {}, {}
    for entity, det in detectors.items():
        if entity in fitted_on:
            day_rows = (rows_per_day or {}).get(entity) or entity_rows_per_day(entity)
            config = entity_drift_config(entity, rows_per_day=day_rows)  # the windows its monitor will test
            references[entity], reference_scores[entity] = drift_reference(
                det, fitted_on[entity], config=config, rows_per_day=day_rows
            )
    data = {entity: data_sha256(rows) for entity, rows in fitted_on.items() if entity in detectors}
    return ModelBundle(
        kind,
        detectors,
        metrics,
        references,
        evaluation or {},
        info={"variant": "fp32", "trained_at": time.time(), **(info or {}), "data_sha256": data},
        graphs={entity: export_graphs(det) for entity, det in detectors.items()},
        reference_scores=reference_scores,
    )


def data_sha256(rows: np.ndarray) -> str:
    """SHA-256 of the rows a detector learnt from (float64, C order, with their shape): the data part of lineage."""
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    return hashlib.sha256(str(rows.shape).encode() + rows.tobytes()).hexdigest()


def with_unchanged_entities(bundle: ModelBundle, base: ModelBundle) -> ModelBundle:
    """`bundle` plus, for every entity of `base` it does not hold, `base`'s detector, graphs and drift
    reference: a retrained version keeps the champion's parts where no challenger was fitted or accepted."""
    for entity, det in base.detectors.items():
        if entity in bundle.detectors:
            continue
        bundle.detectors[entity], bundle.metrics[entity] = det, base.metrics[entity]
        for part in ("references", "reference_scores", "graphs"):
            if entity in getattr(base, part):
                getattr(bundle, part)[entity] = getattr(base, part)[entity]
        if entity in base.info.get("data_sha256", {}):
            bundle.info.setdefault("data_sha256", {})[entity] = base.info["data_sha256"][entity]
    return bundle


def with_recalibrated(base: ModelBundle, detectors: dict[str, Any], info: dict[str, Any]) -> ModelBundle:
    """`base` with some entities' detectors replaced by recalibrated copies (`DetectorKind.recalibrated`: the
    same networks, an operational threshold fitted on recent scores). Graphs, drift references and lineage
    stay `base`'s: the model is the same, only where it raises alerts moved."""
    bundle = with_unchanged_entities(
        ModelBundle(base.kind, {}, {}, evaluation=dict(base.evaluation), info={**base.info, **info}), base
    )
    bundle.detectors.update(detectors)
    return bundle
