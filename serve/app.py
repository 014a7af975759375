"""The raywatch HTTP API: a FastAPI ingress deployment composed with the three detector deployments.

    serve run serve/config.yaml            # or: raywatch serve
    POST /v1/score  /v1/score/batch  /v1/forecast  /v1/feedback
    GET /v1/models  /v1/drift  /healthz  /readyz  /docs
    POST /v1/admin/promote  /rollback  /traffic  /baseline   (Authorization: Bearer <admin key>)

The ingress keeps each entity's recent raw samples, so clients may send one sample at a time and
still get windowed scores (the streaming path: windows and features are computed from that history
with the same code as in training). Routing per detector: A/B split by a stable hash of the entity,
shadow copies to the challenger off the response path, a circuit breaker with a fallback baseline
(robust z-score against the entity's recent history) when a model fails. What is served goes to
the drift monitors (`monitoring.monitor`, one Ray actor per model) through a bounded queue drained off
the response path; rows dropped when it is full are counted (`raywatch_monitor_dropped_total`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic_core import to_json
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from detect.fleet import MAX_WINDOW, EntityStats, as_deviations, fleet_key, is_fleet_key
from detect.kinds import FORECASTER
from detect.logs import LineBudget, process_logging
from detect.state import ServingStore
from detect.state import state_dir as current_state_dir
from monitoring.events import DriftEventStore
from monitoring.served import ServedColumns, ServedColumnsBuilder
from monitoring.trigger import gate_key
from serve import schemas as S
from serve.auth import KEYS_FILE_ENV, AuthError, check_admin, feedback_trusted
from serve.fleet_lane import FleetLane, LaneKey, LanePlan
from serve.history import AlertBook, ColdStarts, EntityHistory, SpotSeed, fallback_scores
from serve.memory import MemoryTrim
from serve.monitor_feed import MonitorFeed
from serve.rate_limit import RateLimit, SharedRateLimiter, client_id
from serve.rollout import RolloutAlreadyStarted, RolloutPlan, RolloutStore, StepCounter
from serve.router import CircuitBreaker, TrafficPolicy
from serve.settings import ServeSettings
from serve.traffic import TrafficStore
from serve.wire import PACK_FROM, full_column, is_packed, nested_items, pack, packed, shared_items, unpack

log = logging.getLogger("raywatch.serve")
REFUSALS_LOGGED_PER_S = 10  # lines about refused requests an ingress replica writes in a second, at most

META_TTL_S = 2.0
CALL_ITEMS = 2048  # items of a many-entity request sent to a detector in one call (chunks go side by side)
SNAPSHOT_CHUNK = 1000  # a snapshot's entities planned, called, settled and answered as one step, at most
SNAPSHOT_STEPS = 4  # steps a snapshot is cut into at least, so that they overlap (SNAPSHOT_STEPS_AT_ONCE) ...
MIN_SNAPSHOT_CHUNK = 128  # ... unless its steps would be smaller than this: a call's own cost would outweigh it
SNAPSHOT_STEPS_AT_ONCE = 2  # one step planned or settled here while the detectors score the other
ROUTED_HANDLES = 4096  # handles with a multiplexed model id kept for reuse (dropped all at once beyond)
BASELINE_ROWS = 1440  # newest kept rows an operator's /v1/admin/baseline makes the drift reference
MAX_BODY_ENV = "RAYWATCH_MAX_BODY_BYTES"
MAX_FLEET_BODY_ENV = "RAYWATCH_MAX_FLEET_BODY_BYTES"
BODY_TIMEOUT_ENV = "RAYWATCH_BODY_TIMEOUT_S"  # a request body must arrive within this many seconds (10)


def _max_body_bytes() -> int:
    """Read per request, as `_body_timeout_s` is, from the replica's environment."""
    return int(os.environ.get(MAX_BODY_ENV) or S.MAX_BODY_BYTES)


def _max_fleet_body_bytes() -> int:
    """The snapshot route's own limit (a 10,000-entity scrape), RAYWATCH_MAX_FLEET_BODY_BYTES to change it."""
    return int(os.environ.get(MAX_FLEET_BODY_ENV) or S.MAX_FLEET_BODY_BYTES)


def _body_timeout_s() -> float:
    """The ingress's `body_timeout_s` (set on `BodyLimit` by its constructor), else RAYWATCH_BODY_TIMEOUT_S, else 10."""
    return BodyLimit.timeout_s or float(os.environ.get(BODY_TIMEOUT_ENV) or 10.0)


def _registry() -> Any:
    """train.registry, imported on first use: it loads MLflow (seconds, and memory in every ingress
    replica), which only the admin routes and the app builder need. Defined above the ingress class:
    replicas get that class by value (cloudpickle), and a later module global would be missing there."""
    from train import registry

    return registry


api = FastAPI(title="raywatch", version="1.0", description="Incident detection for server telemetry on Ray.")


def snapshot_chunk(entities: int) -> int:
    """Entities per step of a snapshot of `entities`: SNAPSHOT_CHUNK at most, and few enough for SNAPSHOT_STEPS
    steps, so that a 1,000-machine snapshot's steps overlap too (the ingress plans one while a detector scores
    another) instead of going through the ingress, the detector and the ingress again one after the other."""
    return max(MIN_SNAPSHOT_CHUNK, min(SNAPSHOT_CHUNK, -(-entities // SNAPSHOT_STEPS)))


def _tally_alert_changes(changes: dict[tuple[str, str], int], detector: str, alerts: list[dict | None]) -> None:
    """Add the alerts that opened or closed among one entity's served rows to `changes`."""
    for alert in alerts:
        if alert is not None and alert["state"] in ("opened", "closed"):
            changes[detector, alert["state"]] = changes.get((detector, alert["state"]), 0) + 1


@dataclass
class _Planned:
    """One detector's call for one entity's new rows, as planned before the call (`RaywatchAPI._plan`)."""

    name: str
    entity: str
    path: str  # champion or challenger, as the traffic policy routes the entity
    item: dict[str, Any]  # what the detector's `score_items` gets
    policy: TrafficPolicy
    has_challenger: bool
    breaker: CircuitBreaker
    called: bool  # False: the circuit is open, the baseline answers
    local: bool = False  # scored by this replica's own models (a single-row call, `_single_rows_here`)


class ApiError(Exception):
    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class Refusals:
    """Every answer of status 400 or more that the API makes (its error handlers below, `BodyLimit`) is counted
    in `raywatch_requests_total` with its status and logged with its reason (the answer's `detail`; none for
    401 and 403). Recorded where each refusal is made, not by a middleware around every request: that layer
    cost the single-row rate about 3% in paired runs. Serve's access log, a line per request, is off in the
    ingress by default (`ServeSettings.ingress_access_log`), so this is where refused requests show."""

    # set by the ingress constructor (a class attribute, as `BodyLimit.timeout_s`): (route, status, detail)
    observe: Callable[[str, int, str | None], None] | None = None
    MAX_DETAIL = 300  # characters of the detail that go into the log line

    @classmethod
    def record(cls, scope: dict[str, Any], status: int, detail: Any) -> None:
        if cls.observe is None:
            return
        detail = None if detail is None or status in (401, 403) else str(detail)[: cls.MAX_DETAIL]
        route = scope.get("path", "")
        if route not in api.openapi()["paths"]:  # the API's routes (the schema is built once): a scanner's
            route = "unmatched"  # paths must not become metric tags
        try:
            cls.observe(route, status, detail)
        except Exception as exc:  # counting must never fail the answer
            log.warning("refused request not recorded", extra={"error": f"{type(exc).__name__}: {exc}"})


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {
            "field": "body" if e.get("type") == "json_invalid" else _loc(tuple(e.get("loc", ()))),
            "message": e.get("msg", "invalid"),
        }
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    detail = f"{first['field']}: {first['message']}"
    Refusals.record(request.scope, 422, detail)
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors[:20]})


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    detail = f"{exc.field}: {exc.message}"
    Refusals.record(request.scope, exc.status, detail)
    return JSONResponse(status_code=exc.status, content={"detail": detail, "field": exc.field})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own refusals (404 for a path that is no route, 405 for a method a route lacks), answered
    as FastAPI answers them, and recorded."""
    Refusals.record(request.scope, exc.status_code, exc.detail)
    return await http_exception_handler(request, exc)


async def _client(request: Request) -> str:
    """Who sent the request, for the rate limit (a dependency: resolved from this module's names;
    async, so FastAPI does not hand it to a thread)."""
    return client_id(request.headers, request.client.host if request.client else None)


async def _raw_body(request: Request) -> bytes:
    return await request.body()


def _parse(model: type[BaseModel], body: bytes) -> Any:
    """Parse and validate in one pass (pydantic's JSON parser: several times faster than json.loads and
    validate on 1,000-row batches); errors answer 422 like FastAPI's own, naming the field. A model with a
    faster parse when everything in it is valid (`S.ALL_ROWS_VALID`) tries that first."""
    if (all_valid := S.ALL_ROWS_VALID.get(model)) is not None:
        try:
            return all_valid.model_validate_json(body)
        except ValidationError:
            pass  # the request model says what is wrong, and where
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False, include_context=False)]
        ) from None


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a route that parses its body itself (see `_openapi`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the request models of the routes that parse their own bodies."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in S.SELF_PARSED:
            extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(extra.pop("$defs", {}))
            components[model.__name__] = extra
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


class RateLimited(Exception):
    def __init__(self, wait_s: float, limit: RateLimit) -> None:
        super().__init__("rate limited")
        self.wait_s, self.limit = wait_s, limit


@api.exception_handler(RateLimited)
async def _rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
    retry = max(1, math.ceil(exc.wait_s))
    detail = f"rate limit: over {exc.limit.describe()}; retry in {retry} s"
    Refusals.record(request.scope, 429, detail)
    return JSONResponse(status_code=429, content={"detail": detail}, headers={"Retry-After": str(retry)})


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """An unexpected failure inside the app: 500 with JSON naming the error's type (never its text, which may
    carry request data); the traceback goes to the replica's log. So a bare-text 'Internal Server Error' is
    Serve's proxy's, not the app's: a request lost with a replica that died while it held it."""
    detail = f"internal error ({type(exc).__name__}); the replica's log has the traceback"
    Refusals.record(request.scope, 500, detail)
    return JSONResponse(status_code=500, content={"detail": detail})


