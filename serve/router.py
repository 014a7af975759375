"""Routing decisions: A/B split by a stable hash of the entity, and a circuit breaker per model.

Plain Python, no Ray: the ingress deployment holds one `TrafficPolicy` and one `CircuitBreaker` per
detector.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import deque
from dataclasses import dataclass, field


def bucket(entity: str) -> float:
    """A stable position in [0, 100) for an entity id: the same entity always lands in the same bucket."""
    digest = hashlib.sha256(entity.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


@dataclass
class TrafficPolicy:
    """Which share of the traffic the challenger serves. `split` "entity" (the manual A/B split) keeps each
    entity on one side by its stable bucket; "request" (a canary rollout, serve/rollout.py) draws each
    request at random, and `step_key` names the rollout step whose counts the request adds to."""

    challenger_percent: float = 0.0
    shadow: bool = False
    split: str = "entity"
    step_key: str | None = None

    def path_for(self, entity: str, has_challenger: bool) -> str:
        if not has_challenger or self.challenger_percent <= 0:
            return "champion"  # nothing to split: no hash or draw (a snapshot asks this for every entity)
        position = random.random() * 100 if self.split == "request" else bucket(entity)
        if position < self.challenger_percent:
            return "challenger"
        return "champion"


@dataclass
class CircuitBreaker:
    """Opens on more than `error_rate` errors among the calls of the last `window_s` seconds (with at
    least `min_calls` calls) or on `consecutive` failures in a row; after `cooldown_s` it lets one
    probe through (half-open): success closes it, failure opens it again."""

    error_rate: float = 0.10
    window_s: float = 60.0
    consecutive: int = 5
    cooldown_s: float = 10.0
    min_calls: int = 20
    clock: callable = time.monotonic
    state: str = "closed"
    opened_at: float = 0.0
    failures_in_row: int = 0
    calls: deque = field(default_factory=deque)  # (time, ok)
    errors: int = 0  # failed calls among `calls`, kept in step so a call costs O(1)
    probe_in_flight: bool = False

    def _trim(self, now: float) -> None:
        while self.calls and now - self.calls[0][0] > self.window_s:
            if not self.calls.popleft()[1]:
                self.errors -= 1

    def allow(self) -> bool:
        """May a call go to the model now? (False: use the fallback.)"""
        now = self.clock()
        if self.state == "open":
            if now - self.opened_at >= self.cooldown_s and not self.probe_in_flight:
                self.state, self.probe_in_flight = "half_open", True
                return True
            return False
        if self.state == "half_open":
            return False  # one probe at a time
        return True

    def record(self, ok: bool) -> None:
        now = self.clock()
        if self.state == "half_open":
            self.probe_in_flight = False
            if ok:
                self.state, self.failures_in_row = "closed", 0
                self.calls.clear()
                self.errors = 0
            else:
                self.state, self.opened_at = "open", now
            return
        self.calls.append((now, ok))
        self.errors += not ok
        self._trim(now)
        self.failures_in_row = 0 if ok else self.failures_in_row + 1
        too_many = len(self.calls) >= self.min_calls and self.errors / len(self.calls) > self.error_rate
        if self.failures_in_row >= self.consecutive or too_many:
            self.state, self.opened_at = "open", now
