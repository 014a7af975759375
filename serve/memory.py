"""Giving freed memory back to the operating system after big requests.

A 10,000-row snapshot makes tens of thousands of small Python and numpy objects in a replica (parsed rows,
items, answers); once it is answered they are freed, but glibc's allocator keeps most of the pages, so a
replica's RSS stays at its largest request's high-water mark (the ingress grew 2.4x from 100 to 10,000
machines in benchmarks/results/scale.md). `MemoryTrim.after` asks glibc to return free pages
(`malloc_trim(0)`) after a big request, at most once every `every_s` seconds and always once after the last
big one, on a timer thread that waits `delay_s` at least (the request's objects are freed once its answer
is sent). Elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Any

TRIM_ROWS = 1000  # requests from this many rows leave enough behind to be worth a trim
TRIM_EVERY_S = 5.0
TRIM_DELAY_S = 0.5


def libc_malloc_trim() -> Any:
    """glibc's `malloc_trim`, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


class MemoryTrim:
    """Rate-limited `malloc_trim(0)` after big requests: at most one per `every_s`, and always one after
    the last big request (a big request inside the interval schedules the trim for the interval's end), so
    a replica's RSS between scrapes is what it holds, not its last snapshot's high-water mark."""

    def __init__(self, rows: int = TRIM_ROWS, every_s: float = TRIM_EVERY_S, delay_s: float = TRIM_DELAY_S) -> None:
        self.rows, self.every_s, self.delay_s = rows, every_s, delay_s
        self._trim = libc_malloc_trim()
        self._last = -float("inf")
        self._scheduled = False
        self._lock = threading.Lock()
        self.trims = 0

    def after(self, rows: int) -> bool:
        """Called after a request of `rows` rows: schedules a trim when it was big and none is scheduled
        (in `delay_s`, or at the end of the interval of the last trim). True when it scheduled one."""
        if self._trim is None or rows < self.rows:
            return False
        with self._lock:
            if self._scheduled:
                return False
            self._scheduled = True
            wait = max(self.delay_s, self._last + self.every_s - time.monotonic())
        timer = threading.Timer(wait, self._run)
        timer.daemon = True
        timer.name = "raywatch-malloc-trim"
        timer.start()
        return True

    def _run(self) -> None:
        with self._lock:
            self._scheduled = False
            self._last = time.monotonic()
        self._trim(0)
        self.trims += 1
