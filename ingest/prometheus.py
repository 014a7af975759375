"""Prometheus as a telemetry source: a YAML source config, an HTTP API client, and the frames it yields.

A source config maps each model metric to a PromQL expression that returns one series per entity,
named by a label (`instance` for node_exporter), and fixes the step of the grid the metrics are read
on. `cluster/prometheus/source.example.yaml` is the shipped example for node_exporter::

    name: node                      # entity ids are <name>/<label value>, e.g. node/host-a:9100
    url: http://127.0.0.1:9090
    step: 15s                       # the scrape interval (or a multiple of it)
    entity_label: instance
    rate_window: 1m                 # substituted for $rate_window in the queries
    metrics:
      cpu_user: avg by ($entity_label) (rate(node_cpu_seconds_total{mode="user"}[$rate_window]))
      mem_available_bytes: max by ($entity_label) (node_memory_MemAvailable_bytes)

History comes through `/api/v1/query_range`, in time chunks small enough that no query asks for more
than `max_points` (10,000; Prometheus refuses over 11,000) points per series, retried with
exponential backoff on network errors, 429/5xx and Prometheus timeouts, with a tqdm progress bar.
The result is the frame `detect.data.load_telemetry` returns (`timestamp`, `entity`, then the metric
columns, float64, sorted by entity and time), on the step grid (timestamps are multiples of the
step), so the batch path (training) and the live path (`ingest/watch.py`) read identical rows.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import pandas as pd

from detect.data import Series, TelemetryError, rows_per_day_at, validate_values

log = logging.getLogger(__name__)

MAX_POINTS = 10_000  # per series per query; Prometheus' own limit is 11,000
ENTITY_CHARS = re.compile(r"[^A-Za-z0-9_.:/@-]")  # what the serving API accepts in an entity id
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SourceError(TelemetryError):
    """A source config that cannot be used; the message names the file and the field."""


class PrometheusError(RuntimeError):
    """Prometheus refused a query or could not be reached after the retries."""


def parse_duration(value: Any, field_name: str = "duration") -> float:
    """Seconds from a number or a Prometheus duration string ("15s", "1m30s", "6h", "500ms")."""
    if isinstance(value, bool):
        raise SourceError(f"{field_name}: expected a duration like 15s or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise SourceError(
                    f"{field_name}: {value!r} is not a duration (use e.g. 500ms, 15s, 5m, 6h, 1d, 1h30m)"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise SourceError(f"{field_name}: expected a duration like 15s or a number of seconds, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise SourceError(f"{field_name}: must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """A PromQL duration for `seconds` (whole milliseconds)."""
    ms = max(1, int(round(seconds * 1000)))
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class MetricQuery:
    """One model metric: its name, the PromQL that yields it (templates filled in), the entity label."""

    name: str
    query: str
    entity_label: str


@dataclass
class PrometheusSource:
    """A parsed, validated source config (see the module docstring for the file layout)."""

    url: str
    step: float
    metrics: list[MetricQuery]
    entity_label: str = "instance"
    name: str = "prometheus"
    rate_window: str = "1m"
    entities: list[str] | None = None  # label values to keep; None: every entity the queries return
    timeout: float = 30.0
    retries: int = 4
    max_points: int = MAX_POINTS
    headers: dict[str, str] = field(default_factory=dict)
    watch: dict[str, Any] = field(default_factory=dict)  # validated by ingest.watch.WatchSettings
    alerts: dict[str, Any] = field(default_factory=dict)  # validated by ingest.alerts.AlertSettings
    origin: str = "<source>"  # the file it came from, for messages

    @property
    def metric_names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def entity_id(self, label_value: str) -> str:
        """The entity id raywatch trains and serves under: `<name>/<label value>` (characters the
        serving API refuses become `_`)."""
        return f"{self.name}/{ENTITY_CHARS.sub('_', label_value)}"[:128]

    def owns(self, entity_id: str) -> bool:
        return entity_id.startswith(f"{self.name}/")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `load_source` turns back into this source (for Ray actors)."""
        return {
            "origin": self.origin,
            "name": self.name,
            "url": self.url,
            "step": self.step,
            "entity_label": self.entity_label,
            "rate_window": self.rate_window,
            "entities": self.entities,
            "timeout": self.timeout,
            "retries": self.retries,
            "max_points": self.max_points,
            "headers": dict(self.headers),
            "metrics": {m.name: {"query": m.query, "entity_label": m.entity_label} for m in self.metrics},
            "watch": dict(self.watch),
            "alerts": dict(self.alerts),
        }


