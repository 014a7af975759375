"""The fleet lane: a snapshot's grown, fleet-scored machines held as columns, not objects (issue 20).

A fleet snapshot is one row for each of thousands of machines, most of them scored by a fleet model. Per
machine, the ingress kept a history (`serve.history.EntityHistory`), its statistics and own threshold
(`ColdStarts`) and an alert grouping per detector (`AlertBook`), each an object fed one row at a time: at
10,000 machines the ingress spent about 108 us a machine on a snapshot, most of it Python calls on those
objects (docs/experiments/snapshot-columns.md). The lane keeps the same state for a schema's machines as
arrays with one slot per machine, and steps a whole chunk of a snapshot in a few numpy operations.

Who holds a machine's state: the objects or the lane, never both. A machine moves into the lane at a
snapshot (`FleetLane.admit`) once it is grown: its statistics are frozen (the windows its next rows read
use its last checkpoint only) and its history holds the rows its models read. It moves back out
(`FleetLane.release`) before anything else scores it: a per-entity route, a model of its own, a challenger
or a rollout of its detector, a forecast or a baseline. Its state then goes on in the objects as if it had
never left; the tests drive one stream through both and compare every answer.

What a machine holds in the lane (one slot of each array):
- its last `keep` rows (a ring), its rows seen and its frozen statistics (median and spread per metric at
  each checkpoint: a grown `detect.fleet.Sampler`, made again when it leaves);
- per detector (`_Book`): its own threshold (learnt, or the largest scores seen while it learns,
  `detect.fleet.OwnThreshold`), the held attribution (`detect.attribution`), and the alert grouping
  (`detect.alerting.AlertGrouper`): the last n rows' scores, hot bits and contributions, the row and quiet
  counters, the open alert's start, peak and summed contributions, and the timestamps its reports quote.

An alert that opens or closes, and every firing one, is reported per machine; the rest is array work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detect.alerting import DEFAULT_CLEAR, DEFAULT_K, DEFAULT_N, DEFAULT_TOP, AlertGrouper
from detect.attribution import hold_peaks_across
from detect.fleet import CHECKPOINTS, MAX_WINDOW, OWN_THRESHOLD_ROWS, OwnThreshold, Sampler
from serve.history import MAX_ENTITIES, AlertBook, ColdStarts, EntityHistory, RecentRows, _Tracked

FIRST_SLOTS = 256  # slots a lane's arrays start with
GROWTH = 8  # then they grow by an eighth (at least FIRST_SLOTS): at most 12.5% of slots idle, not half
_BITS = np.array([bin(i).count("1") for i in range(1 << DEFAULT_N)], dtype=np.int64)  # popcount of n bits


@dataclass(frozen=True)
class LaneKey:
    """What a lane's machines share: their metrics (in the models' order), the detectors that score them
    through a fleet model ((detector, fleet model key, rows of context its model reads)) and the history rows
    each keeps (what `EntityHistory` keeps for them)."""

    metrics: tuple[str, ...]
    detectors: tuple[tuple[str, str, int], ...]
    keep: int


class _Arrays:
    """Arrays with one row per slot, grown together; a slot taken again starts from each array's fill."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._specs: dict[str, tuple[tuple[int, ...], Any, Any]] = {}

    def _add(self, name: str, shape: tuple[int, ...], dtype: Any, fill: Any) -> None:
        self._specs[name] = (shape, dtype, fill)
        setattr(self, name, np.full((self.capacity, *shape), fill, dtype=dtype))

    def grow(self, capacity: int) -> None:
        for name, (shape, dtype, fill) in self._specs.items():
            grown = np.full((capacity, *shape), fill, dtype=dtype)
            grown[: self.capacity] = getattr(self, name)
            setattr(self, name, grown)
        self.capacity = capacity

    def clear(self, slot: int) -> None:
        for name, (_, _, fill) in self._specs.items():
            getattr(self, name)[slot] = fill


