"""Request and response schemas of the HTTP API, with the limits that bound every request."""

from __future__ import annotations

from operator import itemgetter
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from detect.kinds import DETECTOR_KINDS
from serve.rollout import RolloutPlan

DETECTORS = DETECTOR_KINDS
DetectorName = Literal[DETECTOR_KINDS]  # type: ignore[valid-type]  # the kinds' names, from their one home
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
EntityId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/@-]+$")]


# part of the API's schema (OpenAPI shows it), so fixed here rather than read from the environment
MAX_ROWS = 5000
MAX_BODY_BYTES = 4 * 1024 * 1024  # the default; RAYWATCH_MAX_BODY_BYTES, read per request by serve.app
MAX_METRICS = 512
# the snapshot route's own limits: a scrape of a 10,000-entity fleet, twice over, at ~60 metrics a row
FLEET_PATH = "/v1/score/fleet"
MAX_FLEET_ROWS = 20_000
MAX_FLEET_BODY_BYTES = 48 * 1024 * 1024  # RAYWATCH_MAX_FLEET_BODY_BYTES, read per request by serve.app
MAX_HORIZON = 120


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TelemetryRow(Strict):
    entity: EntityId
    timestamp: float | str | None = Field(default=None, description="seconds since the epoch or ISO 8601; optional")
    metrics: dict[str, FiniteFloat] = Field(min_length=1, max_length=MAX_METRICS)


class ScoreRequest(Strict):
    rows: list[TelemetryRow] = Field(min_length=1, max_length=MAX_ROWS)
    detectors: list[DetectorName] | None = Field(default=None, description="default: every served detector")


class FleetSnapshotRequest(Strict):
    """A scrape's snapshot: one row per entity, up to MAX_FLEET_ROWS of them. Rows are checked one by one
    (`fleet_rows`): a bad row is rejected by its index with the field and the reason, and the rest are
    scored. A row without a timestamp takes the snapshot's."""

    timestamp: float | str | None = Field(default=None, description="the scrape's time, for rows without one")
    rows: list[Any] = Field(min_length=1, max_length=MAX_FLEET_ROWS, description="TelemetryRow objects, one per entity")
    detectors: list[DetectorName] | None = Field(default=None, description="default: every served detector")


class ValidSnapshot(FleetSnapshotRequest):
    """A snapshot whose every row is valid (the usual case), parsed straight into `TelemetryRow` objects in
    one pass instead of into dicts checked one by one after (`fleet_rows`). A bad row fails it as a whole,
    and the snapshot is parsed as a `FleetSnapshotRequest`, which rejects that row by index."""

    rows: list[TelemetryRow] = Field(min_length=1, max_length=MAX_FLEET_ROWS)  # type: ignore[assignment]


ALL_ROWS_VALID = {FleetSnapshotRequest: ValidSnapshot}  # a request model -> its faster parse when all is well


class ScoreBatchRequest(Strict):
    """One entity's rows as a matrix: the metric names once, then one list of values per row, oldest
    first. The bulk path (replays, backfills, big batches): parsed about 4x faster than the same
    rows as `ScoreRequest` objects, and answered in the same shape (`ScoreBatchResponse`)."""

    entity: EntityId
    metrics: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        min_length=1, max_length=MAX_METRICS, description="the column names of `values`, in any order"
    )
    values: list[list[FiniteFloat]] = Field(
        min_length=1, max_length=MAX_ROWS, description="one list per row, a value per name in `metrics`"
    )
    timestamps: list[float | str | None] | None = Field(
        default=None, description="optional, one per row (seconds since the epoch or ISO 8601), echoed back"
    )
    detectors: list[DetectorName] | None = Field(default=None, description="default: every served detector")


