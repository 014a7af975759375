"""Durable state of the serving layer: feedback labels and drift references, in SQLite.

Every write commits before the API answers 2xx, so an accepted label survives a crash or restart.
Default location: $RAYWATCH_STATE_DIR (default ./.raywatch)/serving.db.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any


def state_dir() -> Path:
    path = Path(os.environ.get("RAYWATCH_STATE_DIR", Path.cwd() / ".raywatch"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class ServingStore:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else state_dir() / "serving.db"
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("""CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY, received REAL, entity TEXT,
                          ts TEXT, label INTEGER, detector TEXT)""")
            db.execute("""CREATE TABLE IF NOT EXISTS drift_reference (id INTEGER PRIMARY KEY, created REAL, model TEXT,
                          entity TEXT, rows INTEGER, sample TEXT)""")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def add_feedback(self, entity: str, ts: Any, label: int, detector: str | None) -> int:
        with self._lock, self._connect() as db:
            cur = db.execute(
                "INSERT INTO feedback (received, entity, ts, label, detector) VALUES (?, ?, ?, ?, ?)",
                (time.time(), entity, str(ts), int(label), detector),
            )
            return int(cur.lastrowid)

    def feedback(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, received, entity, ts, label, detector FROM feedback ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [dict(zip(("id", "received", "entity", "timestamp", "label", "detector"), r)) for r in rows]

    def set_reference(self, model: str, entity: str, sample: list[list[float]]) -> int:
        with self._lock, self._connect() as db:
            cur = db.execute(
                "INSERT INTO drift_reference (created, model, entity, rows, sample) VALUES (?, ?, ?, ?, ?)",
                (time.time(), model, entity, len(sample), json.dumps(sample)),
            )
            return int(cur.lastrowid)

    def reference(self, model: str, entity: str) -> list[list[float]] | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT sample FROM drift_reference WHERE model=? AND entity=? ORDER BY id DESC LIMIT 1",
                (model, entity),
            ).fetchone()
        return json.loads(row[0]) if row else None