@api.exception_handler(AuthError)
async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    Refusals.record(request.scope, exc.status, None)
    return JSONResponse(status_code=exc.status, content={"detail": exc.message}, headers=headers)


class BodyLimit:
    """Pure ASGI middleware: bodies over the limit (4 MiB; RAYWATCH_MAX_BODY_BYTES) get 413 before they are read. With a
    Content-Length the header decides (the server reads no further); a chunked body is read up to the
    limit and replayed to the app. (Starlette's BaseHTTPMiddleware would cost more than scoring.)"""

    # set by the ingress constructor. A class attribute, because the class is imported by reference in
    # the replica while the ingress class arrives by value (cloudpickle): a module global set in its
    # __init__ would land in a copy the middleware never sees.
    timeout_s: float | None = None

    def __init__(self, app) -> None:
        self.app = app

    @staticmethod
    async def _reject(scope, send, status: int, detail: str) -> None:
        Refusals.record(scope, status, detail)
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _max_fleet_body_bytes() if scope.get("path") == S.FLEET_PATH else _max_body_bytes()
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit():
                return await self._reject(scope, send, 400, "content-length: not a number")
            if int(length) > limit:
                return await self._reject(scope, send, 413, f"body: {int(length)} bytes is over the {limit}-byte limit")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # read the whole body here, bounded in size and in time: a client that stalls gets 408
        # (Serve's own request timeout is the client's to switch off, by a header)
        chunks, received, more = [], 0, True
        timeout_s = _body_timeout_s()
        deadline = time.monotonic() + timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return await self._reject(scope, send, 408, f"body: not received within {timeout_s:g} s")
            if message["type"] != "http.request":  # the client went away
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                return await self._reject(scope, send, 413, f"body: over the {limit}-byte limit")
            chunks.append(chunk)
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)


