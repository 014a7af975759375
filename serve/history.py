"""The ingress's memory of each entity: its recent raw samples, and the baseline scores served from them
when a detector cannot answer. No Serve, no Ray: the route logic's parts are testable in-process.

Windows and features are computed from this history by the detector replicas (`detect.features.tail_windows`
and `tail_features`, the same functions the batch path is tested equal to), so what is tested is what is served.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

import numpy as np

HISTORY_ROWS = 256  # raw samples kept per entity
MAX_ENTITIES = 100_000
FALLBACK_THRESHOLD = 3.0  # mean robust z-score above which the baseline flags a row


class EntityHistory:
    """The last `rows` samples of up to `max_entities` entities; the least recently seen entity goes first."""

    def __init__(self, rows: int = HISTORY_ROWS, max_entities: int = MAX_ENTITIES) -> None:
        self.rows, self.max_entities = rows, max_entities
        self._entities: OrderedDict[str, deque] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entities)

    def of(self, entity: str) -> deque:
        """The entity's samples (oldest first), created empty on first sight; marks it recently seen."""
        hist = self._entities.get(entity)
        if hist is None:
            if len(self._entities) >= self.max_entities:
                self._entities.popitem(last=False)
            hist = self._entities[entity] = deque(maxlen=self.rows)
        else:
            self._entities.move_to_end(entity)
        return hist

    def peek(self, entity: str) -> deque | None:
        """The entity's samples if it has any, without creating or touching it."""
        return self._entities.get(entity)

    def context_and_new(self, entity: str, new: np.ndarray, context: int) -> np.ndarray:
        """The last `context` stored samples followed by `new` (what the detectors score), then store `new`."""
        hist = self.of(entity)
        prior = list(hist)[max(0, len(hist) - context) :] if context else []
        rows = np.concatenate([np.asarray(prior, dtype=np.float64), new]) if prior else new
        hist.extend(new)
        return rows


def fallback_scores(rows: np.ndarray, n_new: int, metrics: list[str]) -> dict[str, Any]:
    """Baseline: mean robust z-score of each new row (the last `n_new` of `rows`) against the rows before
    it, in the detectors' output form (`EntityModel.score_arrays`)."""
    ref = rows[:-n_new] if len(rows) > n_new + 1 else rows
    median = np.median(ref, axis=0)
    q75, q25 = np.percentile(ref, [75, 25], axis=0)
    scale = np.where(q75 - q25 > 1e-9, q75 - q25, np.maximum(ref.std(axis=0), 1e-3))
    z = np.abs(rows[-n_new:] - median) / scale
    top = np.argsort(-z, axis=1)[:, :3]
    return {
        "scores": z.mean(axis=1),
        "threshold": FALLBACK_THRESHOLD,
        "probability": None,
        "top": top,
        "top_values": np.take_along_axis(z, top, axis=1),
        "metrics": metrics,
    }
