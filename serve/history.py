"""The ingress's memory of each entity: its recent raw samples, the baseline scores served from them
when a detector cannot answer, and the alert each detector has open on it (`AlertBook`). No Serve, no
Ray: the route logic's parts are testable in-process.

Windows and features are computed from this history by the detector replicas (`detect.features.tail_windows`
and `tail_features`, the same functions the batch path is tested equal to), so what is tested is what is served.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detect.alerting import Alert, AlertAwareSpot, AlertGrouper
from detect.attribution import hold_peak_row, hold_peaks, hold_peaks_across
from detect.fleet import EntityStats, OwnThreshold, Sampler
from detect.thresholds import threshold_from_state

HISTORY_ROWS = 64  # the most raw samples kept per entity: the longest context a served model may read
HISTORY_FLOOR = 32  # the fewest kept (when its models read fewer): the fallback baseline's reference rows
MAX_ENTITIES = 100_000
FALLBACK_THRESHOLD = 3.0  # mean robust z-score above which the baseline flags a row


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


def lru_put(table: OrderedDict, key: Any, value: Any, bound: int) -> Any:
    """Put `value` at `key` as the most recently used entry; returns the least recently used entry dropped
    to keep the table within `bound`, or None (how state handed back by the fleet lane rejoins a table)."""
    table[key] = value
    table.move_to_end(key)
    return table.popitem(last=False)[1] if len(table) > bound else None


class RecentRows:
    """One entity's last `maxlen` samples as one float64 array (oldest first), not a row object each: about
    M x 8 bytes a row, what keeps 10,000 entities' histories small. Its buffer grows by doubling up to
    `maxlen` rows, then takes new rows in place (the oldest shifted out); a sample of another width (the
    entity's metrics changed) starts it again."""

    __slots__ = ("maxlen", "_buf", "_n")

    def __init__(self, maxlen: int) -> None:
        self.maxlen, self._buf, self._n = maxlen, None, 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def array(self) -> np.ndarray:
        """The samples, oldest first: a view, valid until the next `extend`."""
        return self._buf[: self._n] if self._buf is not None else np.zeros((0, 0))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.array()
        return out.astype(dtype) if dtype is not None and out.dtype != dtype else out.copy()

    def __iter__(self):
        return iter(self.array())

    def last(self, k: int) -> np.ndarray:
        return self.array()[max(0, self._n - k) :] if k > 0 else self.array()[:0]

    def append(self, row: np.ndarray) -> None:
        self.extend(np.asarray(row, dtype=np.float64)[None])

    def extend(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)[-self.maxlen :]
        if self._buf is not None and self._buf.shape[1] != rows.shape[1]:
            self._buf, self._n = None, 0
        total = self._n + len(rows)
        if self._buf is None or (total > len(self._buf) and len(self._buf) < self.maxlen):
            size = min(self.maxlen, 1 << max(total - 1, 0).bit_length())
            grown = np.empty((size, rows.shape[1]))
            keep = min(self._n, size - len(rows))
            if keep:
                grown[:keep] = self._buf[self._n - keep : self._n]
            self._buf, self._n = grown, keep
        elif total > self.maxlen:
            keep = self.maxlen - len(rows)
            self._buf[:keep] = self._buf[self._n - keep : self._n]
            self._n = keep
        self._buf[self._n : self._n + len(rows)] = rows
        self._n += len(rows)


class EntityHistory:
    """The recent samples of up to `max_entities` entities; the least recently seen entity goes first. Each
    keeps what the models that score it read before a new row, at least `floor` rows (the fallback
    baseline's reference) and at most `rows`: a machine scored by a 16-row model keeps 32 rows, not 64
    (2 KB less at 8 metrics; 20 MB of the ingress's heap at 10,000 machines)."""

    def __init__(self, rows: int = HISTORY_ROWS, max_entities: int = MAX_ENTITIES, floor: int = HISTORY_FLOOR) -> None:
        self.rows, self.max_entities, self.floor = rows, max_entities, min(floor, rows)
        self._entities: OrderedDict[str, RecentRows] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entities)

    def of(self, entity: str, context: int | None = None) -> RecentRows:
        """The entity's samples (oldest first), created empty on first sight; marks it recently seen. With
        `context` (the rows its models read before a new row), it keeps at least that many from now on;
        without, a new entity keeps `rows`."""
        keep = self.rows if context is None else self.keep_for(context)
        hist = lru_entry(self._entities, entity, self.max_entities, lambda: RecentRows(keep))[0]
        if context is not None and hist.maxlen < keep:
            hist.maxlen = keep  # a model that reads more now serves it: its buffer grows from the next row
        return hist

    def keep_for(self, context: int) -> int:
        """Rows kept for an entity whose models read `context` rows before a new one."""
        return min(self.rows, max(self.floor, context))

    def peek(self, entity: str) -> RecentRows | None:
        """The entity's samples if it has any, without creating or touching it."""
        return self._entities.get(entity)

    def take(self, entity: str) -> RecentRows | None:
        """Remove and return the entity's samples (the fleet lane takes them over), or None."""
        return self._entities.pop(entity, None)

    def put(self, entity: str, rows: RecentRows) -> None:
        """Hold `rows` as the entity's samples again, as the most recently seen."""
        lru_put(self._entities, entity, rows, self.max_entities)

    def context_and_new(self, entity: str, new: np.ndarray, context: int) -> np.ndarray:
        """The last `context` stored samples followed by `new` (what the detectors score), then store `new`."""
        hist = self.of(entity, context)
        prior = hist.last(context)
        rows = np.concatenate([prior, new]) if len(prior) else new
        hist.extend(new)  # copied into the entity's own buffer: no view pins the request's array
        return rows


