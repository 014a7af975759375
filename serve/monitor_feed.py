"""The ingress's feed to the drift monitors: what was served goes on a bounded queue, never delaying a
response, and a background task hands it to each model's monitor actor in batches.

Rows that do not fit (a full queue) or cannot be delivered (a monitor gone for good) are counted, not
waited for: drift monitoring must never cost a scoring request its latency. No Serve here; the ingress
gives it a delivery function (the monitor actors) and counters, and tests give it their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from monitoring.served import ServedColumns

log = logging.getLogger("raywatch.serve")

MONITOR_BATCH_ROWS = 5_000  # rows per call to a monitor

Deliver = Callable[[str, ServedColumns], Awaitable[None]]  # (model, rows) -> the model's monitor has them
Count = Callable[[str, int, str | None], None]  # (model, rows, reason or None for delivered)


class MonitorFeed:
    """A bounded queue of served rows (counted in rows, held as columns: monitoring/served.py) and the task
    that drains it into each model's monitor."""

    def __init__(
        self,
        deliver: Deliver,
        queue_rows: int,
        flush_s: float,
        count: Count = lambda model, rows, reason: None,
        enabled: bool = True,
    ) -> None:
        self.deliver, self.queue_rows, self.flush_s, self.count, self.enabled = (
            deliver,
            queue_rows,
            flush_s,
            count,
            enabled,
        )
        self.queue: deque[tuple[str, ServedColumns]] = deque()
        self.pending = 0  # rows in the queue
        self.dropped = 0
        self._ready: asyncio.Event | None = None  # created on first use, in the replica's event loop
        self._task: asyncio.Task | None = None

    def offer(self, model: str, rows: ServedColumns) -> None:
        """Queue what `model` served (`monitoring.served.ServedColumnsBuilder`); never waits. What does not fit
        is counted as dropped."""
        if not self.enabled or not len(rows):
            return
        if self._ready is None:
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self.run())
        room = self.queue_rows - self.pending
        if len(rows) > room:
            self._lost(model, len(rows) - room, "queue_full")
            rows = rows.split(room)[0]
        if len(rows):
            self.queue.append((model, rows))
            self.pending += len(rows)
            self._ready.set()

    def take(self, limit: int = MONITOR_BATCH_ROWS) -> dict[str, list[ServedColumns]]:
        """Up to `limit` queued rows, oldest first, grouped by model and metric count (one monitor call each)."""
        taken: dict[tuple[str, int], list[ServedColumns]] = {}
        while self.queue and limit:
            model, rows = self.queue.popleft()
            if len(rows) > limit:
                rows, rest = rows.split(limit)
                self.queue.appendleft((model, rest))
            self.pending -= len(rows)
            limit -= len(rows)
            taken.setdefault((model, rows.width), []).append(rows)
        out: dict[str, list[ServedColumns]] = {}
        for (model, _), parts in taken.items():
            out.setdefault(model, []).append(ServedColumns.concat(parts))
        return out

    async def run(self) -> None:
        """Drain the queue: wait for rows, let more gather for `flush_s` (one monitor call and commit per
        flush), then deliver up to MONITOR_BATCH_ROWS rows."""
        assert self._ready is not None
        while True:
            await self._ready.wait()
            await asyncio.sleep(self.flush_s)
            for model, batches in self.take().items():
                for rows in batches:
                    try:
                        await self.deliver(model, rows)
                        self.count(model, len(rows), None)
                    except Exception as exc:  # the monitor is down for good: count the loss, keep serving
                        self._lost(model, len(rows), "monitor_error")
                        log.warning("monitor call failed", extra={"detector": model, "error": str(exc)})
            if not self.queue:
                self._ready.clear()

    def _lost(self, model: str, rows: int, reason: str) -> None:
        self.dropped += rows
        self.count(model, rows, reason)

    def status(self) -> dict[str, int]:
        return {"pending": self.pending, "dropped": self.dropped}