_KNOWN = {
    "name",
    "url",
    "step",
    "entity_label",
    "rate_window",
    "entities",
    "timeout",
    "retries",
    "max_points",
    "headers",
    "bearer_token_file",
    "metrics",
    "watch",
    "alerts",
}


def load_source(config: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> PrometheusSource:
    """Read and validate a source config (a YAML path or an already-parsed dict).

    Every error is a `SourceError` that names the file and the field, e.g.
    `prometheus.yaml: metrics.cpu_user: must be a PromQL string or a mapping with 'query'`.
    """
    import yaml

    if isinstance(config, dict):
        data = dict(config)
        origin = str(data.pop("origin", "<source>"))  # to_dict() of a source read from a file
    else:
        path = Path(config)
        origin = str(path)
        if not path.exists():
            raise SourceError(f"{origin}: source config not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SourceError(f"{origin}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise SourceError(f"{origin}: expected a mapping at the top level (url, step, metrics, ...)")
    data.update(overrides or {})

    def fail(field_name: str, message: str) -> SourceError:
        return SourceError(f"{origin}: {field_name}: {message}")

    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise fail(unknown[0], f"unknown field; known fields are {sorted(_KNOWN)}")
    url = data.get("url")
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise fail("url", f"expected the Prometheus base URL like http://127.0.0.1:9090, got {url!r}")
    if "step" not in data:
        raise fail("step", "required: the scrape interval (or a multiple of it), e.g. 15s")
    step = parse_duration(data["step"], f"{origin}: step")
    if step < 0.001:
        raise fail("step", "must be at least 1ms")
    name = data.get("name", "prometheus")
    if not isinstance(name, str) or not _NAME.match(name) or "/" in name:
        raise fail("name", f"expected a short name of letters, digits, _ . - (it prefixes entity ids), got {name!r}")
    entity_label = data.get("entity_label", "instance")
    if not isinstance(entity_label, str) or not _LABEL.match(entity_label):
        raise fail("entity_label", f"expected a Prometheus label name like instance, got {entity_label!r}")
    rate_window = data.get("rate_window")
    if rate_window is None:
        rate_window = format_duration(max(4 * step, 60.0 if step >= 15 else 4 * step))
    else:
        rate_window = format_duration(parse_duration(rate_window, f"{origin}: rate_window"))
    entities = data.get("entities")
    if entities is not None and (
        not isinstance(entities, list) or not entities or not all(isinstance(e, str) and e for e in entities)
    ):
        raise fail("entities", "expected a non-empty list of label values (or leave it out for every entity)")
    timeout = parse_duration(data.get("timeout", 30), f"{origin}: timeout")
    retries = data.get("retries", 4)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 20:
        raise fail("retries", f"expected an integer 0..20, got {retries!r}")
    max_points = data.get("max_points", MAX_POINTS)
    if not isinstance(max_points, int) or isinstance(max_points, bool) or not 2 <= max_points <= 11_000:
        raise fail("max_points", f"expected an integer 2..11000 (Prometheus' limit is 11,000), got {max_points!r}")
    headers = data.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise fail("headers", "expected a mapping of header names to strings")
    headers = dict(headers)
    token_file = data.get("bearer_token_file")
    if token_file is not None:
        token_path = Path(str(token_file)).expanduser()
        if not token_path.is_file():
            raise fail("bearer_token_file", f"{token_path} is not a readable file")
        headers["Authorization"] = f"Bearer {token_path.read_text().strip()}"
    for section in ("watch", "alerts"):
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise fail(section, "expected a mapping")

    raw_metrics = data.get("metrics")
    if not isinstance(raw_metrics, dict) or not raw_metrics:
        raise fail("metrics", "required: a mapping of model metric names to PromQL expressions")
    metrics = []
    for metric, spec in raw_metrics.items():
        where = f"metrics.{metric}"
        if not isinstance(metric, str) or not _NAME.match(metric):
            raise fail(where, "metric names are letters, digits, _ . - and start with a letter or _")
        label = entity_label
        if isinstance(spec, dict):
            extra = sorted(set(spec) - {"query", "entity_label"})
            if extra:
                raise fail(f"{where}.{extra[0]}", "unknown field; a metric has 'query' and optionally 'entity_label'")
            label = spec.get("entity_label", entity_label)
            if not isinstance(label, str) or not _LABEL.match(label):
                raise fail(f"{where}.entity_label", f"expected a Prometheus label name, got {label!r}")
            spec = spec.get("query")
        if not isinstance(spec, str) or not spec.strip():
            raise fail(where, "must be a PromQL string or a mapping with 'query'")
        # safe_substitute: a `$` of a regex matcher stays as written
        query = Template(spec).safe_substitute(rate_window=rate_window, entity_label=label, step=format_duration(step))
        metrics.append(MetricQuery(metric, " ".join(query.split()), label))
    return PrometheusSource(
        url=url.rstrip("/"),
        step=step,
        metrics=metrics,
        entity_label=entity_label,
        name=name,
        rate_window=rate_window,
        entities=entities,
        timeout=timeout,
        retries=retries,
        max_points=max_points,
        headers=headers,
        watch=dict(data.get("watch") or {}),
        alerts=dict(data.get("alerts") or {}),
        origin=origin,
    )


# -- the HTTP API client ---------------------------------------------------------------------------------
class PrometheusClient:
    """`/api/v1/query_range` and `/api/v1/query`, retried with exponential backoff.

    Retried: connection errors, HTTP 429 and 5xx, and Prometheus' own `timeout` / `canceled` /
    `unavailable` errors. Not retried: a query Prometheus refuses (bad PromQL, too many points), which
    raises `PrometheusError` with Prometheus' message.
    """

    RETRY_ERRORS = {"timeout", "canceled", "unavailable", "internal"}

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        headers: dict[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers or {})
        self.requests = 0  # HTTP requests made (retries included)

    @classmethod
    def for_source(cls, source: PrometheusSource, **kwargs: Any) -> PrometheusClient:
        return cls(source.url, timeout=source.timeout, retries=source.retries, headers=source.headers, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, path: str, params: dict[str, Any], what: str) -> Any:
        import httpx

        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            self.requests += 1
            try:
                response = self._http.post(path, data=params)  # a form body: no URL length limit
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            try:
                body = response.json()
            except ValueError:
                body = {}
            if response.status_code == 200 and body.get("status") == "success":
                return body["data"]
            error_type, error = body.get("errorType", f"http {response.status_code}"), body.get("error")
            last = f"{error_type}: {error or response.text[:300]}"
            if response.status_code in (429,) or response.status_code >= 500 or error_type in self.RETRY_ERRORS:
                continue
            raise PrometheusError(f"{self.url}{path} refused {what}: {last}")
        raise PrometheusError(f"{self.url}{path}: {what} failed after {self.retries + 1} attempts ({last})")

    def query_range(self, query: str, start: float, end: float, step: float, what: str = "the query") -> list[dict]:
        """Matrix result: [{"metric": {labels}, "values": [[ts, "value"], ...]}, ...]."""
        params = {"query": query, "start": _fmt_ts(start), "end": _fmt_ts(end), "step": _fmt_step(step)}
        data = self._call("/api/v1/query_range", params, what)
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"{what}: expected a range vector result, got {data.get('resultType')!r}")
        return data["result"]

    def query(self, query: str, at: float | None = None, what: str = "the query") -> list[dict]:
        """Instant vector: [{"metric": {labels}, "value": [ts, "value"]}, ...]."""
        params = {"query": query} | ({"time": _fmt_ts(at)} if at is not None else {})
        data = self._call("/api/v1/query", params, what)
        if data.get("resultType") != "vector":
            raise PrometheusError(f"{what}: expected an instant vector, got {data.get('resultType')!r}")
        return data["result"]

    def ready(self) -> bool:
        import httpx

        try:
            return self._http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False


def _fmt_ts(ts: float) -> str:
    return f"{ts:.3f}"


def _fmt_step(step: float) -> str:
    return f"{step:.3f}".rstrip("0").rstrip(".")


# -- the step grid -------------------------------------------------------------------------------------------
def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def align(ts: float, step: float) -> float:
    """The grid point at or before `ts` (grid points are whole multiples of the step)."""
    step_ms = _ms(step)
    return (_ms(ts) // step_ms) * step_ms / 1000


def time_chunks(start: float, end: float, step: float, max_points: int = MAX_POINTS) -> Iterator[tuple[float, float]]:
    """Consecutive, non-overlapping [start, end] pieces of the grid start, start+step, ... <= end, each
    with at most `max_points` points."""
    step_ms, start_ms, end_ms = _ms(step), _ms(start), _ms(end)
    if end_ms < start_ms:
        return
    n = (end_ms - start_ms) // step_ms + 1
    for first in range(0, n, max_points):
        last = min(first + max_points, n) - 1
        yield (start_ms + first * step_ms) / 1000, (start_ms + last * step_ms) / 1000


# -- frames ----------------------------------------------------------------------------------------------------
def fetch_frame(
    source: PrometheusSource,
    start: float,
    end: float,
    client: PrometheusClient | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Every metric of `source` on the step grid from `start` to `end` (both aligned down to the grid).

    Returns `timestamp` (seconds since the epoch, float), `entity` (`source.entity_id(label)`) and one
    float64 column per metric, sorted by entity and time; a grid point appears for an entity when at
    least one of its metrics has a value there, and a metric with no value there is NaN (the callers
    decide: training forward-fills, the watcher forward-fills from the previous rows). The label
    value of each entity is in `frame.attrs["labels"]`.
    """
    from tqdm.auto import tqdm

    start, end = align(start, source.step), align(end, source.step)
    chunks = list(time_chunks(start, end, source.step, source.max_points))
    own = client is None
    client = client or PrometheusClient.for_source(source)
    wanted = set(source.entities) if source.entities else None
    columns: dict[str, dict[tuple[str, int], float]] = {m.name: {} for m in source.metrics}
    labels: dict[str, str] = {}
    bar = tqdm(
        total=len(chunks) * len(source.metrics),
        desc=f"prometheus {source.name}",
        unit="query",
        disable=not progress,
        leave=False,
    )
    try:
        for metric in source.metrics:
            for lo, hi in chunks:
                result = client.query_range(
                    metric.query, lo, hi, source.step, what=f"{source.origin}: metrics.{metric.name}"
                )
                _collect(source, metric, result, columns[metric.name], labels, wanted)
                bar.update(1)
    finally:
        bar.close()
        if own:
            client.close()
    keys = sorted({k for values in columns.values() for k in values})
    if not keys:
        frame = pd.DataFrame({"timestamp": pd.Series(dtype=np.float64), "entity": pd.Series(dtype=object)})
        for m in source.metric_names:
            frame[m] = pd.Series(dtype=np.float64)
        frame.attrs["labels"] = {}
        return frame
    frame = pd.DataFrame(
        {
            "timestamp": np.array([k[1] for k in keys], dtype=np.float64) / 1000,
            "entity": [k[0] for k in keys],
            **{m: np.array([columns[m].get(k, np.nan) for k in keys], dtype=np.float64) for m in source.metric_names},
        }
    )
    frame.attrs["labels"] = labels
    return frame


def _collect(
    source: PrometheusSource,
    metric: MetricQuery,
    result: list[dict],
    into: dict[tuple[str, int], float],
    labels: dict[str, str],
    wanted: set[str] | None,
) -> None:
    seen: dict[str, dict[str, str]] = {}
    for series in result:
        series_labels = series.get("metric", {})
        value = series_labels.get(metric.entity_label)
        if value is None:
            raise SourceError(
                f"{source.origin}: metrics.{metric.name}: a series has no {metric.entity_label!r} label "
                f"({_show(series_labels)}); keep it in the aggregation, e.g. sum by ({metric.entity_label}) (...)"
            )
        if wanted is not None and value not in wanted:
            continue
        if value in seen:
            differ = sorted(
                k for k in set(seen[value]) | set(series_labels) if seen[value].get(k) != series_labels.get(k)
            )
            raise SourceError(
                f"{source.origin}: metrics.{metric.name}: the query returns more than one series for "
                f"{metric.entity_label}={value!r} (they differ in {differ}); aggregate them to one per entity, "
                f"e.g. sum by ({metric.entity_label}) (...)"
            )
        seen[value] = series_labels
        entity = source.entity_id(value)
        previous = labels.setdefault(entity, value)
        if previous != value:
            raise SourceError(
                f"{source.origin}: metrics.{metric.name}: label values {previous!r} and {value!r} map to the same "
                f"entity id {entity!r}"
            )
        for ts, text in series.get("values", []):
            number = float(text)  # Prometheus writes NaN, +Inf, -Inf as strings float() reads
            into[(entity, int(round(float(ts) * 1000)))] = number if math.isfinite(number) else np.nan


def _show(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def load_prometheus(
    source: PrometheusSource | str | Path,
    since: float | str,
    until: float | None = None,
    client: PrometheusClient | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The telemetry frame of the last `since` (a duration) up to `until` (default: now, one step back
    so the newest scrape is in), NaNs forward-filled per entity, as `detect.data.load_telemetry` returns."""
    if not isinstance(source, PrometheusSource):
        source = load_source(source)
    span = parse_duration(since, "since")
    end = until if until is not None else time.time() - source.step
    frame = fetch_frame(source, end - span, end, client=client, progress=progress)
    labels = frame.attrs.get("labels", {})
    if frame.empty:
        raise TelemetryError(
            f"{source.origin}: Prometheus at {source.url} returned no data for any metric in the last "
            f"{format_duration(span)}" + (f" for entities {source.entities}" if source.entities else "")
        )
    for metric in source.metric_names:
        empty = frame.groupby("entity")[metric].apply(lambda col: col.isna().all())
        if empty.any():
            entity = empty.index[int(np.flatnonzero(empty.to_numpy())[0])]
            raise TelemetryError(
                f"{source.origin}: metrics.{metric}: no value for entity {entity!r} in the last "
                f"{format_duration(span)} (check the query in the Prometheus UI)"
            )
    frame = validate_values(frame, source.metric_names, f"{source.origin} ({source.url})", "ffill", group="entity")
    frame = frame.sort_values(["entity", "timestamp"], kind="stable").reset_index(drop=True)
    frame.attrs["labels"] = labels
    log.info("loaded prometheus telemetry", extra={"source": source.origin, "rows": len(frame)})
    return frame


def prometheus_series(
    source: PrometheusSource | str | Path,
    since: float | str,
    entities: list[str] | None = None,
    until: float | None = None,
    min_rows: int = 50,
    client: PrometheusClient | None = None,
    progress: bool = True,
) -> list[Series]:
    """One unlabelled `Series` per entity (what the training pipeline learns from): `train` holds the
    whole history, `test` is empty (Prometheus has no incident labels). `Series.name` is the entity id."""
    if not isinstance(source, PrometheusSource):
        source = load_source(source)
    frame = load_prometheus(source, since, until, client, progress)
    labels = frame.attrs.get("labels", {})
    out = []
    for entity, rows in frame.groupby("entity", sort=True):
        label = labels.get(entity, entity.split("/", 1)[1])
        if entities and not ({entity, label, entity.split("/", 1)[1]} & set(entities)):
            continue
        if len(rows) < min_rows:
            raise TelemetryError(
                f"{entity}: only {len(rows)} samples in the last {format_duration(parse_duration(since))} at step "
                f"{format_duration(source.step)}; need at least {min_rows} (a longer --since, or more history)"
            )
        train = rows[["timestamp", *source.metric_names]].rename(columns={"timestamp": "t"}).reset_index(drop=True)
        out.append(
            Series(
                dataset=source.name,
                entity=entity.split("/", 1)[1],
                train=train,
                test=train.iloc[:0],
                labels=np.zeros(0, dtype=np.int8),
                metrics=source.metric_names,
                rows_per_day=rows_per_day_at(source.step),  # a day at its step: its drift windows
            )
        )
    if not out:
        found = sorted(labels.values())
        raise TelemetryError(f"{source.origin}: none of the entities {entities} in the data; found {found[:20]}")
    return out