class ColdStarts:
    """What the ingress keeps for entities a fleet model scores (detect/fleet.py): how many rows each has
    sent, its statistics at the checkpoints reached (a few numbers per metric) and, while it is young,
    the sample rows of its coming checkpoints (at most a few dozen each), so that a request carries only
    the rows the model reads. Bounded like `EntityHistory`, least recently seen first."""

    def __init__(self, max_entities: int = MAX_ENTITIES) -> None:
        self.max_entities = max_entities
        self._entities: OrderedDict[str, Sampler] = OrderedDict()
        self._thresholds: OrderedDict[tuple[str, str], OwnThreshold] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entities)

    def threshold(self, detector: str, entity: str, scores: np.ndarray, fleet_threshold: float) -> float:
        """The threshold for the entity's rows a detector's fleet model just scored (`detect.fleet.OwnThreshold`:
        the fleet model's until the entity's first scores give its own)."""
        key = (detector, entity)
        return lru_entry(self._thresholds, key, self.max_entities, OwnThreshold)[0].observe(scores, fleet_threshold)

    def admit(self, entity: str, new: np.ndarray) -> tuple[EntityStats, int]:
        """Count the entity's `new` rows and reach the checkpoints they complete. Returns its statistics and
        the row of its life that `new[0]` is (0: its first row; an evicted entity starts again at 0)."""
        sampler = lru_entry(self._entities, entity, self.max_entities, lambda: Sampler(new.shape[1]))[0]
        if sampler.stats.values.shape[2] != new.shape[1]:  # its metrics changed: it starts again
            sampler = self._entities[entity] = Sampler(new.shape[1])
        before = sampler.rows
        return sampler.add(new), before

    def peek(self, entity: str) -> Sampler | None:
        """The entity's sampler if it has one, without creating or touching it."""
        return self._entities.get(entity)

    def take(self, entity: str, detectors: Sequence[str]) -> tuple[Sampler | None, dict[str, OwnThreshold]]:
        """Remove and return the entity's sampler and its own thresholds under `detectors` (the fleet lane
        takes them over)."""
        thresholds = {d: self._thresholds.pop((d, entity)) for d in detectors if (d, entity) in self._thresholds}
        return self._entities.pop(entity, None), thresholds

    def put(self, entity: str, sampler: Sampler, thresholds: dict[str, OwnThreshold]) -> None:
        """Hold the entity's sampler and own thresholds again, as the most recently seen."""
        lru_put(self._entities, entity, sampler, self.max_entities)
        for detector, threshold in thresholds.items():
            lru_put(self._thresholds, (detector, entity), threshold, self.max_entities)


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


