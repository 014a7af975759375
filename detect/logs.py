"""Log lines of raywatch's long-running processes (Serve replicas, monitor actors), with their fields.

raywatch logs with fields: `log.warning("request refused", extra={"route": ..., "status": 422})`. In a Ray
worker the `raywatch` loggers had no handler of their own, so Python's last-resort handler wrote a
warning's bare message (no level, time or fields: "request refused") and dropped every info line (a
rollout started, a model version loaded). `process_logging` gives them a handler that writes

    WARNING 2026-12-07 19:20:01,123 raywatch.serve: request refused route="/v1/score" status=422 detail="..."

to the process's stderr, which Ray keeps in the worker's log file (`logs/worker-*.err`; the dashboard
shows it under the actor). Records still propagate, so a test's log capture sees them too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable

LOGGER = "raywatch"
LEVEL_ENV = "RAYWATCH_LOG_LEVEL"  # INFO unless set (DEBUG, WARNING, ...)
HANDLER_NAME = "raywatch-fields"
FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
# what every record carries; anything else on a record came from `extra=` (Ray's own start with "_")
STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class FieldsFormatter(logging.Formatter):
    """FORMAT, then each field the call passed in `extra`, as key=value (strings quoted as JSON, so a
    reason with spaces stays one field)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [
            f"{key}={json.dumps(value) if isinstance(value, str) else value}"
            for key, value in record.__dict__.items()
            if key not in STANDARD and not key.startswith("_")
        ]
        return " ".join([line, *fields])


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is written, as Python's last-resort handler does (a
    test's captured stream is closed after it; the handler outlives it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def process_logging() -> None:
    """Give the `raywatch` loggers of this process their handler (once; later calls do nothing), at
    RAYWATCH_LOG_LEVEL or INFO."""
    logger = logging.getLogger(LOGGER)
    if any(handler.get_name() == HANDLER_NAME for handler in logger.handlers):
        return
    handler = StderrHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(FieldsFormatter(FORMAT))
    logger.addHandler(handler)
    level = os.environ.get(LEVEL_ENV, "INFO").upper()
    try:
        logger.setLevel(level)
    except ValueError:  # a typo must not keep a replica from starting
        logger.setLevel(logging.INFO)
        logger.warning(f"{LEVEL_ENV}={level!r} is no log level (DEBUG, INFO, WARNING, ERROR); logging at INFO")


class LineBudget:
    """At most `per_s` lines in each second for a line that may come in floods (a refused request per
    request of an abusive client): `take()` says whether to write one now, and how many were held back
    since the last one written, for that line to say so."""

    def __init__(self, per_s: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.clock = per_s, clock
        self.window_start, self.used, self.held = float("-inf"), 0, 0

    def take(self) -> tuple[bool, int]:
        now = self.clock()
        if now - self.window_start >= 1.0:
            self.window_start, self.used = now, 0
        if self.used >= self.per_s:
            self.held += 1
            return False, 0
        self.used += 1
        held, self.held = self.held, 0
        return True, held
