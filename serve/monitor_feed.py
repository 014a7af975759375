"""The ingress's feed to the drift monitors: what was served goes on a bounded queue, never delaying a
response, and a background task hands it to each model's monitor actor in batches.

Rows that do not fit (a full queue) or cannot be delivered (a monitor gone for good) are counted, not
waited for: drift monitoring must never cost a scoring request its latency. No Serve here; the ingress
gives it a delivery function (the monitor actors) and counters, and tests give it their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from serve.schemas import row_thresholds

log = logging.getLogger(__name__)

MONITOR_BATCH_ROWS = 5_000  # rows per call to a monitor

Deliver = Callable[[str, list[dict[str, Any]]], Awaitable[None]]  # (model, rows) -> the model's monitor has them
Count = Callable[[str, int, str | None], None]  # (model, rows, reason or None for delivered)


class MonitorFeed:
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
        self.queue: asyncio.Queue | None = None  # created on first use, in the replica's event loop
        self.dropped = 0
        self._task: asyncio.Task | None = None

    def offer(
        self,
        model: str,
        entity: str,
        timestamps: list,
        values: np.ndarray,
        path: str,
        arrays: dict[str, Any],
        model_key: str | None = None,
    ) -> None:
        """Queue what `model` served for `entity`; never waits. Scores count only when the champion served
        them: a challenger's or the fallback's say nothing about the champion's drift. `model_key` names the
        fleet model that scored a new entity: the monitor keeps its rows for the job that trains its own."""
        if not self.enabled:
            return
        if self.queue is None:
            self.queue = asyncio.Queue(maxsize=self.queue_rows)
            self._task = asyncio.get_running_loop().create_task(self.run())
        champion = path == "champion"
        thresholds = row_thresholds(arrays).tolist()
        scores = np.asarray(arrays["scores"], dtype=np.float64).tolist()
        for ts, row, score, threshold in zip(timestamps, values.tolist(), scores, thresholds):
            item = {
                "entity": entity,
                "timestamp": ts,
                "values": row,
                "score": score if champion else None,
                "is_anomaly": score >= threshold if champion else None,
                "path": path,
            }
            if model_key and model_key != entity:
                item["model_key"] = model_key
            try:
                self.queue.put_nowait((model, item))
            except asyncio.QueueFull:
                self._lost(model, 1, "queue_full")

    async def run(self) -> None:
        """Drain the queue: wait for a row, let more gather for `flush_s` (one monitor call and commit per
        flush), then deliver up to MONITOR_BATCH_ROWS rows, grouped by model."""
        queue = self.queue
        while True:
            batches: dict[str, list[dict[str, Any]]] = {}
            model, item = await queue.get()
            batches.setdefault(model, []).append(item)
            await asyncio.sleep(self.flush_s)
            taken = 1
            while not queue.empty() and taken < MONITOR_BATCH_ROWS:
                model, item = queue.get_nowait()
                batches.setdefault(model, []).append(item)
                taken += 1
            for model, items in batches.items():
                try:
                    await self.deliver(model, items)
                    self.count(model, len(items), None)
                except Exception as exc:  # the monitor is down for good: count the loss, keep serving
                    self._lost(model, len(items), "monitor_error")
                    log.warning("monitor call failed", extra={"detector": model, "error": str(exc)})

    def _lost(self, model: str, rows: int, reason: str) -> None:
        self.dropped += rows
        self.count(model, rows, reason)

    def status(self) -> dict[str, int]:
        return {"pending": self.queue.qsize() if self.queue else 0, "dropped": self.dropped}
