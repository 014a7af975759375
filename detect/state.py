"""Durable state of the serving and monitoring loop, in one SQLite file: feedback labels, drift
references, the served observations the drift monitors saw, and retraining decisions.

Every write commits (synchronous=FULL) before the caller answers, so an accepted label, observation
or decision survives a crash or restart. Location: $RAYWATCH_STATE_DIR (default ./.raywatch)/serving.db.
Serving, the monitors (Ray actors) and the retraining jobs (other processes) share the file; WAL
mode lets them read while one writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

STATE_DIR_ENV = "RAYWATCH_STATE_DIR"


def state_dir() -> Path:
    path = Path(os.environ.get(STATE_DIR_ENV, Path.cwd() / ".raywatch"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def connect(path: Path) -> sqlite3.Connection:
    """A connection to one of the state files: each write is on disk when its transaction commits."""
    db = sqlite3.connect(path, timeout=30)
    db.execute("PRAGMA synchronous=FULL")
    return db


# file times tick coarsely (the kernel's clock tick, a few ms): a write in the same tick as a stamp leaves the
# stamp unchanged, so a stamp younger than this is not trusted to say "nothing changed since"
STAMP_SETTLE_NS = 50_000_000


def settled(stamp: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """`stamp` (taken before reading what it stamps) when it is old enough that any later write changes it;
    None otherwise, so that the caller reads again next time. A cache that kept a stamp from the same
    clock tick as a write it had not seen kept serving the old content (a canary's traffic share stayed at
    10% after its rollback, once in a CI run)."""
    if stamp is None or time.time_ns() - max(stamp) <= STAMP_SETTLE_NS:
        return None
    return stamp


def file_stamp(path: str | Path) -> tuple[int, ...] | None:
    """Modification stamp of an SQLite file and its write-ahead log (None when missing): a reader that
    caches what the file holds checks this, a stat call, instead of querying it each time."""
    path = str(path)
    stamp = []
    for p in (path, path + "-wal"):  # one stat each (no exists() first: the ingress calls this per request)
        try:
            stamp.append(os.stat(p).st_mtime_ns)
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return tuple(stamp) or None


def create(path: Path, schema: Iterable[str]) -> None:
    """Create a state file (WAL journal, so readers never wait for the writer) and its tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = connect(path)
    try:
        with db:  # one transaction, committed
            db.execute("PRAGMA journal_mode=WAL")
            for statement in schema:
                db.execute(statement)
    finally:
        db.close()


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY, received REAL, entity TEXT,
       ts TEXT, label INTEGER, detector TEXT, trusted INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS feedback_entity_ts ON feedback (entity, ts)",
    """CREATE TABLE IF NOT EXISTS drift_reference (id INTEGER PRIMARY KEY, created REAL, model TEXT,
       entity TEXT, rows INTEGER, sample TEXT)""",
    """CREATE TABLE IF NOT EXISTS observations (id INTEGER PRIMARY KEY, received REAL, model TEXT, entity TEXT,
       ts TEXT, vals BLOB, score REAL, is_anomaly INTEGER, path TEXT)""",
    "CREATE INDEX IF NOT EXISTS observations_model_entity ON observations (model, entity, id)",
    """CREATE TABLE IF NOT EXISTS retrain_decisions (id INTEGER PRIMARY KEY, created REAL, model TEXT,
       job_id TEXT, promoted INTEGER, champion TEXT, challenger TEXT, reason TEXT, details TEXT)""",
)


def _values(blobs: list[bytes | str]) -> np.ndarray:
    """Stored observation values -> (n, d) float64: float64 bytes, or JSON lists from older stores."""
    if not blobs:
        return np.empty((0, 0), dtype=np.float64)
    if all(isinstance(b, bytes) for b in blobs):
        return np.frombuffer(b"".join(blobs), dtype=np.float64).reshape(len(blobs), -1).copy()
    return np.array([np.frombuffer(b, dtype=np.float64) if isinstance(b, bytes) else json.loads(b) for b in blobs])


