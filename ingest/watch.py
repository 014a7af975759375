"""Live scoring from Prometheus: `raywatch watch --source prometheus.yaml` (or a Ray actor started by
`raywatch up --source ...`).

Every step the watcher reads the new grid points of every metric of the source from Prometheus
(`/api/v1/query_range`, the same code and grid as the training backfill), scores them through the
Serve app (a live poll's snapshot, one row per entity, in one `POST /v1/score/fleet`; rows caught up
after a pause through `POST /v1/score`; both queue them for the drift monitors), exports the scores for
Prometheus to scrape, and feeds the alert notifier (`ingest.alerts`).

Exactly-once per grid point, across restarts: each entity's cursor (the newest scored timestamp) is
kept in SQLite (`<state dir>/watch.db`) and committed in one transaction with the log of what was
scored, right after the Serve app answered. A restarted watcher resumes at cursor + step, so it
neither skips nor re-scores a sample (the one exception: a crash between the Serve app's answer and
that commit, a few milliseconds, re-scores that one request's rows). Grid points are scored only
once they are `delay` old, so a late scrape is in; a point where an entity has no value even after
forward-filling `fill_rows` steps is recorded as a gap (`gaps` table, `raywatch_watch_missing_rows_total`),
never silently dropped. After a long stop, at most `catchup` of history is scored; the older part is
a recorded gap. A new entity starts `warmup_rows` steps back: those rows give the Serve app the window
history its scores need (its first windows are padded) and raise no alert.

Exported (default http://127.0.0.1:9110/metrics), labels `entity` (the source's entity label value,
e.g. node_exporter's `instance`) and `detector`:

    raywatch_anomaly_score, raywatch_anomaly_threshold, raywatch_anomaly (0/1),
    raywatch_incident_probability, raywatch_top_metric{metric} (the top root-cause metric; value = its
    share of the score), raywatch_watch_last_timestamp{entity}, raywatch_watch_lag_seconds{entity},
    raywatch_watch_scored_rows_total, raywatch_watch_anomalous_rows_total, raywatch_watch_fallback_rows_total,
    raywatch_watch_missing_rows_total, raywatch_watch_errors_total{stage},
    raywatch_watch_score_latency_seconds (histogram), raywatch_watch_alerts_firing{alertname}
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detect.actors import named_actor
from detect.kinds import DETECTOR_KINDS
from detect.state import connect, create, state_dir
from ingest.alerts import AlertSettings, Notifier, alert_name
from ingest.prometheus import (
    PrometheusClient,
    PrometheusSource,
    SourceError,
    align,
    fetch_frame,
    load_source,
    parse_duration,
)

log = logging.getLogger("raywatch.watch")
# the API's snapshot route and its row limit (serve/schemas.py FLEET_PATH, MAX_FLEET_ROWS; a test keeps them equal)
FLEET_ROUTE = "/v1/score/fleet"
FLEET_ROWS = 20_000

NAMESPACE = "raywatch"
DETECTORS = DETECTOR_KINDS


def actor_name(source_name: str) -> str:
    return f"raywatch-watch-{source_name}"


@dataclass
class WatchSettings:
    """The `watch:` section of a source config (the `raywatch watch` flags override it)."""

    serve_url: str = "http://127.0.0.1:8000"
    exporter_port: int | None = 9110  # None or 0: no exporter
    exporter_host: str = "127.0.0.1"
    detectors: list[str] | None = None  # default: every detector with a champion that knows the entity
    delay_s: float | None = None  # default: max(2 s, the step up to 10 s)
    backfill_s: float = 0.0  # a new entity starts this far back (0: from now, less the warm-up)
    warmup_rows: int = 16  # a new entity starts this many steps back; those rows give the Serve app its
    # window history (scored, exported, logged) but raise no alert: the first windows are padded
    catchup_s: float = 3600.0  # after a long stop, score at most this much history
    fill_rows: int = 5  # forward-fill a missing value from at most this many steps back
    max_rows_per_request: int = 1000
    rows_per_poll: int = 5000  # grid points per entity read in one poll while catching up
    refresh_models_s: float = 30.0
    keep_scored: int = 200_000  # rows of the scored log kept per source
    request_timeout_s: float = 30.0
    api_key: str | None = None  # sent as a Bearer token if the Serve app sits behind a gateway

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, origin: str = "<source>") -> WatchSettings:
        data = dict(data or {})
        names = {
            "serve_url": "serve_url",
            "exporter_port": "exporter_port",
            "exporter_host": "exporter_host",
            "detectors": "detectors",
            "delay": "delay_s",
            "backfill": "backfill_s",
            "catchup": "catchup_s",
            "fill_rows": "fill_rows",
            "warmup_rows": "warmup_rows",
            "max_rows_per_request": "max_rows_per_request",
            "rows_per_poll": "rows_per_poll",
            "refresh_models": "refresh_models_s",
            "keep_scored": "keep_scored",
            "request_timeout": "request_timeout_s",
            "api_key": "api_key",
        }
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SourceError(f"{origin}: watch.{unknown[0]}: unknown field; known fields are {sorted(names)}")
        out = cls()

        def fail(name: str, message: str) -> SourceError:
            return SourceError(f"{origin}: watch.{name}: {message}")

        for key, attr in names.items():
            if key not in data or data[key] is None:
                continue
            value = data[key]
            if attr.endswith("_s"):
                if key in ("backfill",) and value in (0, "0", "0s"):
                    value = 0.0
                else:
                    value = parse_duration(value, f"{origin}: watch.{key}")
            elif key == "serve_url":
                if not isinstance(value, str) or not value.startswith(("http://", "https://")):
                    raise fail(key, f"expected the Serve app's URL like http://127.0.0.1:8000, got {value!r}")
                value = value.rstrip("/")
            elif key == "exporter_port":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                    raise fail(key, f"expected a port number (0 disables the exporter), got {value!r}")
                value = value or None
            elif key == "detectors":
                if isinstance(value, str):
                    value = [v.strip() for v in value.split(",") if v.strip()]
                if not isinstance(value, list) or not value or set(value) - set(DETECTORS):
                    raise fail(key, f"expected a list drawn from {list(DETECTORS)}, got {value!r}")
            elif key in ("fill_rows", "warmup_rows", "max_rows_per_request", "rows_per_poll", "keep_scored"):
                low = 0 if key in ("fill_rows", "warmup_rows") else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise fail(key, f"expected an integer >= {low}, got {value!r}")
                if key == "max_rows_per_request" and value > 5000:
                    raise fail(key, "the Serve app takes at most 5000 rows per request")
            elif not isinstance(value, str):
                raise fail(key, f"expected a string, got {value!r}")
            setattr(out, attr, value)
        return out


# -- durable state -------------------------------------------------------------------------------------------
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cursors (source TEXT, entity TEXT, ts REAL, updated REAL, PRIMARY KEY (source, entity))",
    """CREATE TABLE IF NOT EXISTS scored (id INTEGER PRIMARY KEY, source TEXT, entity TEXT, ts REAL, detector TEXT,
       score REAL, threshold REAL, is_anomaly INTEGER, probability REAL, top_metric TEXT, path TEXT, scored_at REAL)""",
    "CREATE INDEX IF NOT EXISTS scored_source_entity_ts ON scored (source, entity, ts)",
    """CREATE TABLE IF NOT EXISTS gaps (id INTEGER PRIMARY KEY, source TEXT, entity TEXT, first_ts REAL,
       last_ts REAL, rows INTEGER, reason TEXT, recorded REAL)""",
    "CREATE TABLE IF NOT EXISTS alerts (source TEXT PRIMARY KEY, states TEXT, updated REAL)",
)


class WatchStore:
    """The watcher's SQLite file: cursors, the scored log, recorded gaps, alert states."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else state_dir() / "watch.db"
        create(self.path, _SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def cursors(self, source: str) -> dict[str, float]:
        with self._connect() as db:
            rows = db.execute("SELECT entity, ts FROM cursors WHERE source=?", (source,)).fetchall()
        return {e: float(ts) for e, ts in rows}

    def set_cursors(self, source: str, cursors: dict[str, float]) -> None:
        with self._connect() as db:
            db.executemany(
                "INSERT INTO cursors (source, entity, ts, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (source, entity) DO UPDATE SET ts=MAX(ts, excluded.ts), updated=excluded.updated",
                [(source, e, ts, time.time()) for e, ts in cursors.items()],
            )

    def commit_scored(self, source: str, rows: list[tuple], cursors: dict[str, float]) -> None:
        """The scored rows and the cursors they advance, in one transaction."""
        now = time.time()
        with self._connect() as db:
            db.executemany(
                "INSERT INTO scored (source, entity, ts, detector, score, threshold, is_anomaly, probability,"
                " top_metric, path, scored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(source, *r, now) for r in rows],
            )
            db.executemany(
                "INSERT INTO cursors (source, entity, ts, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (source, entity) DO UPDATE SET ts=MAX(ts, excluded.ts), updated=excluded.updated",
                [(source, e, ts, now) for e, ts in cursors.items()],
            )

    def add_gap(
        self, source: str, entity: str, first_ts: float, last_ts: float, rows: int, reason: str, step: float = 0.0
    ) -> None:
        """Record missing grid points; one that continues the entity's previous gap extends it."""
        with self._connect() as db:
            last = db.execute(
                "SELECT id, last_ts FROM gaps WHERE source=? AND entity=? AND reason=? ORDER BY id DESC LIMIT 1",
                (source, entity, reason),
            ).fetchone()
            if last is not None and step and abs(first_ts - step - last[1]) < step / 1000:
                db.execute(
                    "UPDATE gaps SET last_ts=?, rows=rows+?, recorded=? WHERE id=?",
                    (last_ts, rows, time.time(), last[0]),
                )
                return
            db.execute(
                "INSERT INTO gaps (source, entity, first_ts, last_ts, rows, reason, recorded) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (source, entity, first_ts, last_ts, rows, reason, time.time()),
            )

    def gaps(self, source: str) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT entity, first_ts, last_ts, rows, reason FROM gaps WHERE source=? ORDER BY id", (source,)
            ).fetchall()
        return [dict(zip(("entity", "first_ts", "last_ts", "rows", "reason"), r)) for r in rows]

    def scored(self, source: str, entity: str | None = None, detector: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT entity, ts, detector, score, threshold, is_anomaly, probability, top_metric, path, scored_at"
        query += " FROM scored WHERE source=?"
        args: list[Any] = [source]
        for column, value in (("entity", entity), ("detector", detector)):
            if value is not None:
                query += f" AND {column}=?"
                args.append(value)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        keys = ("entity", "ts", "detector", "score", "threshold", "is_anomaly", "probability", "top_metric", "path")
        return [dict(zip((*keys, "scored_at"), r)) | {"is_anomaly": bool(r[5])} for r in rows]

    def prune(self, source: str, keep: int) -> None:
        with self._connect() as db:
            db.execute(
                "DELETE FROM scored WHERE source=? AND id <= "
                "(SELECT id FROM scored WHERE source=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (source, source, keep),
            )

    def load_alerts_of(self, source: str) -> dict[str, dict[str, Any]]:
        with self._connect() as db:
            row = db.execute("SELECT states FROM alerts WHERE source=?", (source,)).fetchone()
        return json.loads(row[0]) if row else {}

    def save_alerts_of(self, source: str, states: dict[str, dict[str, Any]]) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO alerts (source, states, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (source) DO UPDATE SET states=excluded.states, updated=excluded.updated",
                (source, json.dumps(states), time.time()),
            )


@dataclass
class _AlertStore:
    store: WatchStore
    source: str

    def load_alerts(self) -> dict[str, dict[str, Any]]:
        return self.store.load_alerts_of(self.source)

    def save_alerts(self, states: dict[str, dict[str, Any]]) -> None:
        self.store.save_alerts_of(self.source, states)


# -- exported metrics ------------------------------------------------------------------------------------------
def alert_open(answer: dict[str, Any]) -> bool:
    """Whether a detector's served alert on the entity is open after this row: alerts, not rows (the Serve
    app groups rows into episodes, `serve.history.AlertBook`). An answer without one, from a Serve app
    older than the alert book, falls back to the row's own flag."""
    if "alert" not in answer:
        return bool(answer["is_anomaly"])
    alert = answer["alert"]
    return alert is not None and alert["state"] != "closed"


class WatchMetrics:
    """The watcher's Prometheus metrics, in a registry of their own (served by `serve(port)`)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        ed = ("entity", "detector")
        self.score = Gauge("raywatch_anomaly_score", "newest anomaly score", ed, registry=r)
        self.threshold = Gauge("raywatch_anomaly_threshold", "the detector's operational threshold", ed, registry=r)
        self.anomaly = Gauge("raywatch_anomaly", "1 while the newest row is flagged", ed, registry=r)
        self.alert_open = Gauge(
            "raywatch_alert_open", "1 while the detector's served alert on the entity is open", ed, registry=r
        )
        self.probability = Gauge("raywatch_incident_probability", "newest incident probability", ed, registry=r)
        self.top = Gauge(
            "raywatch_top_metric",
            "the newest row's top root-cause metric (value: its contribution to the score)",
            (*ed, "metric"),
            registry=r,
        )
        self.last_ts = Gauge("raywatch_watch_last_timestamp", "newest scored sample (unix s)", ("entity",), registry=r)
        self.lag = Gauge("raywatch_watch_lag_seconds", "now minus the newest scored sample", ("entity",), registry=r)
        self.rows = Counter("raywatch_watch_scored_rows_total", "rows scored", ed, registry=r)
        self.anomalous = Counter("raywatch_watch_anomalous_rows_total", "rows flagged", ed, registry=r)
        self.fallback = Counter("raywatch_watch_fallback_rows_total", "rows served by the fallback", ed, registry=r)
        self.missing = Counter(
            "raywatch_watch_missing_rows_total", "grid points with no data (recorded gaps)", ("entity",), registry=r
        )
        self.errors = Counter("raywatch_watch_errors_total", "failed polls, by stage", ("stage",), registry=r)
        self.latency = Histogram(
            "raywatch_watch_score_latency_seconds",
            "POST /v1/score round trip",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.firing = Gauge("raywatch_watch_alerts_firing", "alerts firing", ("alertname",), registry=r)
        self._top_labels: dict[tuple[str, str], str] = {}
        self._server = None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_top(self, entity: str, detector: str, metric: str | None, value: float) -> None:
        old = self._top_labels.get((entity, detector))
        if old is not None and old != metric:
            self.top.remove(entity, detector, old)
        if metric is None:
            self._top_labels.pop((entity, detector), None)
            return
        self.top.labels(entity, detector, metric).set(value)
        self._top_labels[(entity, detector)] = metric


# -- the watcher -------------------------------------------------------------------------------------------------
class ServeError(RuntimeError):
    pass


class Watcher:
    """Poll, score, export, alert. `run()` loops at the step; `poll_once()` is one cycle."""

    def __init__(
        self,
        source: PrometheusSource | str | Path | dict[str, Any],
        settings: dict[str, Any] | None = None,
        alerts: dict[str, Any] | None = None,
        store_path: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        import httpx

        self.source = source if isinstance(source, PrometheusSource) else load_source(source)
        self.settings = WatchSettings.from_dict({**self.source.watch, **(settings or {})}, self.source.origin)
        self.alert_settings = AlertSettings.from_dict({**self.source.alerts, **(alerts or {})}, self.source.origin)
        step = self.source.step
        self.delay = self.settings.delay_s if self.settings.delay_s is not None else max(2.0, min(step, 10.0))
        self.clock = clock
        self.on_event = on_event or (lambda message: log.info(message))
        self.store = WatchStore(store_path)
        self.notifier = Notifier(
            self.alert_settings,
            store=_AlertStore(self.store, self.source.name),
            clock=clock,
            on_error=self._delivery_failed,
        )
        self.client = PrometheusClient.for_source(self.source)
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        self.http = httpx.Client(
            base_url=self.settings.serve_url, timeout=self.settings.request_timeout_s, headers=headers
        )
        self.metrics = WatchMetrics()
        self.labels: dict[str, str] = {}  # entity id -> the source's label value
        self.served: dict[str, tuple[str, ...]] = {}  # entity id -> detectors with a champion for it
        self._models_at = -1e18
        self._scored_until: dict[str, float] = {}  # entity id -> newest timestamp scored by this process
        self._warm_until: dict[str, float] = {}  # entity id -> rows up to here raise no alert (warm-up)
        self._retry_after = 0.0  # seconds the Serve app asked us to wait (429 Retry-After)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0
        self.scored_rows = 0
        self.last_error: str | None = None
        self.last_poll: dict[str, Any] = {}
        self._prune_at = 0.0
        if self.settings.exporter_port:
            self.metrics.serve(self.settings.exporter_port, self.settings.exporter_host)

    # -- helpers -------------------------------------------------------------------------------------------
    def _delivery_failed(self, target: str, exc: Exception) -> None:
        self.metrics.errors.labels("notify").inc()
        log.warning("alert delivery to %s failed: %s", target, exc)

    def label_of(self, entity: str) -> str:
        return self.labels.get(entity) or entity.split("/", 1)[-1]

    def refresh_models(self, force: bool = False) -> dict[str, tuple[str, ...]]:
        """Which of this source's entities the Serve app scores, and with which detectors (the champions)."""
        now = time.monotonic()
        if not force and now - self._models_at < self.settings.refresh_models_s and self.served:
            return self.served
        response = self.http.get("/v1/models")
        if response.status_code != 200:
            raise ServeError(f"GET {self.settings.serve_url}/v1/models: HTTP {response.status_code}")
        wanted = self.settings.detectors or list(DETECTORS)
        served: dict[str, list[str]] = {}
        for name, model in response.json()["models"].items():
            champion = model.get("slots", {}).get("champion")
            if name not in wanted or not champion:
                continue
            for entity in champion.get("entities", []):
                if self.source.owns(entity):
                    served.setdefault(entity, []).append(name)
        if self.source.entities:
            keep = {self.source.entity_id(e) for e in self.source.entities}
            served = {e: d for e, d in served.items() if e in keep}
        if not served and not self.served:
            self.on_event(
                f"no served model knows an entity of source {self.source.name!r} yet (detectors {wanted}); "
                f"train one: raywatch train --model autoencoder --source {self.source.origin}"
            )
        self.served = {e: tuple(d) for e, d in sorted(served.items())}
        self._models_at = now
        return self.served

    # -- one cycle -----------------------------------------------------------------------------------------
    def poll_once(self) -> dict[str, Any]:
        """Score every grid point between each entity's cursor and now - delay (bounded by rows_per_poll).
        Returns {"scored", "anomalous", "behind", "end", ...}."""
        step = self.source.step
        end = align(self.clock() - self.delay, step)
        served = self.refresh_models()
        out: dict[str, Any] = {"scored": 0, "anomalous": 0, "behind": False, "end": end, "entities": len(served)}
        if not served:
            return out
        cursors = self.store.cursors(self.source.name)
        back = max(align(self.settings.backfill_s, step), self.settings.warmup_rows * step)
        new = {e: end - step - back for e in served if e not in cursors}
        for entity, cursor in new.items():
            self._warm_until[entity] = cursor + self.settings.warmup_rows * step
        if new:
            self.store.set_cursors(self.source.name, new)  # a new entity starts here, even if we stop now
            cursors.update(new)
            self.on_event(f"watching {len(new)} new entit{'y' if len(new) == 1 else 'ies'}: {sorted(new)[:5]}")
        oldest = end - align(self.settings.catchup_s, step)
        for entity in served:
            if cursors[entity] < oldest - step:
                rows = int(round((oldest - step - cursors[entity]) / step))
                self.store.add_gap(self.source.name, entity, cursors[entity] + step, oldest - step, rows, "catchup")
                self.metrics.missing.labels(self.label_of(entity)).inc(rows)
                cursors[entity] = oldest - step
                self.store.set_cursors(self.source.name, {entity: oldest - step})
        lo = min(cursors[e] for e in served) + step
        if lo > end:
            return out
        hi = min(end, lo + (self.settings.rows_per_poll - 1) * step)
        out["behind"] = hi < end
        context = self.settings.fill_rows * step
        try:
            frame = fetch_frame(self.source, lo - context, hi, client=self.client)
        except Exception:
            self.metrics.errors.labels("query").inc()
            raise
        self.labels.update(frame.attrs.get("labels", {}))
        batches = self._rows_to_score(frame, served, cursors, lo - context, hi, end)
        for detectors, rows in batches:
            # one row per entity (a live poll): the whole snapshot in one fleet request; else (catching up)
            # each entity's rows in time order through /v1/score
            snapshot = len({row["entity"] for row in rows}) == len(rows)
            route, size = (FLEET_ROUTE, FLEET_ROWS) if snapshot else ("/v1/score", self.settings.max_rows_per_request)
            for i in range(0, len(rows), size):
                chunk = rows[i : i + size]
                scored, anomalous = self._score(detectors, chunk, route)
                out["scored"] += scored
                out["anomalous"] += anomalous
        self.notifier.flush()
        for name in {alert_name(d) for d in DETECTORS}:
            firing = [s for s in self.notifier.firing() if alert_name(s["detector"]) == name]
            self.metrics.firing.labels(name).set(len(firing))
        now = self.clock()
        for entity in served:
            ts = self._scored_until.get(entity)
            if ts is not None:
                self.metrics.lag.labels(self.label_of(entity)).set(now - ts)
        if time.monotonic() - self._prune_at > 600:
            self._prune_at = time.monotonic()
            self.store.prune(self.source.name, self.settings.keep_scored)
        self.polls += 1
        self.scored_rows += out["scored"]
        self.last_poll = out
        return out

    def _rows_to_score(
        self,
        frame: Any,
        served: dict[str, tuple[str, ...]],
        cursors: dict[str, float],
        lo: float,
        hi: float,
        end: float,
    ) -> list[tuple[tuple[str, ...], list[dict[str, Any]]]]:
        """Per detector set, the rows to score in time order; records the gaps it finds."""
        step_ms = int(round(self.source.step * 1000))
        metrics = self.source.metric_names
        grid = np.arange(int(round(lo * 1000)), int(round(hi * 1000)) + 1, step_ms)
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        by_entity = {e: rows for e, rows in frame.groupby("entity", sort=False)} if len(frame) else {}
        settled = end - max(60.0, 10 * self.source.step)  # older missing points will not arrive any more
        for entity, detectors in served.items():
            cursor_ms = int(round(cursors[entity] * 1000))
            rows = by_entity.get(entity)
            if rows is None:
                values = np.full((len(grid), len(metrics)), np.nan)
            else:
                ts = np.round(rows["timestamp"].to_numpy() * 1000).astype(np.int64)
                index = {t: i for i, t in enumerate(ts)}
                block = rows[metrics].to_numpy(dtype=np.float64)
                values = np.full((len(grid), len(metrics)), np.nan)
                for g, t in enumerate(grid):
                    i = index.get(int(t))
                    if i is not None:
                        values[g] = block[i]
            values = _ffill(values, self.settings.fill_rows)
            after = grid > cursor_ms
            complete = ~np.isnan(values).any(axis=1)
            todo = np.flatnonzero(after & complete)
            last_complete = grid[todo[-1]] if len(todo) else None
            # missing points before the newest complete one, or old enough to be settled, are gaps
            missing = np.flatnonzero(after & ~complete)
            gap_points = [
                int(grid[g])
                for g in missing
                if (last_complete is not None and grid[g] < last_complete) or grid[g] / 1000 <= settled
            ]
            if gap_points:
                self.store.add_gap(
                    self.source.name,
                    entity,
                    gap_points[0] / 1000,
                    gap_points[-1] / 1000,
                    len(gap_points),
                    "no data",
                    self.source.step,
                )
                self.metrics.missing.labels(self.label_of(entity)).inc(len(gap_points))
                if last_complete is None or gap_points[-1] > last_complete:
                    self.store.set_cursors(self.source.name, {entity: gap_points[-1] / 1000})
            for g in todo:
                groups.setdefault(detectors, []).append(
                    {
                        "entity": entity,
                        "timestamp": float(grid[g]) / 1000,
                        "metrics": dict(zip(metrics, values[g].tolist())),
                    }
                )
        return list(groups.items())

    def _score(self, detectors: tuple[str, ...], rows: list[dict[str, Any]], route: str) -> tuple[int, int]:
        """POST one request; on success commit the scored log and the cursors, export, feed the notifier.
        Returns (rows scored, flags). A snapshot's rejected rows are counted and logged; their entities'
        cursors stay, so they are asked for again once the served models change."""
        started = time.perf_counter()
        try:
            response = self.http.post(route, json={"rows": rows, "detectors": list(detectors)})
        except Exception as exc:
            self.metrics.errors.labels("score").inc()
            raise ServeError(f"POST {self.settings.serve_url}{route}: {type(exc).__name__}: {exc}") from exc
        self.metrics.latency.observe(time.perf_counter() - started)
        if response.status_code != 200:
            self.metrics.errors.labels("score").inc()
            if response.status_code == 429:  # the app's rate limit: wait as long as it says
                try:
                    self._retry_after = float(response.headers.get("retry-after", 1))
                except ValueError:
                    self._retry_after = 1.0
            if response.status_code in (422, 503):
                self._models_at = -1e18  # the served models changed: look again next poll
            raise ServeError(
                f"POST {self.settings.serve_url}{route}: HTTP {response.status_code}: {response.text[:300]}"
            )
        answer = response.json()
        results, rejected = answer["results"], answer.get("rejected", [])
        if rejected:
            self.metrics.errors.labels("rejected_rows").inc(len(rejected))
            self._models_at = -1e18  # the served models may have changed: look again next poll
            first = rejected[0]
            log.warning(f"{len(rejected)} rows refused by the app, first {first['field']}: {first['message']}")
        log_rows, cursors = [], {}
        for row in results:
            for name, d in row["detectors"].items():
                top = d["top_metrics"][0]["metric"] if d.get("top_metrics") else None
                log_rows.append(
                    (
                        row["entity"],
                        float(row["timestamp"]),
                        name,
                        d["anomaly_score"],
                        d["threshold"],
                        int(d["is_anomaly"]),
                        d.get("incident_probability"),
                        top,
                        d["path"],
                    )
                )
            cursors[row["entity"]] = float(row["timestamp"])
        self.store.commit_scored(self.source.name, log_rows, cursors)
        self._scored_until.update(cursors)
        anomalous = 0
        for row in results:
            label = self.label_of(row["entity"])
            for name, d in row["detectors"].items():
                self.metrics.rows.labels(label, name).inc()
                if d["is_anomaly"]:
                    anomalous += 1
                    self.metrics.anomalous.labels(label, name).inc()
                if d["path"] == "fallback":
                    self.metrics.fallback.labels(label, name).inc()
                if float(row["timestamp"]) <= self._warm_until.get(row["entity"], -np.inf):
                    continue
                top = d["top_metrics"][0] if d.get("top_metrics") else None
                self.notifier.observe(
                    label,
                    name,
                    float(row["timestamp"]),
                    alert_open(d),
                    d["anomaly_score"],
                    d["threshold"],
                    d.get("incident_probability"),
                    top["metric"] if top else None,
                )
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for row in results:
            for name, d in row["detectors"].items():
                newest[(row["entity"], name)] = {**d, "timestamp": row["timestamp"]}
        for (entity, name), d in newest.items():
            label = self.label_of(entity)
            self.metrics.score.labels(label, name).set(d["anomaly_score"])
            self.metrics.threshold.labels(label, name).set(d["threshold"])
            self.metrics.anomaly.labels(label, name).set(1.0 if d["is_anomaly"] else 0.0)
            self.metrics.alert_open.labels(label, name).set(1.0 if alert_open(d) else 0.0)
            if d.get("incident_probability") is not None:
                self.metrics.probability.labels(label, name).set(d["incident_probability"])
            top = d["top_metrics"][0] if d.get("top_metrics") else None
            self.metrics.set_top(label, name, top["metric"] if top else None, top["contribution"] if top else 0.0)
            self.metrics.last_ts.labels(label).set(float(d["timestamp"]))
        return len(results), anomalous

    # -- the loop --------------------------------------------------------------------------------------------
    def run(
        self,
        max_polls: int | None = None,
        duration_s: float | None = None,
        after_poll: Callable[[], None] | None = None,
    ) -> None:
        """Poll at the step until `stop()` (or `max_polls` / `duration_s`). Errors are logged, counted and
        retried at the next step with a capped backoff; nothing is skipped by an error."""
        deadline = time.monotonic() + duration_s if duration_s else None
        failures = 0
        polls = 0
        while not self._stop.is_set():
            try:
                result = self.poll_once()
                failures = 0
                if self.last_error:
                    self.on_event("recovered: scoring again")
                self.last_error = None
            except Exception as exc:
                failures += 1
                result = {"behind": False}
                message = f"{type(exc).__name__}: {exc}"
                if message != self.last_error:
                    self.on_event(f"poll failed (will retry): {message}")
                self.last_error = message
                log.debug("poll failed", exc_info=True)
            polls += 1
            if after_poll is not None:
                after_poll()
            if (max_polls is not None and polls >= max_polls) or (deadline and time.monotonic() > deadline):
                break
            if result.get("behind"):
                continue  # catching up: no wait
            if failures:
                wait = max(min(self.source.step * 2**failures, 30.0), self._retry_after)
                self._retry_after = 0.0
            else:
                now = self.clock()
                wait = align(now - self.delay, self.source.step) + self.source.step + self.delay - now
            self._stop.wait(max(0.05, wait))

    def start(self) -> Watcher:
        """Run the loop in a background thread."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self.run, name="raywatch-watch", daemon=True)
            self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the loop to end after the current poll (safe from a signal handler)."""
        self._stop.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            self.notifier.flush()
        except Exception as exc:
            log.warning("final alert flush failed: %s", exc)

    def close(self) -> None:
        self.stop()
        self.metrics.close()
        self.client.close()
        self.http.close()
        self.notifier.close()

    def status(self) -> dict[str, Any]:
        return {
            "source": self.source.name,
            "prometheus": self.source.url,
            "serve_url": self.settings.serve_url,
            "exporter_port": self.settings.exporter_port,
            "step": self.source.step,
            "delay": self.delay,
            "entities": {e: list(d) for e, d in self.served.items()},
            "cursors": self.store.cursors(self.source.name),
            "polls": self.polls,
            "scored_rows": self.scored_rows,
            "firing": [
                {"entity": s["entity"], "detector": s["detector"], "since": s["starts_at"]}
                for s in self.notifier.firing()
            ],
            "last_error": self.last_error,
            "running": self._thread is not None and self._thread.is_alive(),
        }


def _ffill(values: np.ndarray, limit: int) -> np.ndarray:
    """Forward-fill NaNs down each column, from at most `limit` rows back."""
    if limit <= 0 or not np.isnan(values).any():
        return values
    return pd.DataFrame(values).ffill(limit=limit).to_numpy()


# -- as a Ray actor (raywatch up --source) -----------------------------------------------------------------------
class WatchActor:
    """A detached, restartable actor around a `Watcher`; the loop starts with the actor, so a restart
    (max_restarts) resumes from the cursors by itself."""

    def __init__(
        self,
        source: dict[str, Any],
        settings: dict[str, Any] | None = None,
        alerts: dict[str, Any] | None = None,
        state_dir_path: str | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        store = Path(state_dir_path) / "watch.db" if state_dir_path else None
        self.watcher = Watcher(source, settings, alerts, store).start()

    def status(self) -> dict[str, Any]:
        return self.watcher.status()

    def stop(self) -> dict[str, Any]:
        self.watcher.close()
        return self.watcher.status()

    def ping(self) -> str:
        return "ok"


def start_actor(
    source: PrometheusSource | str | Path,
    settings: dict[str, Any] | None = None,
    alerts: dict[str, Any] | None = None,
    state_dir_path: str | None = None,
) -> tuple[str, Any]:
    """Start (or find) the watcher actor of a source on the connected cluster. Returns (name, handle)."""
    import ray

    source = source if isinstance(source, PrometheusSource) else load_source(source)
    WatchSettings.from_dict({**source.watch, **(settings or {})}, source.origin)  # fail here, not in the actor
    AlertSettings.from_dict({**source.alerts, **(alerts or {})}, source.origin)
    name = actor_name(source.name)
    actor = named_actor(
        WatchActor,
        name,
        NAMESPACE,
        source.to_dict(),
        settings,
        alerts,
        state_dir_path or str(state_dir()),
        max_concurrency=4,
    )
    ray.get(actor.ping.remote(), timeout=120)
    return name, actor


def stop_actor(name: str) -> bool:
    """Stop the named watcher actor (its final alert flush included). False if it was not running."""
    import ray

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=30)
    except Exception as exc:
        log.warning("watcher %s did not stop cleanly: %s", name, exc)
    ray.kill(actor, no_restart=True)
    return True
