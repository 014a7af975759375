"""Alerts, not rows: group above-threshold rows into alert episodes an operator receives once.

An alert opens when at least k of the last n rows score at or above their threshold (a single
spike does not page anyone) and resolves after `clear` consecutive rows below it (hysteresis: a
score that flaps around the threshold stays one alert). One episode carries its first and last
above-threshold rows, the row it was raised at, its peak score and the metrics that explain it.

`AlertGrouper` is pure and streams one row at a time (serving, the Prometheus exporter); `group_alerts`
runs it over a whole series (evaluation). Both give the same alerts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from detect.thresholds import DSPOT, SPOT

#: k of n: 3 of the last 5 rows above threshold raise an alert
DEFAULT_K, DEFAULT_N = 3, 5
#: an alert resolves after this many consecutive rows below the threshold
DEFAULT_CLEAR = 10
#: metrics named in an alert
DEFAULT_TOP = 3

Transition = Literal["opened", "closed"]


@dataclass(frozen=True)
class Alert:
    start: int  # first above-threshold row of the window that raised it
    opened: int  # the row at which it was raised (time to detect counts to here)
    end: int  # last above-threshold row
    closed: int | None  # the row at which it resolved; None while it still fires
    peak_score: float
    peak_row: int
    top_metrics: tuple[int, ...] = ()  # metric indices, largest summed contribution over its rows first

    @property
    def rows(self) -> tuple[int, int]:
        """The episode as (start, stop) with stop exclusive."""
        return self.start, self.end + 1


@dataclass
class _Open:
    start: int
    opened: int
    end: int
    peak_score: float
    peak_row: int
    contribution: np.ndarray | None = None


@dataclass(slots=True)
class AlertGrouper:
    """Streaming k-of-n alert grouping with a quiet-period hysteresis. Feed rows in time order.

    The last n rows live in place (row r at slot r % n: a score array, a bit per row at or above its
    threshold, their contributions), so a row fed allocates nothing that outlives it: serving keeps one
    grouper per (detector, entity), tens of thousands of them, fed a row each per snapshot."""

    k: int = DEFAULT_K
    n: int = DEFAULT_N
    clear: int = DEFAULT_CLEAR
    top: int = DEFAULT_TOP
    row_: int = field(init=False, default=-1)
    current_: _Open | None = field(init=False, default=None)
    _scores: np.ndarray = field(init=False, repr=False)  # the window's scores, row r at slot r % n
    _contributions: list = field(init=False, repr=False)  # the window's contributions (None: not given)
    _hot: int = field(init=False, default=0, repr=False)  # bit r % n set: row r at or above its threshold
    _size: int = field(init=False, default=0, repr=False)  # rows in the window: up to n, 0 after a close
    _quiet: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ValueError(f"alerting: need 1 <= k <= n, got k={self.k}, n={self.n}")
        if self.clear < 1:
            raise ValueError(f"alerting: clear must be >= 1 row, got {self.clear}")
        self._scores = np.zeros(self.n)
        self._contributions = [None] * self.n

    @property
    def firing(self) -> Alert | None:
        """The alert now open, as it stands (closed is None)."""
        return self._snapshot(None) if self.current_ else None

    def update(
        self, score: float, threshold: float, contributions: np.ndarray | None = None
    ) -> tuple[Transition, Alert] | None:
        """Take the next row; returns ("opened" | "closed", alert) when this row changes the state."""
        self.row_ += 1
        above = score >= threshold
        contrib = None if contributions is None else np.asarray(contributions, dtype=np.float64)
        slot = self.row_ % self.n
        self._scores[slot] = score
        self._contributions[slot] = contrib
        self._hot = self._hot | (1 << slot) if above else self._hot & ~(1 << slot)
        self._size = min(self._size + 1, self.n)
        if self.current_ is None:
            return self._maybe_open()
        if above:
            self._extend(self.row_, float(score), contrib)
            self._quiet = 0
            return None
        self._quiet += 1
        if self._quiet < self.clear:
            return None
        alert = self._snapshot(self.row_)
        self.current_, self._quiet = None, 0
        self._hot, self._size = 0, 0  # the rows that closed it must not count towards the next alert
        for slot in range(self.n):
            self._contributions[slot] = None
        return "closed", alert

    def _maybe_open(self) -> tuple[Transition, Alert] | None:
        if self._hot.bit_count() < self.k:
            return None
        hot = [r for r in range(self.row_ - self._size + 1, self.row_ + 1) if self._hot >> (r % self.n) & 1]
        first = hot[0]
        score = float(self._scores[first % self.n])
        self.current_ = _Open(start=first, opened=self.row_, end=first, peak_score=score, peak_row=first)
        for r in hot:
            self._extend(r, float(self._scores[r % self.n]), self._contributions[r % self.n])
        self._quiet = 0
        return "opened", self._snapshot(None)

    def _extend(self, row: int, score: float, contrib: np.ndarray | None) -> None:
        cur = self.current_
        cur.end = row
        if score > cur.peak_score:
            cur.peak_score, cur.peak_row = score, row
        if contrib is not None:
            cur.contribution = contrib.copy() if cur.contribution is None else cur.contribution + contrib

    def state(self) -> dict:
        """Everything it holds, as plain values (the fleet lane keeps many groupers' state as columns)."""
        cur = self.current_
        return {
            "row": self.row_,
            "hot": self._hot,
            "size": self._size,
            "quiet": self._quiet,
            "scores": self._scores.copy(),
            "contributions": list(self._contributions),
            "open": None
            if cur is None
            else (cur.start, cur.opened, cur.end, cur.peak_score, cur.peak_row, cur.contribution),
        }

    @classmethod
    def of_state(cls, state: dict) -> AlertGrouper:
        """A grouper (of the default k, n, clear and top) holding `state` (`AlertGrouper.state`'s keys)."""
        out = cls()
        out.row_, out._hot, out._size, out._quiet = state["row"], state["hot"], state["size"], state["quiet"]
        out._scores[:] = state["scores"]
        out._contributions = list(state["contributions"])
        if state["open"] is not None:
            start, opened, end, peak_score, peak_row, contribution = state["open"]
            out.current_ = _Open(start, opened, end, peak_score, peak_row, contribution)
        return out

    def _snapshot(self, closed: int | None) -> Alert:
        cur = self.current_
        top: tuple[int, ...] = ()
        if cur.contribution is not None:
            top = tuple(int(i) for i in np.argsort(-cur.contribution, kind="stable")[: self.top])
        return Alert(cur.start, cur.opened, cur.end, closed, cur.peak_score, cur.peak_row, top)


def group_alerts(
    scores: np.ndarray,
    thresholds: np.ndarray | float,
    contributions: np.ndarray | None = None,
    grouper: AlertGrouper | None = None,
) -> list[Alert]:
    """Every alert of a time-ordered series, the last one possibly still firing (closed None)."""
    grouper = grouper or AlertGrouper()
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), scores.shape)
    alerts = []
    for i, (s, t) in enumerate(zip(scores, thresholds)):
        change = grouper.update(s, t, None if contributions is None else contributions[i])
        if change and change[0] == "closed":
            alerts.append(change[1])
    if grouper.firing:
        alerts.append(grouper.firing)
    return alerts