api.add_middleware(BodyLimit)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    graceful_shutdown_timeout_s=5,
    health_check_period_s=2,
    num_replicas=1,
)
@serve.ingress(api)
class RaywatchAPI:
    """Ingress. The per-entity history lives in the replica: one replica by default, so a stream of
    single samples sees its whole history; `ingress_replicas` > 1 for HA (see README, "Serving")."""

    def __init__(
        self,
        detectors: dict[str, DeploymentHandle],
        tracking_uri: str | None = None,
        state_dir: str | None = None,
        admin_keys_file: str | None = None,
        breaker_cooldown_s: float = 10.0,
        monitor: dict[str, Any] | None = None,
        rate_limit: RateLimit | None = None,
        body_timeout_s: float | None = None,
        settings: ServeSettings | None = None,
        detector_args: dict[str, Any] | None = None,
    ) -> None:
        process_logging()
        self.settings = settings or ServeSettings()
        if body_timeout_s:
            BodyLimit.timeout_s = float(body_timeout_s)
        if tracking_uri:
            _registry().use_store(tracking_uri)
        self.state_root = Path(state_dir) if state_dir else current_state_dir()
        self.admin_keys_file = (
            admin_keys_file  # a path, never the keys: deployment arguments are visible in the dashboard
        )
        from ray.util import metrics

        self.handles = dict(detectors)  # kind name -> its deployment, or its models in this replica (in_ingress)
        self.routed_handles: dict[tuple[str, str], Any] = {}  # (kind, model key) -> handle with that routing id
        # kind -> its models in this replica: those of `in_ingress` now, those of `single_rows_in_ingress` on
        # their first single-row call (`_single_rows_here`)
        self._local_args = {"tracking_uri": tracking_uri, "settings": self.settings, **(detector_args or {})}
        self.local = {kind: self._local_models(kind) for kind in self.settings.in_ingress}
        self.local_loads: dict[str, asyncio.Task] = {}
        self.handles.update(self.local)
        self.limiter = SharedRateLimiter(rate_limit or RateLimit())  # one limit for all the replicas
        self.history = EntityHistory()
        self.cold_starts = ColdStarts()  # entities scored by a fleet model: rows seen, statistics, thresholds
        self.memory = MemoryTrim()  # freed pages back to the system after big requests
        self.alerts = AlertBook()  # rows grouped into alert episodes per detector and entity
        self.lane = FleetLane()  # the state of a snapshot's grown fleet-scored machines, as columns
        self.traffic = TrafficStore(self.state_root / "traffic.db")  # shared by the replicas, kept across restarts
        # one breaker per model and slot: a failing challenger must not send the champion's traffic to the fallback
        self.breakers = {
            (name, slot): CircuitBreaker(cooldown_s=breaker_cooldown_s)
            for name in S.DETECTORS
            for slot in ("champion", "challenger")
        }
        # and one per model and slot for the single-row calls this replica scores itself
        # (`single_rows_in_ingress`): a failing deployment must not open them, nor their successes close it
        self.ingress_breakers = {key: CircuitBreaker(cooldown_s=breaker_cooldown_s) for key in self.breakers}
        self.rollouts = RolloutStore(self.state_root / "traffic.db")  # canary rollouts, beside the policy they drive
        self.step_counts = StepCounter(self.rollouts)
        self.rollout_tick: asyncio.Task | None = None
        self.rollout_seen: set[tuple[str, str]] = set()  # (model, challenger version) checked for a rollout request
        self.shadow_stats = {name: {"rows": 0, "disagreements": 0} for name in S.DETECTORS}
        self.meta: dict[str, dict[str, Any]] = {}
        self.meta_at: dict[str, float] = {}
        self.store = ServingStore(self.state_root / "serving.db")
        self.drift_events = DriftEventStore(self.state_root / "drift.db")
        self.background: set[asyncio.Task] = set()
        monitor = dict(monitor or {})
        self.monitor_config = monitor.get("config") or {}
        self.monitors: dict[str, Any] = {}  # model -> its monitor actor, once rows were handed to it
        self.monitor_feed = MonitorFeed(
            self._deliver_to_monitor,
            self.settings.monitor_queue,
            self.settings.monitor_flush_s,
            self._count_monitor_rows,
            enabled=bool(monitor.pop("enabled", True)),
        )
        self.m_requests = metrics.Counter(
            "raywatch_requests_total", description="HTTP requests", tag_keys=("route", "status")
        )
        self.refusal_lines = LineBudget(REFUSALS_LOGGED_PER_S)
        Refusals.observe = self._observe_refused
        self.m_latency = metrics.Histogram(
            "raywatch_request_latency_ms",
            description="request latency",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
            tag_keys=("route",),
        )
        self.m_rows = metrics.Counter(
            "raywatch_scored_rows_total", description="rows scored", tag_keys=("detector", "path")
        )
        self.m_anomalies = metrics.Counter(
            "raywatch_anomalies_total", description="rows flagged", tag_keys=("detector",)
        )
        self.m_alerts = metrics.Counter(
            "raywatch_alerts_total",
            description="alert episodes opened and closed (k of n rows above the threshold open one)",
            tag_keys=("detector", "transition"),
        )
        self.m_alerts_firing = metrics.Gauge("raywatch_alerts_firing", description="alerts open in this replica")
        self.m_fallbacks = metrics.Counter(
            "raywatch_fallbacks_total", description="rows served by the baseline", tag_keys=("detector",)
        )
        self.m_shadow = metrics.Counter(
            "raywatch_shadow_disagreements_total",
            description="shadow rows whose is_anomaly differs from the champion's",
            tag_keys=("detector",),
        )
        self.m_shadow_rows = metrics.Counter(
            "raywatch_shadow_rows_total", description="rows scored in shadow", tag_keys=("detector",)
        )
        self.m_rollout = metrics.Counter(
            "raywatch_rollout_transitions_total",
            description="canary rollout steps: advance, rollback, completed, aborted",
            tag_keys=("detector", "action"),
        )
        self.m_rollout_percent = metrics.Gauge(
            "raywatch_rollout_percent", description="the canary's share of requests (0: none)", tag_keys=("detector",)
        )
        self.m_monitor_rows = metrics.Counter(
            "raywatch_monitor_rows_total",
            description="served rows handed to the drift monitors",
            tag_keys=("detector",),
        )
        self.m_monitor_dropped = metrics.Counter(
            "raywatch_monitor_dropped_total",
            description="served rows not handed to the drift monitors (queue full or monitor unavailable)",
            tag_keys=("detector", "reason"),
        )

    def _local_models(self, kind: str) -> Any:
        """A detector kind's models run by this replica: its `DetectorServer`, called in process."""
        from serve.detectors import InProcessHandle  # torch and ONNX Runtime: only when models run here

        return InProcessHandle(kind, **self._local_args)

    def _single_rows_here(self, name: str, path: str) -> bool:
        """Whether this replica scores a single-row call of `name` on `path` itself now: a kind of
        `in_ingress`, or one of `single_rows_in_ingress` once its models are ready here and hold the version
        that the metadata the call was planned with names for `path` (after a promotion or a new challenger,
        the deployment or these models may load it first; the call takes the hop until both hold it). The
        models are made on the kind's first single-row call, on a worker thread (importing torch and ONNX
        Runtime takes seconds and about 250 MB): until they are ready its calls take the hop, and an ingress
        that only serves snapshots never makes them. A failed start leaves the kind on the hop, logged."""
        if name in self.settings.in_ingress:
            return True
        if name in self.local:
            held = self.local[name].server.slots.get(path)
            planned = self.meta.get(name, {}).get("slots", {}).get(path) or {}
            return held is not None and held.version == planned.get("version")
        if name in self.settings.single_rows_in_ingress and name not in self.local_loads:
            self.local_loads[name] = asyncio.get_running_loop().create_task(self._start_local(name))
        return False

    def _single_rows_where(self, name: str) -> str:
        """Where this replica's single-row calls of `name` are scored: "ingress" (its models are ready here;
        a call still takes the hop while they hold another version than the one it was planned with),
        "loading" (they are being made, the hop meanwhile) or "deployment"."""
        if name in self.local:
            return "ingress"
        task = self.local_loads.get(name)
        return "loading" if task is not None and not task.done() else "deployment"

    async def _start_local(self, name: str) -> None:
        try:
            self.local[name] = await asyncio.to_thread(self._local_models, name)
            # the models' objects (and everything the ingress made before) out of the garbage collector's
            # scans: its full collections over them stalled the event loop, the single-row p99 at 8 clients
            # 69-104 ms in 3 of 5 paired rounds without, 34-42 ms in every round of two runs with (2026-12-06,
            # notes of issue 20). Models loaded later are scanned again; this is the bulk, once
            gc.collect()
            gc.freeze()
        except Exception as exc:
            log.warning(
                "single rows stay on the hop", extra={"detector": name, "error": f"{type(exc).__name__}: {exc}"}
            )

    # -- model metadata ----------------------------------------------------------------------------------
    async def _info(self, name: str, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if force or name not in self.meta or now - self.meta_at.get(name, 0) > META_TTL_S:
            try:
                self.meta[name] = await self.handles[name].info.remote()
                self.meta_at[name] = now
            except Exception as exc:  # a dead deployment: keep the last known metadata
                log.warning("info failed", extra={"detector": name, "error": str(exc)})
                self.meta.setdefault(name, {"slots": {}, "load_error": str(exc)})
            await self._start_requested_rollout(name, self.meta[name])
        return self.meta[name]

    async def _start_requested_rollout(self, name: str, info: dict[str, Any]) -> None:
        """A challenger the retraining loop asked to roll out (`registry.request_rollout`) starts its rollout
        here, once: each challenger version is looked at once per replica, the tag then says "started", and
        the store starts one rollout per request id, so a replica that read the tag before another replica
        started it (and perhaps ended it) does not start it again."""
        version = (info.get("slots", {}).get("challenger") or {}).get("version")
        if version is None or (name, version) in self.rollout_seen:
            return
        self.rollout_seen.add((name, version))
        registry = _registry()
        try:
            request = await asyncio.to_thread(registry.rollout_request, name, version)
            if not request or request.get("status") != "requested":
                return
            plan = RolloutPlan(**request.get("plan", {}))
            state = await asyncio.to_thread(self.rollouts.start, name, version, plan, request=request.get("id"))
            await asyncio.to_thread(registry.mark_rollout, name, version, "started")
        except RolloutAlreadyStarted:  # another replica started it after this one read the tag; it marks it
            return
        except ValueError as exc:  # a rollout is running, or the plan is bad: say so, start nothing
            log.warning(
                "requested rollout not started", extra={"detector": name, "version": version, "error": str(exc)}
            )
            await self._refuse_rollout_request(name, version, str(exc)[:500])
            return
        except Exception as exc:  # the registry is unreachable: look again after the next change
            self.rollout_seen.discard((name, version))
            log.warning("rollout request unreadable", extra={"detector": name, "error": str(exc)})
            return
        self.m_rollout_percent.set(state["percent"], tags={"detector": name})
        log.info("rollout started (retraining loop)", extra={"detector": name, "version": version})

    async def _refuse_rollout_request(self, name: str, version: str, reason: str) -> None:
        """Refuse a requested rollout that will not start (`registry.refuse_rollout`): left "requested", it
        would hold the challenger slot for good (`registry.rollout_in_progress`) and refuse every later
        request; the slot goes back to the rollout under way, or is emptied (every replica's registry watcher
        then loads what the alias says). Not when the rollout under way is this version's: another ingress
        replica started it, and marks it."""
        try:
            running = await asyncio.to_thread(self.rollouts.in_progress, name)
            if running is not None and str(running["version"]) == str(version):
                return
            held = None if running is None else str(running["version"])
            await asyncio.to_thread(_registry().refuse_rollout, name, version, reason, held)
        except Exception as exc:  # the store or the registry is unreadable: the tag may stay "requested"
            log.warning("rollout request not refused", extra={"detector": name, "error": str(exc)})

    async def _entity_metrics(self, detectors: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(entity -> metrics of the entities with a model of their own, fleet key -> metrics of the fleet
        models), over the champions of `detectors`."""
        known: dict[str, list[str]] = {}
        fleets: dict[str, list[str]] = {}
        for name in detectors:
            champion = (await self._info(name))["slots"].get("champion")
            for entity, meta in (champion or {}).get("entities", {}).items():
                (fleets if is_fleet_key(entity) else known).setdefault(entity, meta["metrics"])
        return known, fleets

    @staticmethod
    def _model_key(slot: dict[str, Any] | None, entity: str, metrics: list[str]) -> str | None:
        """The key of the model that scores `entity` in a loaded slot's description: its own, else the fleet
        model of its metrics (a new entity, cold start), else None."""
        entities = (slot or {}).get("entities", {})
        if entity in entities:
            return entity
        key = fleet_key(metrics)
        return key if key in entities else None

    def _serving(self, infos: dict[str, dict], entity: str, metrics: list[str]) -> tuple[dict[str, dict], bool, int]:
        """For one entity: the detectors whose champion serves it (its own model or the fleet model of its
        metrics), whether any of them is a fleet model, and the rows of history their models read."""
        keys = {name: self._model_key(info["slots"].get("champion"), entity, metrics) for name, info in infos.items()}
        serving = {name: info for name, info in infos.items() if keys[name]}
        fleet_scored = any(is_fleet_key(keys[name]) for name in serving)
        return serving, fleet_scored, self._context_rows(serving, entity, metrics)

    def _context_rows(self, infos: dict[str, dict], entity: str, metrics: list[str]) -> int:
        """Rows of history before a new row that the served models of `infos`' detectors read for `entity`."""
        need = 0
        for info in infos.values():
            for slot in info["slots"].values():
                key = self._model_key(slot, entity, metrics)
                need = max(need, slot["entities"][key]["context_rows"] if key else 0)
        return need

    def _plan(
        self,
        name: str,
        info: dict[str, Any],
        entity: str,
        rows: np.ndarray,
        n_new: int,
        metrics: list[str],
        place: tuple[EntityStats, int] | None,
        policy: TrafficPolicy,
        single: bool = False,
    ) -> _Planned:
        """One detector's call for one entity's new rows (the last `n_new` of `rows`; the rest is context):
        the path the traffic policy picks, the item for the detector, where it is scored (this replica's own
        models for a `single` entity's request of fewer than `parallel_rows` rows, `_single_rows_here`) and
        whether that circuit lets it go. An entity without a model of its own is scored by the fleet model
        of its metrics, with `place`: its statistics and the row of its life that its first new row is
        (`ColdStarts.admit`)."""
        has_challenger = "challenger" in info["slots"]
        path = policy.path_for(entity, has_challenger)
        if path != "champion" and self._model_key(info["slots"].get(path), entity, metrics) is None:
            path = "champion"  # a challenger without this entity's model (or fleet model): the champion serves it
        slot_meta = info["slots"].get(path) or info["slots"].get("champion") or {}
        key = self._model_key(slot_meta, entity, metrics) or entity
        context = slot_meta.get("entities", {}).get(key, {}).get("context_rows", 64)
        item = {"entity": entity, "path": path, "rows": rows[-(n_new + context) :], "n_new": n_new}
        if is_fleet_key(key) and place is not None:
            stats, first_new = place
            offset = first_new + n_new - len(item["rows"])  # the row of its life that the item's rows start at
            needed = stats.for_windows_from(offset - MAX_WINDOW + 1)
            item.update(model_key=key, offset=offset, stats=(needed.rows, needed.values))
        local = single and n_new < self.settings.big_batch_rows and self._single_rows_here(name, path)
        ingress_only = local and name not in self.settings.in_ingress  # a deployment serves its other calls
        breaker = (self.ingress_breakers if ingress_only else self.breakers)[(name, path)]
        return _Planned(name, entity, path, item, policy, has_challenger, breaker, breaker.allow(), local)

    async def _results(self, plans: list[_Planned], gather: bool) -> list[dict[str, Any]]:
        """The detectors' answers to the planned calls, in order (a call the circuit held back: not called).
        Big items go alone (gathering them would only serialise their scoring in one call). Small ones go
        through the ingress's dynamic batching when `gather` (one entity's request: concurrent requests
        share a call), to this replica's own models when planned `local`, else straight to each detector in
        chunks of CALL_ITEMS (a snapshot of many entities)."""
        out: list[dict[str, Any]] = [{"ok": False, "called": False}] * len(plans)
        chunks: dict[str, list[list[int]]] = {}
        jobs = []
        for i, plan in enumerate(plans):
            if not plan.called:
                continue
            if plan.item["n_new"] >= self.settings.big_batch_rows:
                jobs.append(([i], self._call(plan.name, [plan.item])))
            elif gather and plan.local:
                jobs.append(([i], self._single(self._in_process_call((plan.name, plan.item)))))
            elif gather:
                jobs.append(([i], self._single(self._model_call((plan.name, plan.item)))))
            else:
                groups = chunks.setdefault(plan.name, [[]])
                if len(groups[-1]) >= CALL_ITEMS:
                    groups.append([])
                groups[-1].append(i)
        for name, groups in chunks.items():
            jobs += [(idx, self._call(name, [plans[i].item for i in idx])) for idx in groups]
        answers = await asyncio.gather(*(job for _, job in jobs))
        for (idx, _), results in zip(jobs, answers):
            for i, result in zip(idx, results):
                out[i] = result
        return out

    @staticmethod
    async def _single(call) -> list[dict[str, Any]]:
        return [await call]

    def _settle(
        self,
        plan: _Planned,
        result: dict[str, Any],
        rows: np.ndarray,
        timestamps: list,
        metrics: list[str],
        started: float,
    ) -> tuple[str, dict, dict[str, Any]]:
        """What was served for a planned call: the detector's answer, or the baseline when the call failed or
        the circuit held it back; records the circuit, the counters, shadow scoring and rollout evidence.
        Returns (path, model ref, arrays as `EntityModel.score_arrays` returns them); the rows served are
        counted by the caller, once per request (`_count_served`)."""
        name, path, n_new = plan.name, plan.path, plan.item["n_new"]
        if plan.called:
            plan.breaker.record(result.get("ok", False))
            if not result.get("ok"):
                log.warning(
                    "model call failed", extra={"detector": name, "entity": plan.entity, "error": result.get("error")}
                )
        if result.get("ok"):
            served, ref, arrays = path, result["model"], result["arrays"]
            if plan.policy.shadow and plan.has_challenger and path == "champion":
                self._spawn(self._shadow(name, {**plan.item, "path": "challenger"}, arrays))
        else:
            served, ref = "fallback", {"name": f"raywatch-{name}", "version": None, "variant": "baseline"}
            hist = self.history.peek(plan.entity)
            recent = np.asarray(hist, dtype=np.float64) if hist is not None and len(hist) >= n_new else rows
            arrays = fallback_scores(recent, n_new, metrics)
        if plan.policy.step_key is not None:  # a canary rollout: count what this arm served
            latency_ms = (time.perf_counter() - started) * 1000
            self._count_step(plan.policy.step_key, path, result, latency_ms, plan.entity, timestamps, arrays)
        return served, ref, arrays

    # -- canary rollouts (serve/rollout.py) ------------------------------------------------------------------
    def _count_step(
        self,
        step_key: str,
        path: str,
        result: dict,
        latency_ms: float,
        entity: str,
        timestamps: list,
        arrays: dict[str, Any],
    ) -> None:
        """Add one model call to the rollout step's counts of its arm; judge the step about once a second."""
        flags = np.asarray(arrays["scores"]) >= arrays["threshold"]
        flagged_rows = [[entity, str(ts)] for ts, flag in zip(timestamps, flags) if flag and ts is not None]
        ok = bool(result.get("ok"))
        error = result.get("called", True) and not ok  # an open breaker is a fallback, not a failed call
        arm = "canary" if path == "challenger" else "champion"
        self.step_counts.arm(step_key, arm).record(
            not error, not ok, latency_ms, len(timestamps), int(flags.sum()), flagged_rows
        )
        if self.step_counts.due() and (self.rollout_tick is None or self.rollout_tick.done()):
            self.rollout_tick = asyncio.get_running_loop().create_task(self._advance_rollouts())

    async def _advance_rollouts(self) -> None:
        """Flush this replica's counts, then judge every running rollout and carry out what was decided:
        a promotion at 100%, the challenger's removal on a rollback. Any replica may do it; the store makes
        each transition once."""
        try:
            await asyncio.to_thread(self.step_counts.flush)
            for name in S.DETECTORS:
                policy = self.traffic.get(name)
                self.m_rollout_percent.set(
                    policy.challenger_percent if policy.step_key else 0.0, tags={"detector": name}
                )
                if policy.step_key is None:
                    continue
                state = await asyncio.to_thread(self.rollouts.get, name)
                if state and state["status"] == "running":
                    decided = await asyncio.to_thread(self.rollouts.decide, name, None, self._trusted_labels)
                    if decided is None:
                        continue
                    state, verdict = decided
                    self.m_rollout.inc(tags={"detector": name, "action": verdict.action})
                    log.info("rollout", extra={"detector": name, "action": verdict.action, "reason": verdict.reason})
                if state and state["status"] == "promoting":
                    await self._finish_rollout(name, state)
                elif state and state["status"] == "rolled_back":
                    await self._drop_challenger(name, state["version"])
        except Exception as exc:  # judged again on the next tick
            log.warning("rollout tick failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _trusted_labels(self, entity: str, timestamps: list[str]) -> np.ndarray:
        """The trusted feedback labels of an entity's rows (1, 0, or -1 for none): the precision guard's."""
        return self.store.labels(entity, timestamps, trusted_only=True)

    async def _finish_rollout(self, name: str, state: dict[str, Any]) -> None:
        """The canary passed every step: promote its version, retire the challenger slot, end the rollout."""
        registry = _registry()
        await asyncio.to_thread(registry.promote, name, state["version"])
        await self._drop_challenger(name, state["version"])
        reason = f"promoted version {state['version']} after {len(state['history'])} steps"
        if await asyncio.to_thread(self.rollouts.finish, name, "completed", reason):
            self.m_rollout.inc(tags={"detector": name, "action": "completed"})

    async def _drop_challenger(self, name: str, version: str) -> None:
        """Empty the challenger slot of `version`, only if it still holds it: every replica's tick does this
        after a rollback, and one that runs late must not remove the next rollout's challenger (that one
        then served no canary call and ended inconclusive, once in a CI run)."""
        registry = _registry()
        await asyncio.to_thread(registry.clear_alias, name, registry.CHALLENGER, version)
        await self._reload(name)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001, max_concurrent_batches=4)
    async def _model_call(self, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Dynamic batching on the ingress side: the model calls of concurrent requests go to each
        detector as one `score_items` call, so the per-call cost of Serve's routing and RPC is paid
        once per batch instead of once per request (the detector side batches single callers too)."""
        return await self._calls_by_detector(calls)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0)
    async def _in_process_call(self, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The same gathering for the models this replica runs itself (`in_ingress`, and the single-row calls
        of `single_rows_in_ingress`), without the wait: a call costs no hop here, so a request does not wait
        for company, and the requests that queued up while the models were busy still go to them together."""
        return await self._calls_by_detector(calls, local=True)

    async def _calls_by_detector(
        self, calls: list[tuple[str, dict[str, Any]]], local: bool = False
    ) -> list[dict[str, Any]]:
        by_name: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(calls):
            by_name.setdefault(name, []).append(i)
        out: list[dict[str, Any]] = [{}] * len(calls)

        async def one(name: str, idx: list[int]) -> None:
            for i, result in zip(idx, await self._call(name, [calls[i][1] for i in idx], local)):
                out[i] = result

        await asyncio.gather(*(one(name, idx) for name, idx in by_name.items()))
        return out

    async def _call(self, name: str, items: list[dict[str, Any]], local: bool = False) -> list[dict[str, Any]]:
        """One `score_items` call to a detector deployment, or to this replica's own models of that kind
        (`local`); a failed call fails each of its items."""
        try:
            handle = self.local[name] if local else self._routed(name, items)
            if local or len(items) < PACK_FROM or name in self.settings.in_ingress:  # no hop: nothing to serialise
                return await handle.score_items.remote(items)
            return unpack(await handle.score_items.remote(pack(items)))  # a snapshot's chunk, as columns
        except Exception as exc:
            return [{"ok": False, "error": f"{type(exc).__name__}: {exc}"}] * len(items)

    def _routed(self, name: str, items: list[dict[str, Any]]) -> Any:
        """The handle for a call of `items`: when they all want one model key (one entity's rows, or new
        entities of one fleet model), it carries the key as Serve's multiplexed model id, so the call goes
        to a replica that holds that model; a call of many keys (a fleet snapshot) goes to any replica."""
        handle = self.handles[name]
        if name in self.settings.in_ingress:
            return handle
        first = items[0].get("model_key") or items[0]["entity"]
        if any((item.get("model_key") or item["entity"]) != first for item in items[1:]):
            return handle
        return self._routed_to(name, first)

    def _routed_to(self, name: str, first: str) -> Any:
        """The handle of `name`'s deployment that routes a call to a replica holding model `first`."""
        handle = self.handles[name]
        routed = self.routed_handles.get((name, first))
        if routed is None:
            if len(self.routed_handles) >= ROUTED_HANDLES:
                self.routed_handles.clear()
            routed = self.routed_handles[(name, first)] = handle.options(multiplexed_model_id=first)
        return routed

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _shadow(self, name: str, item: dict[str, Any], champion: dict[str, Any]) -> None:
        """Score a copy with the challenger; compare and count, never return it."""
        try:
            result = await self._routed(name, [item]).score.remote(item)
        except Exception as exc:
            log.warning("shadow call failed", extra={"detector": name, "error": str(exc)})
            return
        if not result.get("ok"):
            return
        challenger = result["arrays"]
        flagged = np.asarray(champion["scores"]) >= champion["threshold"]
        disagree = int(((np.asarray(challenger["scores"]) >= challenger["threshold"]) != flagged).sum())
        self.shadow_stats[name]["rows"] += len(flagged)
        self.shadow_stats[name]["disagreements"] += disagree
        self.m_shadow_rows.inc(len(flagged), tags={"detector": name})
        if disagree:
            self.m_shadow.inc(disagree, tags={"detector": name})
        log.debug(  # a line per shadowed request: the metrics above count them
            "shadow",
            extra={"detector": name, "entity": item["entity"], "rows": len(flagged), "disagree": disagree},
        )

    # -- drift monitors -----------------------------------------------------------------------------------
    async def _deliver_to_monitor(self, name: str, rows: ServedColumns) -> None:
        """Hand served rows to the model's monitor actor (created on first use, detached, restartable)."""
        # deferred, like the registry below: the monitor module brings MLflow and torch, which an ingress
        # replica would otherwise load at start (slower restarts) and never use
        from monitoring import monitor as monitors

        if name not in self.monitors:
            self.monitors[name] = await asyncio.to_thread(
                monitors.get_or_create, name, self.monitor_config, str(self.state_root), _registry().tracking_uri()
            )
        try:
            await self.monitors[name].observe.remote(rows)
        except Exception:
            self.monitors.pop(name, None)  # asked for again on the next batch
            raise

    def _count_monitor_rows(self, name: str, rows: int, reason: str | None) -> None:
        if reason is None:
            self.m_monitor_rows.inc(rows, tags={"detector": name})
        else:
            self.m_monitor_dropped.inc(rows, tags={"detector": name, "reason": reason})

    @api.get("/v1/drift")
    async def drift(
        self, model: S.DetectorName | None = None, entity: str | None = None, only_drift: bool = False, limit: int = 100
    ) -> dict[str, Any]:
        if not 1 <= limit <= 1000:
            raise ApiError(422, "limit", "must be between 1 and 1000")
        events = await asyncio.to_thread(
            self.drift_events.events, model=model, entity=entity, only_drift=only_drift, limit=limit
        )
        retraining = {}
        for name in [model] if model else S.DETECTORS:
            retraining[name] = {
                "last_job": self.drift_events.get_state(f"{name}/job"),
                "last_skip": self.drift_events.get_state(f"{name}/last_skip"),
                "decisions": await asyncio.to_thread(self.store.decisions, name, 5),
            }
            if entity:  # whether the entity's drift has earned a job yet (monitoring/trigger.py RetrainGate)
                retraining[name]["gate"] = self.drift_events.get_state(gate_key(name, entity))
        return {"events": events, "retraining": retraining, "monitor_queue": self.monitor_feed.status()}

    async def _limit(self, client: str) -> None:
        """The per-client rate limit of the scoring endpoints (429 past it), shared by the replicas."""
        if self.limiter.enabled:
            wait = await self.limiter.check(client)
            if wait:
                raise RateLimited(wait, self.limiter.limit)

    def _observe(self, route: str, status: int, started: float) -> None:
        self.m_requests.inc(tags={"route": route, "status": str(status)})
        self.m_latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})

    def _observe_refused(self, route: str, status: int, detail: str | None) -> None:
        """A request answered with an error (`Refusals`): counted with its status, and logged, at most
        `REFUSALS_LOGGED_PER_S` lines a second (a flood of refusals is counted, and the next line written
        says how many were not logged)."""
        self.m_requests.inc(tags={"route": route, "status": str(status)})
        write, held = self.refusal_lines.take()
        if write:
            fields = {"route": route, "status": status, "detail": detail} | ({"not_logged": held} if held else {})
            log.warning("request refused", extra=fields)

    async def _scoring_request(
        self, model: type[BaseModel], body: bytes, client: str
    ) -> tuple[Any, list[str], dict[str, list[str]]]:
        """What both scoring routes do first: rate limit, parse, the detectors asked for (default: all)
        and the metrics of each entity they serve (503 when none is loaded)."""
        await self._limit(client)
        request = _parse(model, body)
        detectors = list(dict.fromkeys(request.detectors or S.DETECTORS))
        known, fleets = await self._entity_metrics(detectors)
        if not known and not fleets:
            raise ApiError(503, "detectors", f"no model is loaded for {detectors}; train and register one first")
        for entity, names in S.entity_metric_names(request):  # a new entity: the fleet model of its metrics
            if entity not in known and (key := fleet_key(names)) in fleets:
                known[entity] = fleets[key]
        return request, detectors, known

    @api.post("/v1/score", response_model=S.ScoreResponse, openapi_extra=_json_body(S.ScoreRequest))
    async def score(self, body: bytes = Depends(_raw_body), client: str = Depends(_client)) -> Response:
        started = time.perf_counter()
        request: S.ScoreRequest
        request, detectors, known = await self._scoring_request(S.ScoreRequest, body, client)
        for i, row in enumerate(request.rows):
            problem = S.row_problem(row, known)
            if problem:
                raise ApiError(422, f"rows[{i}].{problem[0]}", problem[1])
        results = await self._score_rows(list(request.rows), known, detectors)
        self._observe("/v1/score", 200, started)
        # serialised here: FastAPI's response-model pass costs more than the scoring on big batches;
        # the schema (S.ScoreResponse) still documents it in /docs
        return Response(content=to_json({"results": results}), media_type="application/json")

    async def _score_rows(
        self, rows: list[S.TelemetryRow], known: dict[str, list[str]], detectors: list[str]
    ) -> list[dict[str, Any]]:
        """Score checked rows (entities served, metrics the model's), each entity's in order after its
        history; one result per row, in the rows' order, with the flags summed into the metrics."""
        by_entity: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_entity.setdefault(row.entity, []).append(i)
        values = S.entity_values(rows, by_entity, known)
        batch = [
            (entity, values[entity], known[entity], [rows[i].timestamp for i in idx])
            for entity, idx in by_entity.items()
        ]
        scored = await self._score_entities(batch, detectors)
        results: list[dict[str, Any]] = [
            {"entity": row.entity, "timestamp": row.timestamp, "detectors": {}} for row in rows
        ]
        for idx, per_detector in zip(by_entity.values(), scored):
            for name, (path, model, arrays) in per_detector.items():
                for i, row_out in zip(idx, S.result_rows(arrays, model=model, path=path)):
                    results[i]["detectors"][name] = row_out
        self._sum_up(results, detectors)
        return results

    def _sum_up(self, results: list[dict[str, Any]], detectors: list[str]) -> None:
        """Each result row's verdict over its detectors (flagged by any; the first incident probability), and
        the flagged rows counted per detector in the metrics."""
        anomalies = dict.fromkeys(detectors, 0)
        for row in results:
            flagged, probability = False, None
            for name, d in row["detectors"].items():
                if d["is_anomaly"]:
                    flagged = True
                    anomalies[name] += 1
                if probability is None:
                    probability = d.get("incident_probability")
            row["is_anomaly"], row["incident_probability"] = flagged, probability
        for name, count in anomalies.items():
            if count:
                self.m_anomalies.inc(count, tags={"detector": name})

    @api.post(S.FLEET_PATH, response_model=S.FleetResponse, openapi_extra=_json_body(S.FleetSnapshotRequest))
    async def score_fleet(self, body: bytes = Depends(_raw_body), client: str = Depends(_client)) -> Response:
        """A scrape's snapshot: one row per entity, many entities, one answer. Each row is checked on its own:
        a bad one is rejected by index with the field and the reason, and the others are scored."""
        started = time.perf_counter()
        request: S.FleetSnapshotRequest
        request, detectors, known = await self._scoring_request(S.FleetSnapshotRequest, body, client)
        accepted, where, rejected = S.fleet_rows(request, known)
        if not accepted:
            first = rejected[0]
            raise ApiError(422, first["field"], f"no row could be scored: {first['message']}")
        del request  # its raw rows: `accepted` holds the checked ones
        parts = await self._snapshot_parts(accepted, where, known, detectors)
        self._observe(S.FLEET_PATH, 200, started)
        body = b'{"results":[%s],"rejected":%s,"scored":%d}' % (b",".join(parts), to_json(rejected), len(accepted))
        return Response(content=body, media_type="application/json")

    async def _snapshot_parts(
        self, rows: list[S.TelemetryRow], where: list[int], known: dict[str, list[str]], detectors: list[str]
    ) -> list[bytes]:
        """A snapshot's answer rows as JSON (each part a list's items without its brackets), scored
        `snapshot_chunk` entities at a time with SNAPSHOT_STEPS_AT_ONCE steps under way: one chunk is planned
        or settled here while the detectors score another, and a chunk's short-lived objects (context rows,
        calls, answers, result dicts) are freed once its part is written. So a 10,000-entity snapshot never
        holds all of them at once: what it holds is what the ingress's heap keeps afterwards."""
        steps, size = asyncio.Semaphore(SNAPSHOT_STEPS_AT_ONCE), snapshot_chunk(len(rows))

        async def part(start: int) -> bytes:
            async with steps:
                chunk = slice(start, start + size)
                results = await self._score_snapshot(rows[chunk], known, detectors)
                for index, result in zip(where[chunk], results):
                    result["index"] = index
                return to_json(results)[1:-1]

        return await asyncio.gather(*(part(start) for start in range(0, len(rows), size)))

    # -- the fleet lane (serve/fleet_lane.py) -------------------------------------------------------------
    def _out_of_lane(self, entity: str) -> None:
        """Give the entity's state back to the per-entity objects before anything but the lane scores it."""
        if entity in self.lane:
            self.lane.release(entity, self.history, self.cold_starts, self.alerts)

    async def _score_snapshot(
        self, rows: list[S.TelemetryRow], known: dict[str, list[str]], detectors: list[str]
    ) -> list[dict[str, Any]]:
        """One step of a snapshot: its grown machines that fleet models score go through the fleet lane, a
        few array operations for all of them (`_score_in_lane`); the others entity by entity
        (`_score_rows`, which takes any of them out of the lane first). Results in the rows' order."""
        lanes, rest = await self._lane_rows(rows, known, detectors)
        # the lane's new rows go into its rings now, with no await since they were admitted: a request that
        # takes one of these machines out of the lane meanwhile would free (or another machine reuse) its slot
        plans = [(idx, self._lane_plan(key, [rows[i] for i in idx], slots)) for key, (idx, slots) in lanes.items()]
        out: list[dict[str, Any]] = [{}] * len(rows)

        async def by_entity(idx: list[int]) -> None:
            for i, result in zip(idx, await self._score_rows([rows[i] for i in idx], known, detectors)):
                out[i] = result

        async def in_lane(idx: list[int], plan: LanePlan) -> None:
            for i, result in zip(idx, await self._score_in_lane(plan)):
                out[i] = result

        jobs = [in_lane(idx, plan) for idx, plan in plans]
        if rest:
            jobs.append(by_entity(rest))
        await asyncio.gather(*jobs)
        return out

    async def _lane_rows(
        self, rows: list[S.TelemetryRow], known: dict[str, list[str]], detectors: list[str]
    ) -> tuple[dict[LaneKey, tuple[list[int], np.ndarray]], list[int]]:
        """The rows whose machines the lane scores, per lane (their indices and slots), and the rest."""
        infos = {name: await self._info(name) for name in detectors}
        own = [slot["entities"] for info in infos.values() for slot in info["slots"].values()]
        keys: dict[tuple[str, ...], LaneKey | None] = {}
        groups: dict[LaneKey, list[int]] = {}
        rest: list[int] = []
        for i, row in enumerate(rows):
            metrics = known[row.entity]
            schema = tuple(metrics)
            if any(row.entity in entities for entities in own):  # a model of its own in some slot
                rest.append(i)
                continue
            if schema not in keys:
                keys[schema] = self._lane_key(infos, row.entity, metrics)
            if keys[schema] is None:
                rest.append(i)
            else:
                groups.setdefault(keys[schema], []).append(i)
        lanes = {}
        for key, idx in groups.items():
            slots = self.lane.admit(key, [rows[i].entity for i in idx], self.history, self.cold_starts, self.alerts)
            taken = (slots >= 0).tolist()
            rest += [i for i, t in zip(idx, taken) if not t]
            if any(taken):
                lanes[key] = ([i for i, t in zip(idx, taken) if t], slots[slots >= 0])
        return lanes, sorted(rest)

    def _lane_key(self, infos: dict[str, dict], entity: str, metrics: list[str]) -> LaneKey | None:
        """The lane of a new entity with these metrics: the detectors whose champion scores it through the fleet
        model of its metrics. None where the lane does not go: no fleet model, or a detector with a
        challenger (an A/B split, a shadow) or a rollout under way, whose per-entity paths count each entity."""
        serving, fleet_scored, context = self._serving(infos, entity, metrics)
        if not fleet_scored:
            return None
        detectors = []
        for name, info in serving.items():
            champion = info["slots"]["champion"]
            key = self._model_key(champion, entity, metrics)
            if "challenger" in info["slots"] or self.traffic.get(name).step_key is not None:
                return None
            detectors.append((name, key, int(champion["entities"][key].get("context_rows", 64))))
        return LaneKey(tuple(metrics), tuple(detectors), self.history.keep_for(context))

    def _lane_plan(self, key: LaneKey, rows: list[S.TelemetryRow], slots: np.ndarray) -> LanePlan:
        """Take a lane's rows (admitted at `slots`) into its machines' rings: what its calls carry."""
        entities, timestamps = [row.entity for row in rows], [row.timestamp for row in rows]
        values = np.array([*map(itemgetter(*key.metrics), (row.metrics for row in rows))], dtype=np.float64)
        return self.lane.plan(key, entities, timestamps, slots, values.reshape(len(rows), len(key.metrics)))

    async def _score_in_lane(self, plan: LanePlan) -> list[dict[str, Any]]:
        """`_score_rows` of a lane's planned rows: one call per detector for all of them, judged as columns."""
        key, entities, timestamps = plan.store.key, plan.entities, plan.timestamps
        answers = await asyncio.gather(
            *(self._lane_call(plan, name, model_key) for name, model_key, _ in key.detectors)
        )
        live = self.lane.live(plan)
        results = [{"entity": e, "timestamp": ts, "detectors": {}} for e, ts in zip(entities, timestamps)]
        served_rows: dict[tuple[str, str], int] = {}
        alert_changes: dict[tuple[str, str], int] = {}
        for (name, model_key, _), answer in zip(key.detectors, answers):
            for judged in self._lane_verdicts(plan, name, answer, live):
                self._settle_lane(plan, name, model_key, judged, results)
                path = judged["path"]
                served_rows[name, path] = served_rows.get((name, path), 0) + len(judged["where"])
                for state, count in (("opened", judged["opened"]), ("closed", judged["closed"])):
                    if count:
                        alert_changes[name, state] = alert_changes.get((name, state), 0) + count
        self._sum_up(results, [name for name, _, _ in key.detectors])
        self._count_served(served_rows)
        self._count_alert_changes(alert_changes)
        self.m_alerts_firing.set(self.alerts.firing() + self.lane.firing())
        self.memory.after(len(entities))
        return results

    async def _lane_call(self, plan: LanePlan, name: str, model_key: str) -> Any:
        """One detector's call for a lane's chunk, built as columns (`serve.wire.packed`), a fleet model's rows
        as float32 deviations from each machine's centre (`detect.fleet.as_deviations`: half the bytes through
        Ray's object store); the packed answer, or None when the circuit held it back or the call failed (the
        baseline answers)."""
        breaker = self.breakers[(name, "champion")]
        if not breaker.allow():
            return None
        count, rows, stats_values = len(plan.entities), plan.rows[name], plan.stats_values
        if is_fleet_key(model_key):  # what the fleet model reads, in half the bytes
            rows, stats_values = as_deviations(rows, stats_values)
        payload = packed(
            count,
            {
                "entity": plan.entities,
                "path": ["champion"] * count,
                "rows": rows,
                "n_new": [1] * count,
                "model_key": [model_key] * count,
                "offset": plan.offsets[name].tolist(),
            },
            {"stats": [plan.stats_rows, stats_values]},
        )
        try:
            handle = self.handles[name] if name in self.settings.in_ingress else self._routed_to(name, model_key)
            answer = await handle.score_items.remote(payload)
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        ok = is_packed(answer) and all(full_column(answer, "ok") or [False])
        breaker.record(ok)
        if not ok:
            error = answer.get("error") if not is_packed(answer) else "some items failed"
            log.warning("model call failed", extra={"detector": name, "entities": len(plan.entities), "error": error})
        return answer if is_packed(answer) else None

    def _lane_verdicts(self, plan: LanePlan, name: str, answer: Any, live: np.ndarray) -> list[dict[str, Any]]:
        """What one detector served a lane's chunk, judged: per path ("champion" where the model answered,
        "fallback", the baseline, where it did not), the positions and their columns. Machines still in the
        lane are judged by it in one go (`FleetLane.judge`); one that left while the call was out is judged
        by the per-entity objects, as `_score_entities` judges it."""
        count, metrics = len(plan.entities), list(plan.store.key.metrics)
        columns = self._answer_columns(answer, count)
        if columns is not None:  # the usual answer: every machine's, as the columns it came in
            return [self._lane_judged(plan, name, "champion", np.arange(count), columns, live, metrics)]
        answered = self._lane_answers(answer, count)
        baseline = {"name": f"raywatch-{name}", "version": None, "variant": "baseline"}
        for i, found in enumerate(answered):
            if found is None:  # the baseline, from the machine's kept rows (its new row last)
                arrays = fallback_scores(self.lane.kept_rows(plan, i), 1, metrics)
                answered[i] = (arrays["scores"][0], arrays["threshold"], arrays["top"][0], arrays["top_values"][0])
                answered[i] += (None, baseline, 0)
        verdicts = []
        for path in ("champion", "fallback"):
            where = np.array([i for i, a in enumerate(answered) if (a[5] is baseline) == (path == "fallback")], int)
            if len(where):
                served = [answered[i] for i in where]
                columns = {
                    "scores": np.array([a[0] for a in served], dtype=np.float64),
                    "thresholds": np.array([a[1] for a in served], dtype=np.float64),
                    "top": np.array([a[2] for a in served]).reshape(len(where), -1),
                    "top_values": np.array([a[3] for a in served], dtype=np.float64).reshape(len(where), -1),
                    "probability": [a[4] for a in served],
                    "refs": [a[5] for a in served],
                    "half_life": served[0][6],
                }
                verdicts.append(self._lane_judged(plan, name, path, where, columns, live, metrics))
        return verdicts

    @staticmethod
    def _answer_columns(answer: Any, count: int) -> dict[str, Any] | None:
        """A packed answer's columns when every item was answered (`_lane_judged`'s input), else None."""
        arrays = None if answer is None else nested_items(answer, "arrays")
        scores = None if arrays is None else full_column(arrays, "scores")
        if not isinstance(scores, np.ndarray) or scores.shape != (count, 1):
            return None
        top, top_values = full_column(arrays, "top"), full_column(arrays, "top_values")
        probability = full_column(arrays, "probability")
        return {
            "scores": scores[:, 0].astype(np.float64),
            "thresholds": np.asarray(full_column(arrays, "threshold"), dtype=np.float64),
            "top": np.asarray(top)[:, 0],
            "top_values": np.asarray(top_values, dtype=np.float64)[:, 0],
            "probability": [None if p is None else float(p[0]) for p in probability]
            if probability is not None
            else [None] * count,
            "refs": shared_items(nested_items(answer, "model"), count),
            "half_life": (full_column(arrays, "attribution_half_life_rows") or [0])[0] or 0,
        }

    @staticmethod
    def _lane_answers(answer: Any, count: int) -> list[tuple | None]:
        """Per item of a packed answer that is not every item's (`_answer_columns`): (score, threshold, top,
        top_values, probability, model ref, attribution half-life), or None where the model gave none."""
        if answer is None:
            return [None] * count
        out: list[tuple | None] = []
        for item in unpack(answer):
            arrays = item.get("arrays") if item.get("ok") else None
            if arrays is None:
                out.append(None)
                continue
            probability = arrays.get("probability")
            out.append(
                (
                    float(np.asarray(arrays["scores"])[0]),
                    float(arrays["threshold"]),
                    np.asarray(arrays["top"])[0],
                    np.asarray(arrays["top_values"])[0],
                    None if probability is None else float(np.asarray(probability)[0]),
                    item["model"],
                    arrays.get("attribution_half_life_rows") or 0,
                )
            )
        return out

    def _lane_judged(
        self,
        plan: LanePlan,
        name: str,
        path: str,
        where: np.ndarray,
        columns: dict[str, Any],
        live: np.ndarray,
        metrics: list[str],
    ) -> dict[str, Any]:
        """Judge what was served (`columns`: `_answer_columns`' keys) to the plan's machines at `where` along
        `path`."""
        count, scores, given = len(where), columns["scores"], columns["thresholds"]
        top, top_values, half_life = columns["top"].copy(), columns["top_values"].copy(), columns["half_life"]
        out = {
            "path": path,
            "where": where,
            "scores": scores,
            "thresholds": given.copy(),
            "top": top,
            "top_values": top_values,
            "probability": columns["probability"],
            "refs": columns["refs"],
            "alerts": [None] * count,
            "opened": 0,
            "closed": 0,
        }
        own_threshold = path == "champion"
        in_lane = np.flatnonzero(live[where])
        if len(in_lane):
            timestamps = [plan.timestamps[i] for i in where[in_lane].tolist()]
            thresholds, held, held_values, alerts, opened, closed = self.lane.judge(
                plan,
                name,
                where[in_lane],
                scores[in_lane],
                given[in_lane],
                top[in_lane],
                top_values[in_lane],
                half_life,
                metrics,
                timestamps,
                own_threshold,
            )
            out["thresholds"][in_lane], out["top"][in_lane], out["top_values"][in_lane] = thresholds, held, held_values
            for k, alert in zip(in_lane.tolist(), alerts):
                out["alerts"][k] = alert
            out["opened"], out["closed"] = opened, closed
        for k in np.flatnonzero(~live[where]).tolist():  # left the lane while the call was out
            i, entity = int(where[k]), plan.entities[int(where[k])]
            arrays = {
                "scores": scores[k : k + 1],
                "threshold": float(given[k]),
                "probability": None,
                "top": top[k : k + 1],
                "top_values": top_values[k : k + 1],
                "metrics": metrics,
                "attribution_half_life_rows": half_life,
            }
            if own_threshold:
                arrays["threshold"] = self.cold_starts.threshold(name, entity, arrays["scores"], arrays["threshold"])
            alerts, threshold = self.alerts.observe(name, entity, arrays, [plan.timestamps[i]])
            out["thresholds"][k], out["alerts"][k] = float(threshold), alerts[0]
            out["top"][k], out["top_values"][k] = arrays["top"][0], arrays["top_values"][0]
            state = alerts[0] and alerts[0]["state"]
            if state in ("opened", "closed"):
                out[state] += 1
        return out

    def _settle_lane(self, plan: LanePlan, name: str, model_key: str, judged: dict[str, Any], results: list) -> None:
        """Write a detector's judged columns into the chunk's result rows and hand them to its drift monitor."""
        where, scores, thresholds = judged["where"], judged["scores"], judged["thresholds"]
        path, metrics = judged["path"], plan.store.key.metrics
        flagged = scores >= thresholds
        names = np.array(metrics, dtype=object)[judged["top"]].tolist()
        at = where.tolist()
        for k, (i, score, threshold, flag, top, values) in enumerate(
            zip(
                at,
                scores.tolist(),
                thresholds.tolist(),
                flagged.tolist(),
                names,
                judged["top_values"].tolist(),
            )
        ):
            results[i]["detectors"][name] = {
                "anomaly_score": score,
                "threshold": threshold,
                "is_anomaly": flag,
                "incident_probability": judged["probability"][k],
                "top_metrics": [{"metric": m, "contribution": c} for m, c in zip(top, values)],
                "alert": judged["alerts"][k],
                "model": judged["refs"][k],
                "path": path,
            }
        count = len(where)
        self.monitor_feed.offer(
            name,
            ServedColumns(
                [plan.entities[i] for i in at],
                [plan.timestamps[i] for i in at],
                plan.values[where],
                scores,
                flagged & (path == "champion"),
                [path] * count,
                [model_key] * count,
            ),
        )

    async def _score_entities(
        self, batch: list[tuple[str, np.ndarray, list[str], list]], detectors: list[str]
    ) -> list[dict[str, tuple[str, dict, dict[str, Any]]]]:
        """Score each entity's new rows ((entity, rows in the model's metric order, metrics, timestamps)) with
        each detector that serves it, after the entity's history (which they join); feed what was served to
        the drift monitors and the alert book. Per entity, per detector: (path, model ref, arrays). A new
        entity is served by the detectors with a fleet model of its metrics. One planning pass, the calls
        (gathered per detector for a snapshot of many entities), then one pass over the answers."""
        for entity, *_ in batch:
            self._out_of_lane(entity)
        infos = {name: await self._info(name) for name in detectors}
        policies = {name: self.traffic.get(name) for name in detectors}  # one read per request, not per entity
        slots = [slot["entities"] for info in infos.values() for slot in info["slots"].values()]
        by_schema: dict[str, tuple[dict[str, dict], bool, int]] = {}  # an entity without a model of its own
        planned: list[tuple[np.ndarray, list[_Planned]]] = []
        for entity, new, metrics, _ in batch:
            if any(entity in entities for entities in slots):  # a model of its own in some slot
                serving, fleet_scored, context = self._serving(infos, entity, metrics)
            else:  # what serves it depends on its metrics only: found once per schema in a snapshot
                schema = fleet_key(metrics)
                if schema not in by_schema:
                    by_schema[schema] = self._serving(infos, entity, metrics)
                serving, fleet_scored, context = by_schema[schema]
            place = self.cold_starts.admit(entity, new) if fleet_scored else None  # its statistics and place
            rows = self.history.context_and_new(entity, new, context)
            plans = [
                self._plan(name, info, entity, rows, len(new), metrics, place, policies[name], len(batch) == 1)
                for name, info in serving.items()
            ]
            planned.append((rows, plans))
        started = time.perf_counter()
        flat = [plan for _, plans in planned for plan in plans]
        results = iter(await self._results(flat, gather=len(batch) == 1))
        served = ServedColumnsBuilder()  # for the drift monitors: one set of columns per model, not a dict per row
        served_rows: dict[tuple[str, str], int] = {}  # (detector, path served) -> rows
        alert_changes: dict[tuple[str, str], int] = {}  # (detector, "opened" | "closed") -> alerts
        out, observed = [], []  # per entity, per detector: what was served; the alert book's calls, in order
        for (entity, new, metrics, timestamps), (rows, plans) in zip(batch, planned):
            scored = {}
            for plan in plans:
                path, ref, arrays = scored[plan.name] = self._settle(
                    plan, next(results), rows, timestamps, metrics, started
                )
                served_rows[plan.name, path] = served_rows.get((plan.name, path), 0) + len(new)
                if "model_key" in plan.item and path != "fallback":  # a new entity: its own threshold, once learnt
                    arrays["threshold"] = self.cold_starts.threshold(
                        plan.name, entity, arrays["scores"], arrays["threshold"]
                    )
                spot = self._served_spot(infos[plan.name], plan, path, ref)
                observed.append((plan.name, entity, arrays, timestamps, spot))
            out.append(scored)
        book = iter(self.alerts.observe_many(observed))  # a snapshot's held attribution in one pass
        for (entity, new, _, timestamps), (_, plans), scored in zip(batch, planned, out):
            for plan in plans:
                path, _, arrays = scored[plan.name]
                arrays["alerts"], arrays["threshold"] = next(book)
                thresholds = S.row_thresholds(arrays)
                served.add(
                    plan.name, entity, timestamps, new, path, arrays["scores"], thresholds, plan.item.get("model_key")
                )
                _tally_alert_changes(alert_changes, plan.name, arrays["alerts"])
        for model, rows in served.batches():
            self.monitor_feed.offer(model, rows)
        self._count_served(served_rows)
        self._count_alert_changes(alert_changes)
        self.m_alerts_firing.set(self.alerts.firing() + self.lane.firing())  # once per request, not per entity
        self.memory.after(sum(len(new) for _, new, _, _ in batch))
        return out

    @staticmethod
    def _served_spot(info: dict[str, Any], plan: _Planned, path: str, ref: dict[str, Any]) -> SpotSeed | None:
        """Where the served rows' threshold starts from: the SPOT state the entity's own model was saved with
        (detect/thresholds.py). None for the fallback, a fleet model's new entity (its own threshold is
        `ColdStarts.threshold`) and a model saved without one: those rows are judged against the stored one."""
        if path == "fallback" or "model_key" in plan.item:
            return None
        state = info["slots"].get(path, {}).get("entities", {}).get(plan.entity, {}).get("spot")
        return SpotSeed((path, ref.get("version"), ref.get("variant")), state) if state else None

    def _count_served(self, served_rows: dict[tuple[str, str], int]) -> None:
        """One request's rows served, per (detector, path): a metric update each, not one per entity (a Ray
        metric's `inc` costs about 10 us, a tenth of what a snapshot's entity costs the ingress)."""
        for (detector, path), rows in served_rows.items():
            if path == "fallback":
                self.m_fallbacks.inc(rows, tags={"detector": detector})
            else:
                self.m_rows.inc(rows, tags={"detector": detector, "path": path})

    def _count_alert_changes(self, changes: dict[tuple[str, str], int]) -> None:
        """One request's alerts opened and closed, per detector: a metric update each, as `_count_served`."""
        for (detector, transition), count in changes.items():
            self.m_alerts.inc(count, tags={"detector": detector, "transition": transition})

    @api.post("/v1/score/batch", response_model=S.ScoreBatchResponse, openapi_extra=_json_body(S.ScoreBatchRequest))
    async def score_batch(self, body: bytes = Depends(_raw_body), client: str = Depends(_client)) -> Response:
        """One entity's rows as a matrix (`ScoreBatchRequest`), answered column-wise: the bulk path."""
        started = time.perf_counter()
        request: S.ScoreBatchRequest
        request, detectors, known = await self._scoring_request(S.ScoreBatchRequest, body, client)
        metrics = known.get(request.entity)
        if metrics is None:
            raise ApiError(422, "entity", f"unknown entity {request.entity!r}; served entities: {sorted(known)[:20]}")
        try:
            new = S.batch_values(request, metrics)
        except S.FieldError as exc:
            raise ApiError(422, exc.field, exc.message) from None
        timestamps = request.timestamps or [None] * len(new)
        scored = (await self._score_entities([(request.entity, new, metrics, timestamps)], detectors))[0]
        out = S.batch_result(request.entity, request.timestamps, scored)
        for name, columns in out["detectors"].items():
            count = sum(columns["is_anomaly"])
            if count:
                self.m_anomalies.inc(count, tags={"detector": name})
        self._observe("/v1/score/batch", 200, started)
        return Response(content=to_json(out), media_type="application/json")

    @api.post("/v1/forecast")
    async def forecast(self, request: S.ForecastRequest, client: str = Depends(_client)) -> dict[str, Any]:
        await self._limit(client)
        known, _ = await self._entity_metrics([FORECASTER])
        metrics = known.get(request.entity)
        if metrics is None:
            raise ApiError(422, "entity", f"unknown entity {request.entity!r} for the {FORECASTER} forecaster")
        self._out_of_lane(request.entity)
        hist = self.history.of(request.entity)
        for i, row in enumerate(request.rows):
            if row.entity != request.entity:
                raise ApiError(422, f"rows[{i}].entity", f"must be {request.entity!r}, the entity forecast")
            if set(row.metrics) != set(metrics):
                raise ApiError(422, f"rows[{i}].metrics", "metrics differ from the model's")
            hist.append(np.array([row.metrics[m] for m in metrics], dtype=np.float64))
        if not hist:
            raise ApiError(422, "rows", f"no history for entity {request.entity!r}: send recent samples in rows")
        try:
            out = await self.handles[FORECASTER].forecast.remote(
                request.entity, np.asarray(hist).tolist(), request.horizon
            )
        except Exception as exc:
            raise ApiError(503, FORECASTER, f"forecaster unavailable: {exc}") from exc
        return {
            "entity": request.entity,
            "horizon": request.horizon,
            "model": out["model"],
            "forecast": [dict(zip(out["metrics"], step)) for step in out["steps"]],
        }

    @api.post("/v1/feedback", status_code=201)
    async def feedback(
        self,
        request: S.FeedbackRequest,
        client: str = Depends(_client),
        authorization: str | None = Header(default=None),
    ) -> dict[str, Any]:
        """Store an incident label. With an admin key it is trusted (retraining learns from it and promotion
        weighs it); without one, `feedback_auth` decides: stored as untrusted (ignored by both), or refused."""
        await self._limit(client)
        trusted = feedback_trusted(authorization, self.settings.feedback_auth, self.admin_keys_file)
        feedback_id = await asyncio.to_thread(
            self.store.add_feedback, request.entity, request.timestamp, request.label, request.detector, trusted
        )
        return {"id": feedback_id, "stored": True, "trusted": trusted}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        out = {}
        for name in S.DETECTORS:
            info = await self._info(name, force=True)
            out[name] = {
                "slots": {
                    alias: {k: v for k, v in slot.items() if k != "entities"} | {"entities": sorted(slot["entities"])}
                    for alias, slot in info.get("slots", {}).items()
                },
                "traffic": {
                    "challenger_percent": self.traffic.get(name).challenger_percent,
                    "shadow": self.traffic.get(name).shadow,
                    "shadow_rows": self.shadow_stats[name]["rows"],
                    "shadow_disagreements": self.shadow_stats[name]["disagreements"],
                },
                "circuit": self.breakers[(name, "champion")].state,
                "challenger_circuit": self.breakers[(name, "challenger")].state,
                "rollout": await asyncio.to_thread(self.rollouts.get, name),
                "load_error": info.get("load_error"),
                # the model keys loaded in the replica that answered (Serve's multiplexed LRU), and its bound
                "models_held": info.get("models_held", []),
                "model_capacity": info.get("model_capacity"),
                "model_ids_report_s": info.get("model_ids_report_s"),  # how stale the routers' view of it can be
                "single_rows": self._single_rows_where(name),  # in the replica that answered
                "retraining": (await asyncio.to_thread(self.store.decisions, name, 1) or [None])[0],
            }
        # the replica that answered: machines whose state its fleet lane holds (serve/fleet_lane.py)
        lane = {"machines": len(self.lane), "alerts_firing": self.lane.firing()}
        return {"models": out, "fleet_lane": lane, "replica": serve.get_replica_context().replica_id.unique_id}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        ready = {name: "champion" in (await self._info(name, force=True)).get("slots", {}) for name in S.DETECTORS}
        status = 200 if any(ready.values()) else 503
        return JSONResponse(status_code=status, content={"ready": status == 200, "detectors": ready})

    # -- admin -----------------------------------------------------------------------------------------------
    def _admin_request(self, model: type[BaseModel], body: bytes, authorization: str | None) -> Any:
        """The key first, then the body: without a valid key the answer is 401/403, whatever was sent."""
        check_admin(authorization, self.admin_keys_file)
        return _parse(model, body)

    async def _registry_call(self, fn, *args):
        registry = _registry()
        try:
            return await asyncio.to_thread(fn, *args)
        except registry.RegistryError as exc:
            raise ApiError(404, "version", str(exc)) from exc
        except Exception as exc:  # the registry itself is unreachable
            raise ApiError(503, "registry", f"model registry unavailable: {type(exc).__name__}: {exc}") from exc

    async def _reload(self, name: str) -> dict[str, Any]:
        versions = await self.handles[name].reload.remote()
        if name in self.local and self.local[name] is not self.handles[name]:  # its single-row models too,
            await asyncio.to_thread(self.local[name].server.reload)  # off the event loop, where they load
        await self._info(name, force=True)
        return versions

    @api.post("/v1/admin/promote", openapi_extra=_json_body(S.PromoteRequest))
    async def promote(
        self, body: bytes = Depends(_raw_body), authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        request: S.PromoteRequest = self._admin_request(S.PromoteRequest, body, authorization)
        out = await self._registry_call(_registry().promote, request.model, request.version)
        return {**out, "serving": await self._reload(request.model)}

    @api.post("/v1/admin/rollback", openapi_extra=_json_body(S.RollbackRequest))
    async def rollback(
        self, body: bytes = Depends(_raw_body), authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        request: S.RollbackRequest = self._admin_request(S.RollbackRequest, body, authorization)
        out = await self._registry_call(_registry().rollback, request.model)
        return {**out, "serving": await self._reload(request.model)}

    @api.post("/v1/admin/traffic", openapi_extra=_json_body(S.TrafficRequest))
    async def traffic(
        self, body: bytes = Depends(_raw_body), authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        request: S.TrafficRequest = self._admin_request(S.TrafficRequest, body, authorization)
        rollout = await asyncio.to_thread(self.rollouts.in_progress, request.model)
        if rollout:
            raise ApiError(
                409, "model", f"a rollout of version {rollout['version']} drives the traffic; abort it first"
            )
        if request.challenger_version is not None:
            registry = _registry()
            await self._registry_call(
                registry.set_alias, request.model, registry.CHALLENGER, request.challenger_version
            )
        serving = await self._reload(request.model)
        if (request.challenger_percent > 0 or request.shadow) and serving.get("challenger") is None:
            raise ApiError(409, "challenger_version", f"{request.model} has no challenger: set challenger_version")
        # stored before the answer: every replica's next request follows it, and so does a restarted replica
        await asyncio.to_thread(
            self.traffic.set, request.model, TrafficPolicy(request.challenger_percent, request.shadow)
        )
        return {
            "model": request.model,
            "challenger_percent": request.challenger_percent,
            "shadow": request.shadow,
            "serving": serving,
        }

    @api.post("/v1/admin/rollout", openapi_extra=_json_body(S.RolloutRequest))
    async def rollout(
        self, body: bytes = Depends(_raw_body), authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        """Roll `version` out as a canary through the plan's steps (serve/rollout.py): rolled back by itself
        on a breached guard, promoted at 100%."""
        request: S.RolloutRequest = self._admin_request(S.RolloutRequest, body, authorization)
        registry = _registry()
        running = await asyncio.to_thread(self.rollouts.in_progress, request.model)
        if running:
            raise ApiError(409, "model", f"a rollout of version {running['version']} is in progress; abort it first")
        champion = await self._registry_call(registry.alias_version, request.model, registry.CHAMPION)
        if champion == request.version:
            raise ApiError(409, "version", f"version {request.version} is already the champion")
        await self._registry_call(registry.set_alias, request.model, registry.CHALLENGER, request.version)
        serving = await self._reload(request.model)
        if serving.get("challenger") != request.version:
            raise ApiError(409, "version", f"version {request.version} did not load as the challenger: {serving}")
        try:
            state = await asyncio.to_thread(self.rollouts.start, request.model, request.version, request.plan)
        except ValueError as exc:
            raise ApiError(409, "model", str(exc)) from None
        try:  # marked as the loop's rollouts are: a retraining job then leaves the slot to it (`rollout_in_progress`)
            await asyncio.to_thread(registry.mark_rollout, request.model, request.version, "started")
        except Exception as exc:  # the rollout runs all the same; say what a job will not see
            log.warning("rollout not marked in the registry", extra={"detector": request.model, "error": str(exc)})
        self.m_rollout_percent.set(state["percent"], tags={"detector": request.model})
        log.info("rollout started", extra={"detector": request.model, "version": request.version})
        return state

    @api.post("/v1/admin/rollout/abort", openapi_extra=_json_body(S.RollbackRequest))
    async def abort_rollout(
        self, body: bytes = Depends(_raw_body), authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        """Stop a rollout: all traffic back to the champion at once, the challenger slot emptied."""
        request: S.RollbackRequest = self._admin_request(S.RollbackRequest, body, authorization)
        state = await asyncio.to_thread(self.rollouts.finish, request.model, "aborted", "aborted by an operator")
        if state is None:
            raise ApiError(409, "model", f"{request.model} has no rollout in progress")
        await self._drop_challenger(request.model, state["version"])
        self.m_rollout.inc(tags={"detector": request.model, "action": "aborted"})
        self.m_rollout_percent.set(0.0, tags={"detector": request.model})
        return state

    @api.post("/v1/admin/baseline", openapi_extra=_json_body(S.BaselineRequest))
    async def baseline(
        self, body: bytes = Depends(_raw_body), authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        """Make the entity's recent served samples the drift reference for this model: the newest rows the
        monitors kept (up to BASELINE_ROWS), else the ingress's short history."""
        request: S.BaselineRequest = self._admin_request(S.BaselineRequest, body, authorization)
        kept = await asyncio.to_thread(self.store.observations, request.model, request.entity, 0, BASELINE_ROWS)
        self._out_of_lane(request.entity)
        hist = kept["values"] if len(kept["values"]) >= 10 else np.asarray(self.history.peek(request.entity) or ())
        if len(hist) < 10:
            raise ApiError(409, "entity", f"need at least 10 recent samples of {request.entity!r} to set a baseline")
        reference_id = await asyncio.to_thread(
            self.store.set_reference, request.model, request.entity, np.asarray(hist).tolist()
        )
        # the running monitor, whichever replica created it (a monitor that starts later reads the stored reset)
        from monitoring import monitor as monitors  # deferred: see _deliver_to_monitor

        monitor = self.monitors.get(request.model) or await asyncio.to_thread(monitors.find, request.model)
        applied = "stored; the monitor reads it when it starts"
        if monitor is not None:
            try:
                await monitor.reset_reference.remote(request.entity)
                applied = "applied by the running monitor"
            except Exception as exc:  # stored but not applied: the caller must know, and may retry
                raise ApiError(503, "monitor", f"reference stored but the monitor did not apply it: {exc}") from exc
        return {
            "model": request.model,
            "entity": request.entity,
            "rows": len(hist),
            "reference_id": reference_id,
            "monitor": applied,
        }


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Application builder for `serve run serve.app:build_app` and serve/config.yaml."""
    # deferred: the ingress replicas import this module, and the detector deployments pull in torch and
    # ONNX Runtime, which only the detector replicas need
    from serve.detectors import detector_deployments

    args = dict(args or {})
    settings = ServeSettings.from_app_args(args)
    tracking_uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        tracking_uri = _registry().tracking_uri()
    state_dir = args.get("state_dir") or os.environ.get("RAYWATCH_STATE_DIR") or os.path.join(os.getcwd(), ".raywatch")
    reload_s = float(args.get("reload_interval_s", 1.0))
    # max_batch_size: the detectors' @serve.batch size (64); 1 turns their batching off
    batch = {"max_batch_size": int(args["max_batch_size"])} if args.get("max_batch_size") else {}
    detector_args = {"reload_interval_s": reload_s, **batch}
    handles = {
        name: dep.bind(tracking_uri=tracking_uri, settings=settings, **detector_args)
        for name, dep in detector_deployments(settings).items()
    }
    keys_file = args.get("admin_keys_file") or os.environ.get(KEYS_FILE_ENV)
    rate_limit = RateLimit.from_config(args.get("rate_limit"))  # a bad setting fails here, not in every replica
    ingress = RaywatchAPI.options(
        num_replicas=settings.ingress_replicas, logging_config={"enable_access_log": settings.ingress_access_log}
    )
    return ingress.bind(
        handles,
        tracking_uri=tracking_uri,
        state_dir=state_dir,
        admin_keys_file=keys_file,
        breaker_cooldown_s=float(args.get("breaker_cooldown_s", 10.0)),
        monitor=args.get("monitor"),
        rate_limit=rate_limit,
        body_timeout_s=args.get("body_timeout_s"),
        settings=settings,
        detector_args=detector_args,
    )
