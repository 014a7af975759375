"""Served rows as columns: how the ingress queues what a model served and hands it to the model's drift
monitor.

One array (or one list of references) per column, not a dict, a list and float objects per row. At a
10,000-machine snapshot the ingress's monitor queue is full (20,000 rows by default) between monitor calls;
held as row dicts, that churn of small objects was the one part of the ingress's memory that grew with the
fleet and that its per-machine state did not explain (benchmarks/results/scale.md). The monitor turns
columns back into its rows (`ServedColumns.rows`) in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


@dataclass(slots=True)
class ServedColumns:
    """Rows one model served, all with the same number of metrics. Only the champion's rows carry a score
    and a verdict to the monitor: a challenger's or the fallback's say nothing about the champion's drift."""

    entities: list[str]
    timestamps: list[Any]
    values: np.ndarray  # (rows, metrics) float64
    scores: np.ndarray  # (rows,) float64
    anomalies: np.ndarray  # (rows,) bool: the score at or above its threshold
    paths: list[str]
    model_keys: list[str | None]  # the fleet model that scored a new entity, else None

    def __len__(self) -> int:
        return len(self.entities)

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    def split(self, n: int) -> tuple[ServedColumns, ServedColumns]:
        """The first `n` rows and the rest."""
        return self._take(slice(0, n)), self._take(slice(n, None))

    def _take(self, rows: slice) -> ServedColumns:
        return ServedColumns(
            self.entities[rows],
            self.timestamps[rows],
            self.values[rows],
            self.scores[rows],
            self.anomalies[rows],
            self.paths[rows],
            self.model_keys[rows],
        )

    @classmethod
    def concat(cls, parts: list[ServedColumns]) -> ServedColumns:
        """One batch from batches of the same width, in order."""
        if len(parts) == 1:
            return parts[0]
        return cls(
            [e for p in parts for e in p.entities],
            [t for p in parts for t in p.timestamps],
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.anomalies for p in parts]),
            [x for p in parts for x in p.paths],
            [k for p in parts for k in p.model_keys],
        )

    def stored(self, keep: list[int]) -> tuple[list, list, list[bytes], list, list, list]:
        """Rows `keep` as `ServingStore.add_observation_columns` takes them (entities, timestamps, each row's
        values as float64 bytes, scores, verdicts, paths; score and verdict None where the champion did not
        serve the row): no dict or float object per row."""
        width = self.values.shape[1] * 8
        blob = np.ascontiguousarray(self.values, dtype=np.float64).tobytes()
        scores, anomalies = self.scores.tolist(), self.anomalies.tolist()
        champion = [self.paths[i] == "champion" for i in keep]
        return (
            [self.entities[i] for i in keep],
            [self.timestamps[i] for i in keep],
            [blob[i * width : (i + 1) * width] for i in keep],
            [scores[i] if ok else None for i, ok in zip(keep, champion)],
            [anomalies[i] if ok else None for i, ok in zip(keep, champion)],
            [self.paths[i] for i in keep],
        )

    def rows(self) -> list[dict[str, Any]]:
        """The monitor's rows: {entity, timestamp, values, score, is_anomaly, path[, model_key]}; `score`
        and `is_anomaly` are None where the champion did not serve the row."""
        out = []
        columns = (self.entities, self.timestamps, self.values.tolist(), self.scores.tolist(), self.anomalies.tolist())
        for entity, ts, values, score, anomaly, path, key in zip(*columns, self.paths, self.model_keys):
            champion = path == "champion"
            item: dict[str, Any] = {
                "entity": entity,
                "timestamp": ts,
                "values": values,
                "score": score if champion else None,
                "is_anomaly": anomaly if champion else None,
                "path": path,
            }
            if key is not None:
                item["model_key"] = key
            out.append(item)
        return out


class _Part(NamedTuple):
    entity: str
    timestamps: list[Any]
    values: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    path: str
    model_key: str | None


class ServedColumnsBuilder:
    """Collects what each model served during one request, entity by entity, and gives it as one
    `ServedColumns` per (model, metric count)."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], list[_Part]] = {}

    def add(
        self,
        model: str,
        entity: str,
        timestamps: list[Any],
        values: np.ndarray,
        path: str,
        scores: np.ndarray,
        thresholds: np.ndarray,
        model_key: str | None = None,
    ) -> None:
        """`values` (rows x metrics) served along `path`, with each row's score and the threshold it was judged
        against."""
        key = model_key if model_key and model_key != entity else None  # a new entity's fleet model
        part = _Part(entity, timestamps, values, scores, thresholds, path, key)
        self._parts.setdefault((model, values.shape[1]), []).append(part)

    def batches(self) -> list[tuple[str, ServedColumns]]:
        return [(model, _columns(parts)) for (model, _), parts in self._parts.items()]


def _columns(parts: list[_Part]) -> ServedColumns:
    counts = [len(p.values) for p in parts]
    scores = np.concatenate([p.scores for p in parts]).astype(np.float64, copy=False)
    champion = np.repeat([p.path == "champion" for p in parts], counts)
    return ServedColumns(
        [p.entity for p, n in zip(parts, counts) for _ in range(n)],
        [ts for p in parts for ts in p.timestamps],
        np.concatenate([p.values for p in parts]).astype(np.float64, copy=False),
        scores,
        (scores >= np.concatenate([p.thresholds for p in parts])) & champion,
        [p.path for p, n in zip(parts, counts) for _ in range(n)],
        [p.model_key for p, n in zip(parts, counts) for _ in range(n)],
    )
