"""Each model's traffic policy (A/B share, shadow), shared by every ingress replica and kept across restarts.

An admin call writes the policy to `traffic.db` in the state folder before it answers; every replica
checks the file's modification stamp (one stat call) before routing a request and rereads it when it
changed. So once `/v1/admin/traffic` has answered 200, any replica's next request follows the new policy,
and a replica that starts (after a kill, or a scale-up) starts with it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from detect.state import connect, create, file_stamp, settled
from serve.router import TrafficPolicy

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS traffic (model TEXT PRIMARY KEY, challenger_percent REAL NOT NULL,
       shadow INTEGER NOT NULL, updated REAL NOT NULL)""",
)
_ADDED_COLUMNS = {"split": "TEXT NOT NULL DEFAULT 'entity'", "step_key": "TEXT"}  # a rollout's (serve/rollout.py)


def write_policy(db, model: str, policy: TrafficPolicy, now: float | None = None) -> None:
    """Store `policy` on an open connection (inside the caller's transaction)."""
    db.execute(
        "INSERT OR REPLACE INTO traffic (model, challenger_percent, shadow, split, step_key, updated)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            model,
            float(policy.challenger_percent),
            int(policy.shadow),
            policy.split,
            policy.step_key,
            time.time() if now is None else now,
        ),
    )


class TrafficStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        create(self.path, _SCHEMA)
        with connect(self.path) as db:  # a traffic.db from before rollouts gains their columns
            have = {row[1] for row in db.execute("PRAGMA table_info(traffic)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE traffic ADD COLUMN {column} {kind}")
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._policies: dict[str, TrafficPolicy] = {}

    def get(self, model: str) -> TrafficPolicy:
        """The model's current policy (all traffic to the champion, no shadow, until one is set)."""
        stamp = file_stamp(self.path)
        if stamp != self._stamp:
            self._reload(stamp)
        return self._policies.get(model, TrafficPolicy())

    def set(self, model: str, policy: TrafficPolicy) -> None:
        """Store `policy` (committed before this returns) and use it here at once."""
        with self._lock, connect(self.path) as db:
            write_policy(db, model, policy)
        self._reload(file_stamp(self.path))

    def _reload(self, stamp: tuple[int, ...] | None) -> None:
        with connect(self.path) as db:
            rows = db.execute("SELECT model, challenger_percent, shadow, split, step_key FROM traffic").fetchall()
        self._policies = {
            model: TrafficPolicy(percent, bool(shadow), split, key) for model, percent, shadow, split, key in rows
        }
        self._stamp = settled(stamp)  # a stamp from the tick of a write it may not have seen is not kept
