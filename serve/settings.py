"""Deployment options of the Serve app, typed. `build_app` reads them once, in the process that builds
the app: its arguments (serve/config.yaml's `args`) first, then RAYWATCH_* environment variables, then
these defaults. The deployments receive them as constructor arguments; nothing reads them at import."""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAYWATCH_", extra="forbid", frozen=True)

    ingress_replicas: int = Field(1, ge=1, description="RaywatchAPI replicas (2 for availability)")
    min_replicas: int = Field(1, ge=0, description="each detector deployment's autoscaling floor")
    max_replicas: int = Field(2, ge=1, description="each detector deployment's autoscaling ceiling")
    detector_access_log: bool = Field(False, description="a log line per internal model call (costs CPU)")
    ingress_access_log: bool = Field(
        False,
        description=(
            "Serve's log line per HTTP request in the ingress; off, refused requests are still logged, and every "
            "request counted (raywatch_requests_total)"
        ),
    )
    models_per_replica: int = Field(
        128,
        ge=1,
        description=(
            "entity models a detector replica keeps loaded (Serve's multiplexed LRU, per model key: an entity's "
            "own model, or a fleet model); a call for another key loads it from its own artifacts and evicts the "
            "least recently used"
        ),
    )
    model_ids_report_s: float = Field(
        1.0,
        gt=0,
        description=(
            "how often a detector replica reports the model keys it holds to Serve (routing and the "
            "serve_registered_multiplexed_model_id gauge); Serve's own 0.1 s sets one gauge per held model each "
            "time, about a tenth of a core with a hundred held"
        ),
    )
    big_at_once: int = Field(2, ge=1, description="big batches a detector replica scores at a time")
    parallel_rows: int = Field(256, ge=0, description="rows from which a batch is big (0: never)")
    in_ingress: list[str] = Field(
        [],
        description=(
            "detector kinds whose models the ingress replica runs itself, with no call to a detector deployment "
            "(that deployment is then not deployed): the single-row path without the hop, at the price of the "
            "models' memory in every ingress replica and of their CPU on its event loop"
        ),
    )
    single_rows_in_ingress: list[str] = Field(
        [],
        description=(
            "detector kinds whose single-row calls (one entity's request of fewer than `parallel_rows` new rows) "
            "the ingress replica scores with its own copy of the models, with no call to the deployment; "
            "snapshots, requests of many entities and big batches still go to the deployment, which stays "
            "deployed. The models it serves single rows for take memory in every ingress replica. Off by "
            "default: with it on, killing an ingress replica under load failed 3-5 requests in 400 with a 500, "
            "against 0-1 over the hop (README)"
        ),
    )
    monitor_queue: int = Field(20_000, ge=1, description="served rows waiting for the drift monitors")
    monitor_flush_s: float = Field(0.5, gt=0, description="how long served rows gather before a monitor call")
    feedback_auth: Literal["untrusted", "require"] = Field(
        "untrusted",
        description=(
            "feedback without an admin key: 'untrusted' stores it but retraining and promotion ignore it; "
            "'require' refuses it (401/403)"
        ),
    )

    @field_validator("in_ingress", "single_rows_in_ingress")
    @classmethod
    def _known_kinds(cls, kinds: list[str], info: ValidationInfo) -> list[str]:
        from detect.kinds import DETECTOR_KINDS

        unknown = sorted(set(kinds) - set(DETECTOR_KINDS))
        if unknown:
            raise ValueError(f"{info.field_name}: unknown detector kind(s) {unknown}; known: {sorted(DETECTOR_KINDS)}")
        return kinds

    @property
    def big_batch_rows(self) -> int:
        """`parallel_rows` with 0 meaning never."""
        return self.parallel_rows or sys.maxsize

    def autoscaling(self) -> dict[str, Any]:
        low = self.min_replicas
        return {
            "min_replicas": low,
            "initial_replicas": low,
            "max_replicas": max(low, self.max_replicas),
            "target_ongoing_requests": 8,
            "upscale_delay_s": 5,
            "downscale_delay_s": 30,
        }

    @classmethod
    def from_app_args(cls, args: dict[str, Any]) -> ServeSettings:
        """The settings among `build_app`'s arguments (the rest are the app's own), over the environment."""
        return cls(**{k: v for k, v in args.items() if k in cls.model_fields and v is not None})
