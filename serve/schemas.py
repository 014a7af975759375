"""Request and response schemas of the HTTP API, with the limits that bound every request."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DETECTORS = ("ensemble", "lstm", "autoencoder")
DetectorName = Literal["ensemble", "lstm", "autoencoder"]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
EntityId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/@-]+$")]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


MAX_ROWS = _env_int("RAYWATCH_MAX_ROWS", 5000)
MAX_BODY_BYTES = _env_int("RAYWATCH_MAX_BODY_BYTES", 4 * 1024 * 1024)
MAX_METRICS = 512
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


class MetricContribution(BaseModel):
    metric: str
    contribution: float


class ModelRef(BaseModel):
    name: str
    version: str | None
    variant: str


class DetectorScore(BaseModel):
    anomaly_score: float
    threshold: float
    is_anomaly: bool
    incident_probability: float | None = None
    top_metrics: list[MetricContribution]
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


class BaselineRequest(Strict):
    model: DetectorName
    entity: EntityId


def result_rows(arrays: dict[str, Any]) -> list[dict[str, Any]]:
    """The API's per-row results from `EntityModel.score_arrays` output."""
    scores = arrays["scores"].tolist()
    threshold = arrays["threshold"]
    probs = arrays["probability"].tolist() if arrays["probability"] is not None else [None] * len(scores)
    metrics = arrays["metrics"]
    names = [[metrics[j] for j in row] for row in arrays["top"].tolist()]
    values = arrays["top_values"].tolist()
    return [
        {
            "anomaly_score": scores[i],
            "threshold": threshold,
            "is_anomaly": scores[i] >= threshold,
            "incident_probability": probs[i],
            "top_metrics": [{"metric": m, "contribution": c} for m, c in zip(names[i], values[i])],
        }
        for i in range(len(scores))
    ]