@dataclass
class AlertAwareSpot:
    """SPOT (or DSPOT) learning from a stream whose rows are grouped into alerts: what it may learn from
    and when.

    A row of an alert (firing, or in the window that opened it) is never learnt: an incident must not
    raise the bar that detects it. A row above the bar that opens no alert is a normal spike, which a
    steady stream has once in 1 / risk rows; it is learnt once it has left the grouper's window without
    opening one (`n - 1` rows later). Leaving such spikes out for good truncates the tail SPOT fits, and
    its threshold sinks over a long stream. Every other row is learnt at once, unless an alert fires.
    For DSPOT "learnt" includes its baseline: an incident's rows never move it."""

    spot: SPOT | DSPOT
    window: int = DEFAULT_N
    _pending: deque = field(default_factory=deque, repr=False)  # (row, score): above the bar, no alert yet

    @property
    def threshold(self) -> float:
        return self.spot.threshold_

    def after(self, score: float, threshold: float, grouper: AlertGrouper) -> None:
        """Learn from the row `grouper` just took (judged against `threshold`), as far as it may."""
        if grouper.firing is not None:
            self._pending.clear()  # they belong to the alert
            return
        row = grouper.row_
        if score >= threshold:
            self._pending.append((row, score))
        else:
            self.spot.update(score, learn=True)
        while self._pending and self._pending[0][0] <= row - (self.window - 1):
            self.spot.update(self._pending.popleft()[1], learn=True)


def online_alerts(
    scores: np.ndarray,
    spot: SPOT | DSPOT,
    contributions: np.ndarray | None = None,
    grouper: AlertGrouper | None = None,
) -> tuple[np.ndarray, list[Alert]]:
    """Judge a time-ordered series as serving would: each row against SPOT's current threshold, then
    SPOT learns from what is not an alert's (`AlertAwareSpot`). Returns the threshold per row and the
    alerts."""
    grouper = grouper or AlertGrouper()
    learning = AlertAwareSpot(spot, grouper.n)
    thresholds = np.empty(len(scores))
    alerts = []
    for i, score in enumerate(np.asarray(scores, dtype=np.float64)):
        thresholds[i] = learning.threshold
        change = grouper.update(score, thresholds[i], None if contributions is None else contributions[i])
        if change and change[0] == "closed":
            alerts.append(change[1])
        learning.after(score, thresholds[i], grouper)
    if grouper.firing:
        alerts.append(grouper.firing)
    return thresholds, alerts
