"""The drift event store: drift test results and monitor state in one SQLite file (the monitors write
it, the Serve app's `/v1/drift` and `raywatch status` read it)."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detect.drift import DETECTORS, DriftResult
from detect.state import connect, create, state_dir


def _json(value: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    return json.dumps(value, default=default, allow_nan=False)


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


_EVENT_COLUMNS = (
    "id",
    "time",
    "model",
    "entity",
    "detector",
    "is_drift",
    "statistic",
    "p_value",
    "threshold",
    "drifted_features",
    "extra",
    "window_rows",
)


_EVENT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS drift_events (
           id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, model TEXT NOT NULL,
           entity TEXT NOT NULL, detector TEXT NOT NULL, is_drift INTEGER NOT NULL,
           statistic REAL, p_value REAL, threshold REAL, drifted_features TEXT NOT NULL,
           extra TEXT NOT NULL, window_rows INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS drift_events_model ON drift_events (model, entity, id)",
    "CREATE TABLE IF NOT EXISTS monitor_state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL)",
)


class DriftEventStore:
    """Drift events and monitor state in one SQLite file; every write is committed (WAL,
    synchronous=FULL) before the call returns, so nothing accepted is lost on a crash or restart."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else state_dir() / "drift.db"
        self._lock = threading.Lock()
        with self._lock:
            create(self.path, _EVENT_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = connect(self.path)
        try:
            yield db
        finally:
            db.close()

    @staticmethod
    def _row(result: DriftResult) -> tuple[Any, ...]:
        if result.detector not in DETECTORS:
            raise ValueError(f"DriftResult.detector must be one of {DETECTORS}, got {result.detector!r}")
        try:
            features = _json(list(result.drifted_features))
            extra = _json(result.extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"drift event for {result.model}/{result.entity} is not JSON serialisable: {exc}"
            ) from None
        return (
            float(result.time),
            result.model,
            result.entity,
            result.detector,
            int(bool(result.is_drift)),
            _finite_or_none(result.statistic),
            _finite_or_none(result.p_value),
            _finite_or_none(result.threshold),
            features,
            extra,
            int(result.window_rows),
        )

    def add(self, result: DriftResult) -> int:
        """Persist one event; returns its id."""
        return self.add_many([result])[0]

    def add_many(self, results: Sequence[DriftResult]) -> list[int]:
        """Persist events in one transaction (all or none); returns their ids in order."""
        rows = [self._row(r) for r in results]
        ids = []
        with self._lock, self._connect() as db:
            for row in rows:
                cur = db.execute(
                    "INSERT INTO drift_events (time, model, entity, detector, is_drift, statistic, p_value,"
                    " threshold, drifted_features, extra, window_rows) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                ids.append(int(cur.lastrowid))
            db.commit()
        return ids

    @staticmethod
    def _where(
        model: str | None, entity: str | None = None, only_drift: bool = False, since_id: int | None = None
    ) -> tuple[str, list[Any]]:
        clauses, args = [], []
        if model is not None:
            clauses.append("model = ?")
            args.append(model)
        if entity is not None:
            clauses.append("entity = ?")
            args.append(entity)
        if only_drift:
            clauses.append("is_drift = 1")
        if since_id is not None:
            clauses.append("id > ?")
            args.append(int(since_id))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def events(
        self,
        model: str | None = None,
        entity: str | None = None,
        only_drift: bool = False,
        since_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Stored events, newest first; `since_id` keeps those with a larger id."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        where, args = self._where(model, entity, only_drift, since_id)
        with self._lock, self._connect() as db:
            rows = db.execute(
                f"SELECT {', '.join(_EVENT_COLUMNS)} FROM drift_events{where} ORDER BY id DESC LIMIT ?",
                [*args, limit],
            ).fetchall()
        out = []
        for row in rows:
            event = dict(zip(_EVENT_COLUMNS, row))
            event["is_drift"] = bool(event["is_drift"])
            event["drifted_features"] = json.loads(event["drifted_features"])
            event["extra"] = json.loads(event["extra"])
            out.append(event)
        return out

    def count(self, model: str | None = None, only_drift: bool = False) -> int:
        where, args = self._where(model, only_drift=only_drift)
        with self._lock, self._connect() as db:
            return int(db.execute(f"SELECT COUNT(*) FROM drift_events{where}", args).fetchone()[0])

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under `key` (replacing any earlier one)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"state key must be a non-empty string, got {key!r}")
        try:
            text = _json(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state {key!r}: value is not JSON serialisable: {exc}") from None
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT INTO monitor_state (key, value, updated) VALUES (?, ?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                (key, text, time.time()),
            )
            db.commit()

    def get_state(self, key: str, default: Any = None) -> Any:
        with self._lock, self._connect() as db:
            row = db.execute("SELECT value FROM monitor_state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default