class ServingStore:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else state_dir() / "serving.db"
        self._lock = threading.Lock()
        create(self.path, _SCHEMA)
        self._add_trusted_column()

    def _add_trusted_column(self) -> None:
        """Stores written before feedback carried its trust get the column; their labels stay, as untrusted
        (nobody authenticated them)."""
        with self._lock, self._connect() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(feedback)")}
            if "trusted" not in columns:
                db.execute("ALTER TABLE feedback ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0")

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    # -- feedback labels -----------------------------------------------------------------------------------
    def add_feedback(self, entity: str, ts: Any, label: int, detector: str | None, trusted: bool = False) -> int:
        """Store a label; `trusted` when its sender authenticated (only trusted labels steer retraining)."""
        with self._lock, self._connect() as db:
            cur = db.execute(
                "INSERT INTO feedback (received, entity, ts, label, detector, trusted) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), entity, str(ts), int(label), detector, int(trusted)),
            )
            return int(cur.lastrowid)

    def feedback(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, received, entity, ts, label, detector, trusted FROM feedback ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("id", "received", "entity", "timestamp", "label", "detector", "trusted")
        return [dict(zip(keys, r[:-1] + (bool(r[-1]),))) for r in rows]

    def labels(self, entity: str, timestamps: Iterable[str | None], trusted_only: bool = False) -> np.ndarray:
        """The latest feedback label of each of the entity's timestamps, in order: 1, 0, or -1 (none);
        with `trusted_only`, labels from senders who did not authenticate do not count."""
        timestamps = list(timestamps)
        wanted = {str(t) for t in timestamps if t is not None}
        only = " AND trusted=1" if trusted_only else ""
        with self._connect() as db:
            rows = db.execute(f"SELECT ts, label FROM feedback WHERE entity=?{only} ORDER BY id", (entity,)).fetchall()
        found = {ts: int(label) for ts, label in rows if ts in wanted}
        return np.array([found.get(str(t), -1) if t is not None else -1 for t in timestamps], dtype=np.int64)

    # -- drift references ----------------------------------------------------------------------------------
    def set_reference(self, model: str, entity: str, sample: list[list[float]]) -> int:
        with self._lock, self._connect() as db:
            cur = db.execute(
                "INSERT INTO drift_reference (created, model, entity, rows, sample) VALUES (?, ?, ?, ?, ?)",
                (time.time(), model, entity, len(sample), json.dumps(sample)),
            )
            return int(cur.lastrowid)

    def reference(self, model: str, entity: str, since: float = 0.0) -> list[list[float]] | None:
        """The newest reference set through the admin API for (model, entity), if set after `since`."""
        with self._connect() as db:
            row = db.execute(
                "SELECT sample FROM drift_reference WHERE model=? AND entity=? AND created>=? ORDER BY id DESC LIMIT 1",
                (model, entity, since),
            ).fetchone()
        return json.loads(row[0]) if row else None

    # -- served observations (what the drift monitors saw; what retraining learns from) -------------------------
    def add_observations(self, model: str, items: list[dict[str, Any]]) -> int:
        """items: {entity, timestamp, values, score?, is_anomaly?, path?}; returns the last row id."""
        return self.add_observation_columns(
            model,
            [it["entity"] for it in items],
            [it.get("timestamp") for it in items],
            [np.asarray(it["values"], dtype=np.float64).tobytes() for it in items],  # float64 bytes: no JSON per row
            [it.get("score") for it in items],
            [it.get("is_anomaly") for it in items],
            [it.get("path") for it in items],
        )

    def add_observation_columns(
        self,
        model: str,
        entities: list[str],
        timestamps: list[Any],
        values: list[bytes],
        scores: list[float | None],
        anomalies: list[bool | None],
        paths: list[str | None],
    ) -> int:
        """`add_observations` of rows given as columns (what a drift monitor receives from the ingress), each
        row's values as float64 bytes; returns the last row id."""
        now = time.time()
        rows = [
            (
                now,
                model,
                entity,
                None if ts is None else str(ts),
                vals,
                score,
                None if flag is None else int(flag),
                path,
            )
            for entity, ts, vals, score, flag, path in zip(entities, timestamps, values, scores, anomalies, paths)
        ]
        with self._lock, self._connect() as db:
            db.executemany(
                "INSERT INTO observations (received, model, entity, ts, vals, score, is_anomaly, path)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return int(db.execute("SELECT MAX(id) FROM observations").fetchone()[0] or 0)

    def observations(self, model: str, entity: str, after_id: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The entity's observations after `after_id` in arrival order (the newest `limit` when given):
        {ids, timestamps, values (n x d), scores, is_anomaly, paths}."""
        query = "SELECT id, ts, vals, score, is_anomaly, path FROM observations WHERE model=? AND entity=? AND id>?"
        if limit is not None:
            query = f"SELECT * FROM ({query} ORDER BY id DESC LIMIT {int(limit)})"
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", (model, entity, after_id)).fetchall()
        return {
            "ids": [r[0] for r in rows],
            "timestamps": [r[1] for r in rows],
            "values": _values([r[2] for r in rows]),
            "scores": np.array([np.nan if r[3] is None else r[3] for r in rows], dtype=np.float64),
            "is_anomaly": [None if r[4] is None else bool(r[4]) for r in rows],
            "paths": [r[5] for r in rows],
        }

    def count_observations(self, model: str, entity: str, after_id: int = 0) -> int:
        with self._connect() as db:
            row = db.execute(
                "SELECT COUNT(*) FROM observations WHERE model=? AND entity=? AND id>?", (model, entity, after_id)
            ).fetchone()
        return int(row[0])

    def observed_entities(self, model: str) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT entity, COUNT(*) FROM observations WHERE model=? GROUP BY entity", (model,)
            ).fetchall()
        return {e: int(n) for e, n in rows}

    def prune_observations(self, model: str, keep: dict[str, int]) -> None:
        """Keep each entity's newest `keep[entity]` observations, in one transaction (one commit)."""
        with self._lock, self._connect() as db:
            db.executemany(
                "DELETE FROM observations WHERE model=? AND entity=? AND id <= "
                "(SELECT id FROM observations WHERE model=? AND entity=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                [(model, entity, model, entity, rows) for entity, rows in keep.items()],
            )

    # -- retraining decisions --------------------------------------------------------------------------------
    def add_decision(
        self,
        model: str,
        job_id: str | None,
        promoted: bool,
        champion: str | None,
        challenger: str | None,
        reason: str,
        details: dict[str, Any],
    ) -> int:
        with self._lock, self._connect() as db:
            cur = db.execute(
                "INSERT INTO retrain_decisions (created, model, job_id, promoted, champion, challenger, reason, details)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), model, job_id, int(promoted), champion, challenger, reason, json.dumps(details)),
            )
            return int(cur.lastrowid)

    def decisions(self, model: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        query = (
            "SELECT id, created, model, job_id, promoted, champion, challenger, reason, details FROM retrain_decisions"
        )
        args: tuple = ()
        if model:
            query, args = query + " WHERE model=?", (model,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        keys = ("id", "time", "model", "job_id", "promoted", "champion", "challenger", "reason", "details")
        out = [dict(zip(keys, r)) for r in rows]
        for d in out:
            d["promoted"], d["details"] = bool(d["promoted"]), json.loads(d["details"])
        return out