class FieldError(ValueError):
    """A request that parses but does not fit the served model: answered 422, naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def batch_values(request: ScoreBatchRequest, metrics: list[str]) -> np.ndarray:
    """The request's values as a (rows, metrics) float64 array in the model's metric order."""
    if len(set(request.metrics)) != len(request.metrics):
        seen: set[str] = set()
        twice = next(m for m in request.metrics if m in seen or seen.add(m))
        raise FieldError("metrics", f"{twice!r} is named twice")
    if set(request.metrics) != set(metrics):
        missing = [m for m in metrics if m not in request.metrics]
        extra = sorted(set(request.metrics) - set(metrics))
        raise FieldError("metrics", f"differ from the model's: missing {missing[:10]}, unexpected {extra[:10]}")
    width = len(metrics)
    for i, row in enumerate(request.values):
        if len(row) != width:
            raise FieldError(f"values[{i}]", f"{len(row)} values, expected {width} (one per name in metrics)")
    if request.timestamps is not None and len(request.timestamps) != len(request.values):
        raise FieldError("timestamps", f"{len(request.timestamps)} timestamps for {len(request.values)} rows")
    values = np.asarray(request.values, dtype=np.float64)
    if list(request.metrics) != list(metrics):
        position = {m: j for j, m in enumerate(request.metrics)}
        values = values[:, [position[m] for m in metrics]]
    return values


class MetricContribution(BaseModel):
    metric: str
    contribution: float


class ModelRef(BaseModel):
    name: str
    version: str | None
    variant: str


class AlertState(BaseModel):
    """The alert a detector has open on an entity after a row: rows are grouped into episodes (3 of the
    last 5 rows at or above the threshold open one, 10 quiet rows close it), so one episode is one alert."""

    state: Literal["opened", "firing", "closed"] = Field(description="opened by this row, still open, or closed by it")
    started: float | str | None = Field(description="timestamp of the episode's first above-threshold row")
    opened: float | str | None = Field(description="timestamp of the row that raised it")
    closed: float | str | None = Field(description="timestamp of the row that closed it (state closed)")
    rows: int = Field(description="rows from its first to its last above-threshold row")
    peak_score: float
    top_metrics: list[str] = Field(description="the metrics that explain the episode most, summed over its rows")


class DetectorScore(BaseModel):
    anomaly_score: float
    threshold: float = Field(
        description="what this row was judged against: DSPOT's threshold for the entity's own model, learning "
        "from served rows (detect/thresholds.py); a fleet model's or the fallback's otherwise"
    )
    is_anomaly: bool
    incident_probability: float | None = None
    top_metrics: list[MetricContribution]
    alert: AlertState | None = Field(None, description="the detector's alert on the entity after this row")
    model: ModelRef
    path: Literal["champion", "challenger", "fallback"]


class RowScore(BaseModel):
    entity: str
    timestamp: float | str | None
    is_anomaly: bool
    incident_probability: float | None
    detectors: dict[str, DetectorScore]


class ScoreResponse(BaseModel):
    results: list[RowScore]


class FleetRowScore(RowScore):
    index: int = Field(description="the row's position in the snapshot")


class RejectedRow(BaseModel):
    index: int
    entity: str | None
    field: str = Field(description="e.g. rows[12].metrics.cpu")
    message: str


class FleetResponse(BaseModel):
    results: list[FleetRowScore] = Field(description="the rows scored, in snapshot order")
    rejected: list[RejectedRow] = Field(description="the rows refused, by index, with the reason")
    scored: int


def entity_metric_names(request: BaseModel) -> list[tuple[str, list[str]]]:
    """(entity, the metric names it sent) of each row of a scoring request, before the rows are checked
    (a snapshot's rows are still raw): what finds the fleet model for an entity without its own."""
    if isinstance(request, ScoreBatchRequest):
        return [(request.entity, list(request.metrics))]
    rows = request.rows if isinstance(request, (ScoreRequest, FleetSnapshotRequest)) else []
    out = []
    for row in rows:
        if isinstance(row, TelemetryRow):
            out.append((row.entity, list(row.metrics)))
        elif isinstance(row, dict) and isinstance(row.get("entity"), str) and isinstance(row.get("metrics"), dict):
            out.append((row["entity"], list(row["metrics"])))
    return out


def entity_values(
    rows: list[TelemetryRow], by_entity: dict[str, list[int]], known: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """Each entity's rows (`by_entity`: its row indices, in order) as a (rows, metrics) float64 array in its
    model's metric order (`known`): one array per metric schema, of which each entity gets its slice (a
    snapshot has one row for each of thousands of entities, and a small array each costs more than its
    values)."""
    schemas: dict[tuple[str, ...], list[str]] = {}
    for entity in by_entity:
        schemas.setdefault(tuple(known[entity]), []).append(entity)
    out: dict[str, np.ndarray] = {}
    for schema, entities in schemas.items():
        get = itemgetter(*schema)
        order = [i for entity in entities for i in by_entity[entity]]
        block = np.array([get(rows[i].metrics) for i in order], dtype=np.float64).reshape(len(order), len(schema))
        at = 0
        for entity in entities:
            n = len(by_entity[entity])
            out[entity], at = block[at : at + n], at + n
    return out


def row_problem(row: TelemetryRow, known: dict[str, list[str]]) -> tuple[str, str] | None:
    """Why a valid row cannot be scored by the served models ((field, message)), or None."""
    metrics = known.get(row.entity)
    if metrics is None:
        return "entity", (
            f"unknown entity {row.entity!r}, and no fleet model for its {len(row.metrics)} metrics "
            f"(raywatch train --fleet); served entities: {sorted(known)[:20]}"
        )
    if set(row.metrics) != set(metrics):
        missing = [m for m in metrics if m not in row.metrics]
        extra = sorted(set(row.metrics) - set(metrics))
        return "metrics", f"metrics differ from the model's: missing {missing[:10]}, unexpected {extra[:10]}"
    return None


def fleet_rows(
    request: FleetSnapshotRequest, known: dict[str, list[str]]
) -> tuple[list[TelemetryRow], list[int], list[dict[str, Any]]]:
    """Split a snapshot into the rows to score (with their indices) and the rejected ones (index, entity,
    field, message): each row validated alone, one row per entity, entities served, the model's metrics.
    A row without a timestamp takes the snapshot's."""
    if request.timestamp is not None:
        for raw in request.rows:
            if isinstance(raw, TelemetryRow):
                if raw.timestamp is None:
                    raw.timestamp = request.timestamp
            elif isinstance(raw, dict) and raw.get("timestamp") is None:
                raw["timestamp"] = request.timestamp
    if isinstance(request, ValidSnapshot):
        valid, errors = dict(enumerate(request.rows)), {}
    else:
        valid, errors = _validated_rows(request.rows)
    accepted: list[TelemetryRow] = []
    where: list[int] = []
    rejected: list[dict[str, Any]] = []
    first_at: dict[str, int] = {}
    for i, raw in enumerate(request.rows):
        row = valid.get(i)
        if row is None:
            entity = raw.get("entity") if isinstance(raw, dict) and isinstance(raw.get("entity"), str) else None
            error = errors[i]
            place = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
            rejected.append({"index": i, "entity": entity, "field": f"rows[{i}]{place}", "message": error["msg"]})
            continue
        if row.entity in first_at:
            message = f"{row.entity!r} is already at rows[{first_at[row.entity]}]: one row per entity in a snapshot"
            rejected.append({"index": i, "entity": row.entity, "field": f"rows[{i}].entity", "message": message})
            continue
        problem = row_problem(row, known)
        if problem:
            rejected.append(
                {"index": i, "entity": row.entity, "field": f"rows[{i}].{problem[0]}", "message": problem[1]}
            )
            continue
        first_at[row.entity] = i  # only a scored row claims its entity
        accepted.append(row)
        where.append(i)
    return accepted, where, rejected


_ROW_LIST = TypeAdapter(list[TelemetryRow])


def _validated_rows(raws: list[Any]) -> tuple[dict[int, TelemetryRow], dict[int, dict[str, Any]]]:
    """Every raw row validated as a `TelemetryRow` in one pydantic call, not one call per row (a snapshot
    has thousands): (index -> row) of the valid rows, (index -> its first error, `loc` within the row) of
    the others. A list with a bad row fails as a whole, so the valid ones are validated again without it:
    two calls at most, as each row is validated on its own."""
    errors: dict[int, dict[str, Any]] = {}
    positions = list(range(len(raws)))
    while positions:
        try:
            return dict(zip(positions, _ROW_LIST.validate_python([raws[i] for i in positions]))), errors
        except ValidationError as exc:
            bad: dict[int, dict[str, Any]] = {}
            for error in exc.errors(include_url=False):
                bad.setdefault(error["loc"][0], {**error, "loc": error["loc"][1:]})
            errors.update((positions[k], error) for k, error in bad.items())
            positions = [i for k, i in enumerate(positions) if k not in bad]
    return {}, errors


class DetectorColumns(BaseModel):
    """One detector's scores of a batch, a list entry per row."""

    model: ModelRef
    path: Literal["champion", "challenger", "fallback"]
    threshold: float = Field(description="the threshold the batch's last row was judged against")
    thresholds: list[float] = Field(
        [], description="per row, the threshold it was judged against (SPOT learns between rows)"
    )
    anomaly_score: list[float]
    is_anomaly: list[bool]
    incident_probability: list[float] | None
    top_metrics: list[list[str]] = Field(
        description="per row, the metrics that explain the score most, first first (the autoencoder and the LSTM "
        "hold each metric at its recent peak: detect/attribution.py)"
    )
    top_contributions: list[list[float]] = Field(description="per row, their contributions")
    alerts: list[AlertState | None] = Field([], description="per row, the detector's alert on the entity after it")


class ScoreBatchResponse(BaseModel):
    entity: str
    timestamps: list[float | str | None] | None
    is_anomaly: list[bool] = Field(description="per row: flagged by any detector")
    incident_probability: list[float | None] = Field(description="per row: the ensemble's, when it scored")
    detectors: dict[str, DetectorColumns]


class ForecastRequest(Strict):
    entity: EntityId
    horizon: int = Field(default=5, ge=1, le=MAX_HORIZON)
    rows: list[TelemetryRow] = Field(
        default_factory=list,
        max_length=MAX_ROWS,
        description="optional new samples for this entity, appended before forecasting",
    )


class FeedbackRequest(Strict):
    entity: EntityId
    timestamp: float | str = Field(description="the scored row's timestamp")
    label: Literal[0, 1]
    detector: DetectorName | None = None


class PromoteRequest(Strict):
    model: DetectorName
    version: Annotated[str, Field(pattern=r"^[0-9]+$", max_length=12)]


class RollbackRequest(Strict):
    model: DetectorName


class TrafficRequest(Strict):
    model: DetectorName
    challenger_version: Annotated[str, Field(pattern=r"^[0-9]+$", max_length=12)] | None = None
    challenger_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    shadow: bool = False


class RolloutRequest(Strict):
    model: DetectorName
    version: Annotated[str, Field(pattern=r"^[0-9]+$", max_length=12)]
    plan: RolloutPlan = Field(default_factory=RolloutPlan, description="steps and guards (serve/rollout.py)")


class BaselineRequest(Strict):
    model: DetectorName
    entity: EntityId


def batch_result(
    entity: str, timestamps: list | None, scored: dict[str, tuple[str, dict[str, Any], dict[str, Any]]]
) -> dict[str, Any]:
    """`ScoreBatchResponse` from each detector's (path, model ref, `EntityModel.score_arrays` output)."""
    detectors, flagged, probability = {}, None, None
    for name, (path, model, arrays) in scored.items():
        scores = np.asarray(arrays["scores"], dtype=np.float64)
        thresholds = row_thresholds(arrays)
        is_anomaly = scores >= thresholds
        flagged = is_anomaly if flagged is None else flagged | is_anomaly
        probs = arrays["probability"]
        if probs is not None and probability is None:
            probability = np.asarray(probs).tolist()
        metrics = arrays["metrics"]
        detectors[name] = {
            "model": model,
            "path": path,
            "threshold": float(thresholds[-1]),
            "thresholds": thresholds.tolist(),
            "anomaly_score": scores.tolist(),
            "is_anomaly": is_anomaly.tolist(),
            "incident_probability": None if probs is None else np.asarray(probs).tolist(),
            "top_metrics": [[metrics[j] for j in row] for row in np.asarray(arrays["top"]).tolist()],
            "top_contributions": np.asarray(arrays["top_values"]).tolist(),
            "alerts": arrays.get("alerts", [None] * len(scores)),
        }
    n = len(flagged) if flagged is not None else 0
    return {
        "entity": entity,
        "timestamps": timestamps,
        "is_anomaly": flagged.tolist() if flagged is not None else [],
        "incident_probability": probability or [None] * n,
        "detectors": detectors,
    }


def row_thresholds(arrays: dict[str, Any]) -> np.ndarray:
    """The threshold each row of `EntityModel.score_arrays` output was judged against: one stored threshold,
    or one per row where the ingress's SPOT learnt between rows (serve.history.AlertBook.observe)."""
    threshold, rows = arrays["threshold"], len(arrays["scores"])
    if isinstance(threshold, (float, int, np.number)):  # one for every row (np.full: a third of broadcast's cost)
        return np.full(rows, float(threshold))
    return np.broadcast_to(np.asarray(threshold, dtype=np.float64), (rows,))


def result_rows(arrays: dict[str, Any], **also: Any) -> list[dict[str, Any]]:
    """The API's per-row results from `EntityModel.score_arrays` output, each with the fields `also`."""
    scores = arrays["scores"].tolist()
    thresholds = row_thresholds(arrays).tolist()
    probs = arrays["probability"].tolist() if arrays["probability"] is not None else [None] * len(scores)
    metrics = arrays["metrics"]
    names = [[metrics[j] for j in row] for row in arrays["top"].tolist()]
    values = arrays["top_values"].tolist()
    alerts = arrays.get("alerts", [None] * len(scores))
    return [
        {
            "anomaly_score": scores[i],
            "threshold": thresholds[i],
            "is_anomaly": scores[i] >= thresholds[i],
            "incident_probability": probs[i],
            "top_metrics": [{"metric": m, "contribution": c} for m, c in zip(names[i], values[i])],
            "alert": alerts[i],
            **also,
        }
        for i in range(len(scores))
    ]


def served_models(response: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each detector's model reference ({name, version, variant}) in a /v1/score or /v1/score/batch
    response: what `raywatch lineage` resolves. The fallback baseline (version None) is left out."""
    answers = [r["detectors"] for r in response.get("results", [])] or [response.get("detectors", {})]
    refs: dict[str, dict[str, Any]] = {}
    for detectors in answers:
        for detector, answer in detectors.items():
            model = answer.get("model") or {}
            if model.get("version") is not None:
                refs.setdefault(f"{detector}@{model['version']}", {"detector": detector, **model})
    if not refs and not answers[0]:
        raise ValueError("not a /v1/score or /v1/score/batch response: no `results` or `detectors`")
    return refs


# the request models of the routes that parse their own bodies (scoring: speed; admin: the key comes first)
SELF_PARSED = (
    ScoreRequest,
    ScoreBatchRequest,
    FleetSnapshotRequest,
    PromoteRequest,
    RollbackRequest,
    TrafficRequest,
    RolloutRequest,
    BaselineRequest,
)