@dataclass(slots=True)
class _Tracked:
    """One (detector, entity)'s alert grouping, with the timestamps of the rows it may still refer to, and
    the SPOT its rows are judged against (with the model it was seeded for)."""

    grouper: AlertGrouper
    recent: list  # timestamps of the last n rows, row r's at r % n: where an alert that opens may have started
    started: Any = None  # timestamp of the open alert's first above-threshold row
    opened: Any = None  # timestamp of the row it was raised at
    spot: AlertAwareSpot | None = None
    spot_model: Any = None
    held: np.ndarray | None = None  # each metric's held peak contribution after the last row (detect.attribution)

    def held_before(self, n_metrics: int) -> np.ndarray | None:
        """The held values to carry into the next rows: None before the first row, or when the entity's
        metric count changed."""
        return self.held if self.held is not None and len(self.held) == n_metrics else None

    def keep_held(self, last: Any) -> None:
        """Keep the held values after the last row: in place when the pair already holds as many (an array made
        per request must not outlive it: it would pin the request's memory), else as its own copy (`last` may
        be a view of the request's arrays)."""
        if self.held is not None and len(self.held) == len(last):
            self.held[:] = last
        else:
            self.held = np.array(last, dtype=np.float64)


@dataclass(frozen=True)
class SpotSeed:
    """Where a served row's threshold comes from: `state` (`detect.thresholds.SPOT.state`, from the model's
    bundle) for the model `model` names (path, version, variant). A new model starts a new SPOT."""

    model: tuple
    state: dict[str, Any]


