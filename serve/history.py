"""The ingress's memory of each entity: its recent raw samples, the baseline scores served from them
when a detector cannot answer, and the alert each detector has open on it (`AlertBook`). No Serve, no
Ray: the route logic's parts are testable in-process.

Windows and features are computed from this history by the detector replicas (`detect.features.tail_windows`
and `tail_features`, the same functions the batch path is tested equal to), so what is tested is what is served.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detect.alerting import Alert, AlertGrouper
from detect.fleet import BASELINE_MARGIN, BASELINE_ROWS, entity_baseline

HISTORY_ROWS = 256  # raw samples kept per entity
MAX_ENTITIES = 100_000
FALLBACK_THRESHOLD = 3.0  # mean robust z-score above which the baseline flags a row
if HISTORY_ROWS < BASELINE_ROWS + BASELINE_MARGIN:  # a young entity's rows since its first must fit in its history
    raise ImportError(f"HISTORY_ROWS {HISTORY_ROWS} < BASELINE_ROWS + BASELINE_MARGIN of detect.fleet")


def lru_entry(table: OrderedDict, key: Any, bound: int, create: Callable[[], Any]) -> tuple[Any, Any]:
    """(table[key], evicted): the entry, created by `create()` on first sight, now the most recently used;
    `evicted` is the least recently used entry dropped to keep the table within `bound`, or None."""
    entry, evicted = table.get(key), None
    if entry is None:
        if len(table) >= bound:
            evicted = table.popitem(last=False)[1]
        entry = table[key] = create()
    else:
        table.move_to_end(key)
    return entry, evicted


class EntityHistory:
    """The last `rows` samples of up to `max_entities` entities; the least recently seen entity goes first."""

    def __init__(self, rows: int = HISTORY_ROWS, max_entities: int = MAX_ENTITIES) -> None:
        self.rows, self.max_entities = rows, max_entities
        self._entities: OrderedDict[str, deque] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entities)

    def of(self, entity: str) -> deque:
        """The entity's samples (oldest first), created empty on first sight; marks it recently seen."""
        return lru_entry(self._entities, entity, self.max_entities, lambda: deque(maxlen=self.rows))[0]

    def peek(self, entity: str) -> deque | None:
        """The entity's samples if it has any, without creating or touching it."""
        return self._entities.get(entity)

    def context_and_new(self, entity: str, new: np.ndarray, context: int) -> np.ndarray:
        """The last `context` stored samples followed by `new` (what the detectors score), then store `new`."""
        hist = self.of(entity)
        prior = list(hist)[max(0, len(hist) - context) :] if context else []
        rows = np.concatenate([np.asarray(prior, dtype=np.float64), new]) if prior else new
        # a copy of the rows kept: the deque holds row views, which would otherwise pin the whole request
        # array (a 5,000-row batch per entity) for as long as any of its rows is in the history
        hist.extend(np.array(new[-self.rows :], dtype=np.float64))
        return rows


@dataclass
class _Newcomer:
    rows: int = 0  # rows of the entity seen since its first
    baseline: np.ndarray | None = None  # frozen from its first BASELINE_ROWS rows


class ColdStarts:
    """What the ingress keeps for entities a fleet model scores (detect/fleet.py): how many rows each has
    sent and, from its BASELINE_ROWS-th row on, its frozen baseline (two numbers per metric). Bounded like
    `EntityHistory`, least recently seen first."""

    def __init__(self, max_entities: int = MAX_ENTITIES) -> None:
        self.max_entities = max_entities
        self._entities: OrderedDict[str, _Newcomer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entities)

    def before(self, entity: str, history_rows: int) -> tuple[int | None, np.ndarray | None]:
        """(context, baseline) for scoring the entity's next rows: while it is young, every row of its history
        (which then holds all it has sent) and no baseline; once grown, its baseline (context None: what
        the model needs)."""
        newcomer = lru_entry(self._entities, entity, self.max_entities, _Newcomer)[0]
        if newcomer.baseline is not None and newcomer.rows >= BASELINE_ROWS + BASELINE_MARGIN:
            return None, newcomer.baseline
        return min(history_rows, newcomer.rows) if newcomer.rows else history_rows, None

    def after(self, entity: str, rows_since_first: np.ndarray, new_rows: int) -> None:
        """Count the new rows; freeze the baseline once the entity has BASELINE_ROWS rows. `rows_since_first`
        holds its rows from its first one while it is young (what `before` had it send, and the new ones)."""
        newcomer = lru_entry(self._entities, entity, self.max_entities, _Newcomer)[0]
        if newcomer.baseline is None and newcomer.rows + new_rows >= BASELINE_ROWS:
            newcomer.baseline = entity_baseline(rows_since_first[:BASELINE_ROWS])
        newcomer.rows += new_rows


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