class _Book(_Arrays):
    """One detector's judgement of each slot's rows: own threshold, held attribution, alert grouping."""

    def __init__(self, capacity: int, metrics: int) -> None:
        super().__init__(capacity)
        n = DEFAULT_N
        self._add("own_value", (), np.float64, np.nan)  # NaN: still learning
        self._add("own_largest", (OwnThreshold.TAIL_ROWS,), np.float64, -np.inf)
        self._add("own_seen", (), np.int64, 0)
        self._add("held", (metrics,), np.float64, 0.0)
        self._add("row", (), np.int64, -1)
        self._add("hot", (), np.int64, 0)  # bit r % n: row r at or above its threshold
        self._add("size", (), np.int64, 0)
        self._add("quiet", (), np.int64, 0)
        self._add("open", (), bool, False)
        for name in ("start", "opened", "end", "peak_row"):
            self._add(name, (), np.int64, 0)
        self._add("peak", (), np.float64, 0.0)
        self._add("contribution", (metrics,), np.float64, 0.0)
        self._add("window_scores", (n,), np.float64, 0.0)
        self._add("window_contributions", (n, metrics), np.float64, 0.0)
        self._add("recent", (n,), object, None)  # timestamps of the last n rows, row r's at r % n
        self._add("started_at", (), object, None)
        self._add("opened_at", (), object, None)

    def take(self, slot: int, own: OwnThreshold | None, tracked: _Tracked | None) -> None:
        """Hold a machine's threshold and alert state, taken from their objects."""
        self.clear(slot)
        if own is not None:
            largest, seen, value = own.state()
            self.own_seen[slot] = seen
            if value is not None:
                self.own_value[slot] = value
            if largest is not None:
                self.own_largest[slot] = largest
        if tracked is None:
            return
        metrics = self.held.shape[1]
        if tracked.held is not None and len(tracked.held) == metrics:
            self.held[slot] = tracked.held
        state = tracked.grouper.state()
        self.row[slot], self.hot[slot], self.size[slot], self.quiet[slot] = (
            state["row"],
            state["hot"],
            state["size"],
            state["quiet"],
        )
        self.window_scores[slot] = state["scores"]
        for k, contribution in enumerate(state["contributions"]):
            if contribution is not None:
                self.window_contributions[slot, k] = contribution
        if state["open"] is not None:
            start, opened, end, peak, peak_row, contribution = state["open"]
            self.open[slot] = True
            self.start[slot], self.opened[slot], self.end[slot] = start, opened, end
            self.peak[slot], self.peak_row[slot] = peak, peak_row
            if contribution is not None:
                self.contribution[slot] = contribution
        self.recent[slot] = tracked.recent
        self.started_at[slot], self.opened_at[slot] = tracked.started, tracked.opened

    def give(self, slot: int) -> tuple[OwnThreshold, _Tracked]:
        """The machine's threshold and alert state as the objects that hold them outside the lane."""
        learnt = not np.isnan(self.own_value[slot])
        own = OwnThreshold.of_state(
            None if learnt else self.own_largest[slot],
            int(self.own_seen[slot]),
            float(self.own_value[slot]) if learnt else None,
        )
        hot = int(self.hot[slot])
        is_open = bool(self.open[slot])
        state = {
            "row": int(self.row[slot]),
            "hot": hot,
            "size": int(self.size[slot]),
            "quiet": int(self.quiet[slot]),
            "scores": self.window_scores[slot],
            "contributions": [
                self.window_contributions[slot, k].copy() if hot >> k & 1 else None for k in range(DEFAULT_N)
            ],
            "open": None
            if not is_open
            else (
                int(self.start[slot]),
                int(self.opened[slot]),
                int(self.end[slot]),
                float(self.peak[slot]),
                int(self.peak_row[slot]),
                self.contribution[slot].copy(),
            ),
        }
        tracked = _Tracked(AlertGrouper.of_state(state), list(self.recent[slot]))
        tracked.started, tracked.opened = self.started_at[slot], self.opened_at[slot]
        tracked.held = self.held[slot].copy()
        return own, tracked