@dataclass
class AlertBook:
    """Alerts, not rows: per (detector, entity), the rows served are grouped into alert episodes by
    `detect.alerting.AlertGrouper` (k of the last n rows at or above the threshold open one; `clear`
    quiet rows close it), the same rule `raywatch evaluate` judges. Bounded like `EntityHistory`: the
    least recently scored pair goes first."""

    max_entities: int = MAX_ENTITIES
    _tracked: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _open: int = field(default=0, repr=False)  # alerts open now: kept as they open, close and are evicted

    def observe(
        self,
        detector: str,
        entity: str,
        arrays: dict[str, Any],
        timestamps: Sequence[Any],
        spot: SpotSeed | None = None,
    ) -> tuple[list, Any]:
        """Feed one detector's scores of an entity's new rows (`EntityModel.score_arrays` output) in time
        order. Returns (per row, the alert open after it, or the one it closed, as the API reports it, or
        None when no alert is open; the threshold each row was judged against).

        With `spot`, each row is judged against its threshold (DSPOT's, or SPOT's for a bundle saved before
        DSPOT), which then learns from what is no alert's
        (`detect.alerting.AlertAwareSpot`, what `raywatch evaluate` judges): the thresholds
        come back as an array. Without it (a fleet model's new entity, the fallback baseline, a bundle
        saved before served SPOT), every row is judged against `arrays["threshold"]`, returned as it was."""
        return self._observe(self._of(detector, entity), arrays, timestamps, spot)

    def observe_many(self, calls: Sequence[tuple[str, str, dict[str, Any], Sequence[Any], SpotSeed | None]]) -> list:
        """`observe` for many (detector, entity, arrays, timestamps, spot) at once, each pair at most once (a
        request's entities): the held attribution of every pair's one new row (a snapshot's) is computed in
        one pass over all of them (`detect.attribution.hold_peaks_across`). The same results as `observe`
        called for each in turn."""
        tracked = [self._of(detector, entity) for detector, entity, *_ in calls]
        held = self._hold_peaks_of_rows([(t, call[2]) for t, call in zip(tracked, calls)])
        return [
            self._observe(t, arrays, timestamps, spot, peaks_held)
            for t, (_, _, arrays, timestamps, spot), peaks_held in zip(tracked, calls, held)
        ]

    def _observe(
        self,
        tracked: _Tracked,
        arrays: dict[str, Any],
        timestamps: Sequence[Any],
        spot: SpotSeed | None,
        peaks_held: bool = False,
    ) -> tuple[list, Any]:
        learning = self._spot(tracked, spot)
        scores, metrics = np.asarray(arrays["scores"], dtype=np.float64), arrays["metrics"]
        threshold = float(arrays["threshold"])  # every row's, unless SPOT judges them (set per row below)
        thresholds = arrays["threshold"] if learning is None else np.empty(len(scores))
        if peaks_held:
            top, top_values = arrays["top"], arrays["top_values"]
        else:
            top, top_values = self._hold_peaks(tracked, arrays, len(metrics))
        n, out = tracked.grouper.n, []
        for i, score in enumerate(scores.tolist()):
            if learning is not None:
                threshold = thresholds[i] = learning.threshold
            contribution = None  # only rows at or above the threshold add to an alert's top metrics
            if score >= threshold:
                contribution = np.zeros(len(metrics))
                contribution[top[i]] = top_values[i]
            tracked.recent[(tracked.grouper.row_ + 1) % n] = timestamps[i]
            change = tracked.grouper.update(score, threshold, contribution)
            if learning is not None:  # an alert's rows must not raise the bar that detects it
                learning.after(score, threshold, tracked.grouper)
            if change and change[0] == "opened":  # it started within the grouper's window: the last n rows
                tracked.started = tracked.recent[change[1].start % n]
                tracked.opened = timestamps[i]
                self._open += 1
            if change and change[0] == "closed":
                out.append(self._report("closed", change[1], tracked, metrics, timestamps[i]))
                tracked.started = tracked.opened = None
                self._open -= 1
            elif tracked.grouper.current_ is not None:  # `firing` is built on each read: read it once
                state = "opened" if change else "firing"
                out.append(self._report(state, tracked.grouper.firing, tracked, metrics, None))
            else:
                out.append(None)
        return out, thresholds

    @staticmethod
    def _hold_peaks(tracked: _Tracked, arrays: dict[str, Any], n_metrics: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows' top metrics with each metric held at its recent peak, as the model's `explain` holds them
        (`detect.attribution`), carried from one request to the next; from the top metrics the replica sent
        for each row (the others count as 0). Written back into `arrays`, so the response shows them."""
        top, values = np.asarray(arrays["top"]), np.asarray(arrays["top_values"], dtype=np.float64)
        half_life = arrays.get("attribution_half_life_rows") or 0
        if not half_life or top.size == 0:
            return top, values
        if len(top) == 1:
            return AlertBook._hold_peak_row(tracked, arrays, n_metrics, half_life)
        rows = np.zeros((len(top), n_metrics))
        each = np.arange(len(top))[:, None]
        rows[each, top] = values
        held, last = hold_peaks(rows, half_life, tracked.held_before(n_metrics))
        tracked.keep_held(last)
        top = np.argsort(-held, axis=1, kind="stable")[:, : top.shape[1]]
        arrays["top"], arrays["top_values"] = top, held[each, top]
        return top, arrays["top_values"]

    @staticmethod
    def _hold_peaks_of_rows(pairs: list[tuple[_Tracked, dict[str, Any]]]) -> list[bool]:
        """`_hold_peaks` for every pair whose arrays hold one row, in one numpy pass per (metric count,
        half-life, top width) of at least two pairs; written back into their arrays and held values.
        Returns, per pair, whether it was held here (the others are held by `_hold_peaks`: several rows, no
        hold, or a group of one, such as a single-row request's, whose Python-float path is cheaper)."""
        groups: dict[tuple[int, float, int], list[int]] = {}
        for i, (_, arrays) in enumerate(pairs):
            top, half_life = np.asarray(arrays["top"]), arrays.get("attribution_half_life_rows") or 0
            if half_life and top.ndim == 2 and len(top) == 1 and top.shape[1]:
                groups.setdefault((len(arrays["metrics"]), half_life, top.shape[1]), []).append(i)
        done = [False] * len(pairs)
        for (n_metrics, half_life, width), idx in groups.items():
            if len(idx) < 2:
                continue
            tops = np.concatenate([np.asarray(pairs[i][1]["top"]) for i in idx])
            values = np.concatenate([np.asarray(pairs[i][1]["top_values"], dtype=np.float64) for i in idx])
            rows = np.zeros((len(idx), n_metrics))
            rows[np.arange(len(idx))[:, None], tops] = values
            before = np.zeros((len(idx), n_metrics))
            for k, i in enumerate(idx):
                held = pairs[i][0].held_before(n_metrics)
                if held is not None:
                    before[k] = held
            out, last = hold_peaks_across(rows, half_life, before)
            order = np.argsort(-out, axis=1, kind="stable")[:, :width]
            order_values = np.take_along_axis(out, order, axis=1)
            for k, i in enumerate(idx):
                tracked, arrays = pairs[i]
                tracked.keep_held(last[k])
                arrays["top"], arrays["top_values"] = order[k : k + 1], order_values[k : k + 1]
                done[i] = True
        return done

    @staticmethod
    def _hold_peak_row(
        tracked: _Tracked, arrays: dict[str, Any], n_metrics: int, half_life: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """`_hold_peaks` for a request of one row (each entity of a snapshot), in Python floats
        (`detect.attribution.hold_peak_row`): the same held values and ranking, at a fraction of the cost."""
        row = [0.0] * n_metrics
        for j, value in zip(arrays["top"][0].tolist(), arrays["top_values"][0].tolist()):
            row[j] = value
        before = tracked.held_before(n_metrics)
        out, last = hold_peak_row(row, half_life, None if before is None else before.tolist())
        tracked.keep_held(last)
        order = sorted(range(n_metrics), key=lambda j: -out[j])[: len(arrays["top"][0])]  # stable, as argsort's
        arrays["top"], arrays["top_values"] = np.array([order]), np.array([[out[j] for j in order]])
        return arrays["top"], arrays["top_values"]

    @staticmethod
    def _spot(tracked: _Tracked, seed: SpotSeed | None) -> AlertAwareSpot | None:
        """The pair's SPOT for `seed`'s model: kept while that model serves, started again from its bundle's
        state when another one does (a promotion, a rollback, another arm of a split)."""
        if seed is None:
            return None
        if tracked.spot is None or tracked.spot_model != seed.model:
            tracked.spot = AlertAwareSpot(threshold_from_state(seed.state), tracked.grouper.n)
            tracked.spot_model = seed.model
        return tracked.spot

    def take(self, detector: str, entity: str) -> _Tracked | None:
        """Remove and return the pair's alert state (the fleet lane takes it over), or None."""
        tracked = self._tracked.pop((detector, entity), None)
        if tracked is not None and tracked.grouper.current_ is not None:
            self._open -= 1
        return tracked

    def put(self, detector: str, entity: str, tracked: _Tracked) -> None:
        """Hold the pair's alert state again, as the most recently scored."""
        evicted = lru_put(self._tracked, (detector, entity), tracked, self.max_entities)
        self._open += (tracked.grouper.current_ is not None) - (
            evicted is not None and evicted.grouper.current_ is not None
        )

    def firing(self) -> int:
        """Alerts open now, over every (detector, entity) pair (a count kept as they change: the gauge is
        set on every scoring call, which must not walk every pair)."""
        return self._open

    def _of(self, detector: str, entity: str) -> _Tracked:
        def new() -> _Tracked:
            grouper = AlertGrouper()
            return _Tracked(grouper, [None] * grouper.n)

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