@dataclass
class _Tracked:
    """One (detector, entity)'s alert grouping, with the timestamps of the rows it may still refer to."""

    grouper: AlertGrouper
    recent: deque  # (row number, timestamp) of the last n rows: where an alert that opens may have started
    started: Any = None  # timestamp of the open alert's first above-threshold row
    opened: Any = None  # timestamp of the row it was raised at


@dataclass
class AlertBook:
    """Alerts, not rows: per (detector, entity), the rows served are grouped into alert episodes by
    `detect.alerting.AlertGrouper` (k of the last n rows at or above the threshold open one; `clear`
    quiet rows close it), the same rule `raywatch evaluate` judges. Bounded like `EntityHistory`: the
    least recently scored pair goes first."""

    max_entities: int = MAX_ENTITIES
    _tracked: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _open: int = field(default=0, repr=False)  # alerts open now: kept as they open, close and are evicted

    def observe(self, detector: str, entity: str, arrays: dict[str, Any], timestamps: Sequence[Any]) -> list:
        """Feed one detector's scores of an entity's new rows (`EntityModel.score_arrays` output) in time
        order; returns, per row, the alert open after it (or the one it closed) as the API reports it, or
        None when no alert is open."""
        tracked = self._of(detector, entity)
        scores, threshold, metrics = arrays["scores"], float(arrays["threshold"]), arrays["metrics"]
        top, top_values = np.asarray(arrays["top"]), np.asarray(arrays["top_values"], dtype=np.float64)
        out = []
        for i, score in enumerate(np.asarray(scores, dtype=np.float64).tolist()):
            contribution = None  # only rows at or above the threshold add to an alert's top metrics
            if score >= threshold:
                contribution = np.zeros(len(metrics))
                contribution[top[i]] = top_values[i]
            row = tracked.grouper.row_ + 1
            tracked.recent.append((row, timestamps[i]))
            change = tracked.grouper.update(score, threshold, contribution)
            if change and change[0] == "opened":
                tracked.started = dict(tracked.recent).get(change[1].start, timestamps[i])
                tracked.opened = timestamps[i]
                self._open += 1
            if change and change[0] == "closed":
                out.append(self._report("closed", change[1], tracked, metrics, timestamps[i]))
                tracked.started = tracked.opened = None
                self._open -= 1
            elif tracked.grouper.firing is not None:
                state = "opened" if change else "firing"
                out.append(self._report(state, tracked.grouper.firing, tracked, metrics, None))
            else:
                out.append(None)
        return out

    def firing(self) -> int:
        """Alerts open now, over every (detector, entity) pair (a count kept as they change: the gauge is
        set on every scoring call, which must not walk every pair)."""
        return self._open

    def _of(self, detector: str, entity: str) -> _Tracked:
        def new() -> _Tracked:
            grouper = AlertGrouper()
            return _Tracked(grouper, deque(maxlen=grouper.n))

        tracked, evicted = lru_entry(self._tracked, (detector, entity), self.max_entities, new)
        if evicted is not None and evicted.grouper.firing is not None:
            self._open -= 1
        return tracked

    @staticmethod
    def _report(state: str, alert: Alert, tracked: _Tracked, metrics: list[str], closed: Any) -> dict[str, Any]:
        return {
            "state": state,
            "started": tracked.started,
            "opened": tracked.opened,
            "closed": closed,
            "rows": alert.end - alert.start + 1,
            "peak_score": alert.peak_score,
            "top_metrics": [metrics[j] for j in alert.top_metrics],
        }