class _Store(_Arrays):
    """The slots of one `LaneKey`'s machines."""

    def __init__(self, key: LaneKey) -> None:
        super().__init__(FIRST_SLOTS)
        self.key = key
        metrics = len(key.metrics)
        self._add("ring", (key.keep, metrics), np.float64, 0.0)  # row (head + j) % keep: the j-th oldest
        self._add("head", (), np.int64, 0)
        self._add("rows_seen", (), np.int64, 0)
        self._add("stats", (len(CHECKPOINTS), 2, metrics), np.float64, 0.0)  # at every checkpoint (grown)
        self._add("seen_at", (), np.int64, 0)  # the lane's step at which the machine was last scored
        self.books = {name: _Book(self.capacity, metrics) for name, _, _ in key.detectors}
        self.slot_of: dict[str, int] = {}
        self.entity: list[str | None] = [None] * self.capacity
        self.free: list[int] = list(range(self.capacity - 1, -1, -1))

    def new_slot(self) -> int:
        if not self.free:
            capacity = self.capacity + max(FIRST_SLOTS, self.capacity // GROWTH)
            self.grow(capacity)
            for book in self.books.values():
                book.grow(capacity)
            self.entity += [None] * (capacity - len(self.entity))
            self.free = list(range(capacity - 1, len(self.slot_of) - 1, -1))
        return self.free.pop()

    def ordered_rows(self, slot: int) -> np.ndarray:
        """The machine's kept rows, oldest first."""
        return self.ring[slot, (self.head[slot] + np.arange(self.key.keep)) % self.key.keep]


@dataclass
class LanePlan:
    """A chunk's machines as the lane stepped them: what each detector's call carries, and the slots to
    judge the answers into (`FleetLane.judge` checks that each machine is still there)."""

    store: _Store
    entities: list[str]
    timestamps: list[Any]
    slots: np.ndarray
    values: np.ndarray  # (B, M) the new rows
    rows: dict[str, np.ndarray]  # per detector: (B, context + 1, M), the context and the new row
    offsets: dict[str, np.ndarray]  # per detector: the row of each machine's life its item's rows start at
    stats_rows: np.ndarray  # (B, 1): the checkpoint behind the statistics
    stats_values: np.ndarray  # (B, 1, 2, M)


class FleetLane:
    """Every lane's slots, and which lane holds each machine. Bounded: past `max_entities` machines, the
    least recently scored are forgotten (they start again at their first row, as an evicted entity does)."""

    def __init__(self, max_entities: int = MAX_ENTITIES) -> None:
        self.max_entities = max_entities
        self._stores: dict[LaneKey, _Store] = {}
        self._where: dict[str, _Store] = {}
        self._open = 0
        self._step = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, entity: str) -> bool:
        return entity in self._where

    def firing(self) -> int:
        """Alerts open now on the lane's machines."""
        return self._open

    # -- moving machines in and out -----------------------------------------------------------------------
    def admit(
        self,
        key: LaneKey,
        entities: Sequence[str],
        history: EntityHistory,
        cold: ColdStarts,
        alerts: AlertBook,
    ) -> np.ndarray:
        """Each entity's slot in `key`'s lane, moving in those that are grown (their state taken from the
        objects); -1 for those that are not yet (the objects keep scoring them)."""
        if len(self._stores) > 1:  # lanes emptied since (their key no longer served) go
            self._stores = {k: s for k, s in self._stores.items() if s.slot_of or k == key}
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = _Store(key)
        detectors = [name for name, _, _ in key.detectors]
        now = self._step + 1  # the step these entities are about to be scored in
        slots = np.fromiter((store.slot_of.get(e, -1) for e in entities), dtype=np.int64, count=len(entities))
        store.seen_at[slots[slots >= 0]] = now  # none of them is forgotten to make room for another
        for i in np.flatnonzero(slots < 0).tolist():
            entity = entities[i]
            if entity in self._where:  # held under another key (its detectors or context changed)
                self.release(entity, history, cold, alerts)
            if not self._grown(key, entity, history, cold):
                continue
            if len(self._where) >= self.max_entities and not self._evict_oldest(before=now):
                continue  # every machine held is in this step: the objects score the rest
            slots[i] = self._take(store, entity, detectors, history, cold, alerts)
            store.seen_at[slots[i]] = now
        return slots

    def _grown(self, key: LaneKey, entity: str, history: EntityHistory, cold: ColdStarts) -> bool:
        """Whether the objects' state of `entity` can move in: its statistics frozen and its next windows
        reading the last checkpoint only, and its history holding the rows the lane keeps."""
        sampler, rows = cold.peek(entity), history.peek(entity)
        metrics = len(key.metrics)
        if sampler is None or sampler.held_bytes or sampler.stats.values.shape[2:] != (metrics,):
            return False
        if rows is None or len(rows) < key.keep or rows.array().shape[1] != metrics:
            return False
        context = min(c for _, _, c in key.detectors)
        return sampler.rows - context - MAX_WINDOW + 1 >= CHECKPOINTS[-1]

    def _take(
        self,
        store: _Store,
        entity: str,
        detectors: list[str],
        history: EntityHistory,
        cold: ColdStarts,
        alerts: AlertBook,
    ) -> int:
        slot = store.new_slot()
        store.clear(slot)
        rows = history.take(entity)
        sampler, owns = cold.take(entity, detectors)
        store.ring[slot] = rows.last(store.key.keep)
        store.rows_seen[slot] = sampler.rows
        store.stats[slot] = sampler.stats.values
        store.seen_at[slot] = self._step
        store.entity[slot] = entity
        for name, book in store.books.items():
            book.take(slot, owns.get(name), alerts.take(name, entity))
            self._open += bool(book.open[slot])
        store.slot_of[entity] = slot
        self._where[entity] = store
        return slot

    def release(self, entity: str, history: EntityHistory, cold: ColdStarts, alerts: AlertBook) -> bool:
        """Give the entity's state back to the objects (before anything else scores it); False if the lane
        does not hold it."""
        store = self._where.pop(entity, None)
        if store is None:
            return False
        slot = store.slot_of.pop(entity)
        keep = RecentRows(store.key.keep)
        keep.extend(store.ordered_rows(slot))
        history.put(entity, keep)
        sampler = Sampler.grown(store.rows_seen[slot], store.stats[slot])
        owns = {}
        for name, book in store.books.items():
            owns[name], tracked = book.give(slot)
            self._open -= bool(book.open[slot])
            alerts.put(name, entity, tracked)
        cold.put(entity, sampler, owns)
        self._free(store, slot)
        return True

    def _free(self, store: _Store, slot: int) -> None:
        store.entity[slot] = None
        for book in store.books.values():
            book.recent[slot] = None
            book.started_at[slot] = book.opened_at[slot] = None
        store.free.append(slot)

    def _evict_oldest(self, before: int) -> bool:
        """Forget the least recently scored machine of any lane, if one was last scored before step `before`."""
        oldest = None
        for store in self._stores.values():
            if store.slot_of:
                used = np.fromiter(store.slot_of.values(), dtype=np.int64, count=len(store.slot_of))
                slot = int(used[store.seen_at[used].argmin()])
                if oldest is None or store.seen_at[slot] < oldest[0].seen_at[oldest[1]]:
                    oldest = (store, slot)
        if oldest is None or oldest[0].seen_at[oldest[1]] >= before:
            return False
        store, slot = oldest
        entity = store.entity[slot]
        del store.slot_of[entity], self._where[entity]
        self._open -= sum(bool(book.open[slot]) for book in store.books.values())
        self._free(store, slot)
        return True

    # -- a snapshot's step ----------------------------------------------------------------------------------
    def plan(
        self, key: LaneKey, entities: list[str], timestamps: list[Any], slots: np.ndarray, values: np.ndarray
    ) -> LanePlan:
        """Take the chunk's new rows (`values`, (B, M)) into the machines' rings, as the objects take them when
        a request is planned, and return what each detector's call carries."""
        store = self._stores[key]
        self._step += 1
        keep = key.keep
        ring_rows: dict[str, np.ndarray] = {}
        offsets: dict[str, np.ndarray] = {}
        for name, _, context in key.detectors:
            order = (store.head[slots][:, None] + np.arange(keep - context, keep)) % keep
            ring_rows[name] = np.concatenate([store.ring[slots[:, None], order], values[:, None, :]], axis=1)
            offsets[name] = store.rows_seen[slots] - context
        stats_rows = np.full((len(slots), 1), CHECKPOINTS[-1], dtype=np.int64)
        stats_values = store.stats[slots, -1][:, None]  # the last checkpoint's: all a grown window reads
        store.ring[slots, store.head[slots]] = values
        store.head[slots] = (store.head[slots] + 1) % keep
        store.rows_seen[slots] += 1
        store.seen_at[slots] = self._step
        return LanePlan(store, entities, timestamps, slots, values, ring_rows, offsets, stats_rows, stats_values)

    def live(self, plan: LanePlan) -> np.ndarray:
        """Which of the plan's machines the lane still holds in their slots (one released or evicted while its
        call was out is judged by the objects)."""
        slot_of = plan.store.slot_of
        return np.array(
            [
                slot_of.get(e) == s and self._where.get(e) is plan.store
                for e, s in zip(plan.entities, plan.slots.tolist())
            ],
            dtype=bool,
        )

    def kept_rows(self, plan: LanePlan, i: int) -> np.ndarray:
        """The kept rows of the plan's i-th machine, oldest first (its new row last): the fallback's reference."""
        return plan.store.ordered_rows(int(plan.slots[i]))

    def judge(
        self,
        plan: LanePlan,
        detector: str,
        where: np.ndarray,
        scores: np.ndarray,
        thresholds: np.ndarray,
        top: np.ndarray,
        top_values: np.ndarray,
        half_life: float,
        metrics: Sequence[str],
        timestamps: Sequence[Any],
        own_threshold: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any] | None], int, int]:
        """Judge one detector's new scores of the plan's machines at `where` (those still in the lane:
        `live`), as `ColdStarts.threshold` and `AlertBook.observe` judge each: the threshold each row is held
        to (the machine's own once learnt, with `own_threshold`; else the model's, `thresholds`), the top
        metrics held at their recent peaks, and each row's alert report. Returns (thresholds, top,
        top_values, reports, alerts opened, alerts closed)."""
        book = plan.store.books[detector]
        slots = plan.slots[where]
        count = len(slots)
        scores = np.asarray(scores, dtype=np.float64)
        given = np.asarray(thresholds, dtype=np.float64)
        thresholds = self._own_thresholds(book, slots, scores, given) if own_threshold else given.copy()
        top, top_values = np.asarray(top), np.asarray(top_values, dtype=np.float64)
        if half_life and top.size:
            top, top_values = self._hold(book, slots, top, top_values, len(metrics), half_life)
        hot = scores >= thresholds
        contributions = np.zeros((count, len(metrics)))
        np.put_along_axis(contributions, top, top_values, axis=1)
        reports, opened, closed = self._group(book, slots, scores, hot, contributions, metrics, timestamps)
        self._open += opened - closed
        return thresholds, top, top_values, reports, opened, closed

    @staticmethod
    def _own_thresholds(book: _Book, slots: np.ndarray, scores: np.ndarray, fleet: np.ndarray) -> np.ndarray:
        """`OwnThreshold.observe` of one score per slot: the threshold in force, then the score counted."""
        value = book.own_value[slots]
        learning = np.isnan(value)
        thresholds = np.where(learning, fleet, np.maximum(value, fleet))
        if learning.any():
            at, new = slots[learning], scores[learning]
            largest = book.own_largest[at]
            smallest = largest.argmin(axis=1)  # the first NaN, if any, as `ndarray.argmin` finds it
            replace = ~(new <= largest[np.arange(len(at)), smallest])
            book.own_largest[at[replace], smallest[replace]] = new[replace]
            book.own_seen[at] += 1
            for slot in at[book.own_seen[at] == OWN_THRESHOLD_ROWS].tolist():
                book.own_value[slot] = OwnThreshold.learnt_from(book.own_largest[slot])
        return thresholds

    @staticmethod
    def _hold(
        book: _Book, slots: np.ndarray, top: np.ndarray, top_values: np.ndarray, metrics: int, half_life: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """`AlertBook._hold_peaks` of one row per slot (`detect.attribution.hold_peaks_across`)."""
        rows = np.zeros((len(slots), metrics))
        np.put_along_axis(rows, top, top_values, axis=1)
        out, last = hold_peaks_across(rows, half_life, book.held[slots])
        book.held[slots] = last
        order = np.argsort(-out, axis=1, kind="stable")[:, : top.shape[1]]
        return order, np.take_along_axis(out, order, axis=1)

    def _group(
        self,
        book: _Book,
        slots: np.ndarray,
        scores: np.ndarray,
        hot: np.ndarray,
        contributions: np.ndarray,
        metrics: Sequence[str],
        timestamps: Sequence[Any],
    ) -> tuple[list[dict[str, Any] | None], int, int]:
        """`AlertGrouper.update` of one row per slot, with `AlertBook`'s reports: the window and counters as
        array operations; an alert that opens or closes is worked out slot by slot (few are)."""
        n = DEFAULT_N
        row = book.row[slots] + 1
        book.row[slots] = row
        place = row % n
        book.recent[slots, place] = np.array(timestamps, dtype=object) if len(timestamps) else timestamps
        book.window_scores[slots, place] = scores
        book.window_contributions[slots, place] = contributions
        bit = np.left_shift(1, place)
        book.hot[slots] = np.where(hot, book.hot[slots] | bit, book.hot[slots] & ~bit)
        book.size[slots] = np.minimum(book.size[slots] + 1, n)
        was_open = book.open[slots]
        extend = was_open & hot
        if extend.any():
            at = slots[extend]
            book.end[at] = row[extend]
            higher = scores[extend] > book.peak[at]
            book.peak[at[higher]] = scores[extend][higher]
            book.peak_row[at[higher]] = row[extend][higher]
            book.contribution[at] += contributions[extend]
            book.quiet[at] = 0
        quiet = was_open & ~hot
        book.quiet[slots[quiet]] += 1
        closing = quiet & (book.quiet[slots] >= DEFAULT_CLEAR)
        opening = ~was_open & (_BITS[book.hot[slots]] >= DEFAULT_K)
        reports: list[dict[str, Any] | None] = [None] * len(slots)
        for i in np.flatnonzero(closing).tolist():
            slot = int(slots[i])
            reports[i] = self._report(book, slot, "closed", metrics, timestamps[i])
            book.open[slot] = False
            book.quiet[slot] = book.hot[slot] = book.size[slot] = 0
            book.started_at[slot] = book.opened_at[slot] = None
        for i in np.flatnonzero(opening).tolist():
            self._open_alert(book, int(slots[i]), int(row[i]))
            book.opened_at[int(slots[i])] = timestamps[i]
        firing = np.flatnonzero(book.open[slots] & ~closing)
        for i in firing.tolist():
            reports[i] = self._report(book, int(slots[i]), "opened" if opening[i] else "firing", metrics, None)
        return reports, int(opening.sum()), int(closing.sum())

    @staticmethod
    def _open_alert(book: _Book, slot: int, row: int) -> None:
        """`AlertGrouper._maybe_open` for a slot whose window now holds k hot rows."""
        n, size, hot = DEFAULT_N, int(book.size[slot]), int(book.hot[slot])
        rows = [r for r in range(row - size + 1, row + 1) if hot >> (r % n) & 1]
        first = rows[0]
        book.open[slot] = True
        book.start[slot], book.opened[slot], book.end[slot] = first, row, first
        book.peak[slot], book.peak_row[slot] = book.window_scores[slot, first % n], first
        book.contribution[slot] = 0.0
        for r in rows:
            score = book.window_scores[slot, r % n]
            book.end[slot] = r
            if score > book.peak[slot]:
                book.peak[slot], book.peak_row[slot] = score, r
            book.contribution[slot] += book.window_contributions[slot, r % n]
        book.quiet[slot] = 0
        book.started_at[slot] = book.recent[slot, first % n]

    @staticmethod
    def _report(book: _Book, slot: int, state: str, metrics: Sequence[str], closed: Any) -> dict[str, Any]:
        """`AlertBook._report` of the slot's alert."""
        top = np.argsort(-book.contribution[slot], kind="stable")[:DEFAULT_TOP]
        return {
            "state": state,
            "started": book.started_at[slot],
            "opened": book.opened_at[slot],
            "closed": closed,
            "rows": int(book.end[slot] - book.start[slot] + 1),
            "peak_score": float(book.peak[slot]),
            "top_metrics": [metrics[j] for j in top.tolist()],
        }
