"""The retraining trigger: on drift, or for new entities due their own model, submit one model's retraining
job (`train.retrain`) as a Ray job.

Two gates stand between a drifted window and a job:
- `RetrainGate`, per entity and in the data's own time (test windows, a day each by default): the drift
  must persist over consecutive windows, and an entity gets at most one training in a number of windows
  (a week), the champion's own included;
- `RetrainTrigger`, per model and in wall time: at most one job runs at a time and submissions are at
  least a cooldown apart.
Every outcome (the job submitted, or why none was) and the gate's counts are kept in the drift event
store, so a restarted monitor knows its last job and counts on, and `/v1/drift` can show them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detect.fleet import named
from detect.state import STATE_DIR_ENV, state_dir
from monitoring.events import DriftEventStore
from train import jobs

log = logging.getLogger("raywatch.monitor")


class RetrainTrigger:
    def __init__(
        self,
        model: str,
        events: DriftEventStore,
        cooldown_s: float,
        retrain_args: list[str],
        job_address: str | None = None,
        on_submit: Callable[[], None] = lambda: None,
        state_root: Path | None = None,
    ) -> None:
        self.model = model
        self.events = events
        self.cooldown_s = cooldown_s
        self.retrain_args = list(retrain_args)
        self.job_address = job_address
        self.on_submit = on_submit
        self.state_root = state_root or state_dir()  # handed to the job, which records its decision there

    def _key(self, name: str) -> str:
        return f"{self.model}/{name}"

    def last_job(self) -> dict[str, Any] | None:
        return self.events.get_state(self._key("job"))

    def last_skip(self) -> dict[str, Any] | None:
        return self.events.get_state(self._key("last_skip"))

    def _blocked_by(self, now: float) -> str | None:
        """Why no job may be submitted now (one is running, or the cooldown has not passed), or None."""
        last = self.last_job()
        if not last:
            return None
        try:
            state = jobs.status(last["job_id"], self.job_address)
        except Exception as exc:
            state = f"unknown ({type(exc).__name__})"
        if state in jobs.ACTIVE:
            return f"job {last['job_id']} is {state}"
        if now - last["submitted"] < self.cooldown_s:
            return f"cooldown: last job {now - last['submitted']:.0f} s ago (< {self.cooldown_s:.0f} s)"
        return None

    def maybe_retrain(
        self,
        entities: list[str],
        detectors: list[str],
        event_ids: list[int],
        champion: str | None,
        since_id: int | None = None,
    ) -> dict[str, Any]:
        """Submit a retraining job for `entities` (one entity whose drift earned it, or new entities due their
        own model) unless blocked; the outcome is kept. `since_id`: the first served row of the drifted
        window; the challenger learns from that row on."""
        now = time.time()
        blocked = self._blocked_by(now)
        if blocked:
            return self.skip(blocked)
        since = ["--since-id", str(since_id)] if since_id else []
        entrypoint = jobs.retrain_entrypoint(self.model, entities, [*since, *self.retrain_args])
        try:
            job_id = jobs.submit(
                entrypoint,
                submission_id=f"raywatch-retrain-{self.model}-{int(now * 1000)}",
                env={STATE_DIR_ENV: str(self.state_root)},
                metadata={"model": self.model, "entities": ",".join(entities), "trigger": ",".join(detectors)},
                address=self.job_address,
            )
        except Exception as exc:
            log.error(
                "retraining job submission failed",
                extra={"model": self.model, "entities": len(entities), "error": str(exc)},
            )
            return self.skip(f"submission failed: {type(exc).__name__}: {exc}")
        record = {
            "job_id": job_id,
            "submitted": now,
            "entities": entities,
            "trigger": detectors,
            "event_ids": event_ids,
            "champion": champion,
            "entrypoint": entrypoint,
        }
        self.events.set_state(self._key("job"), record)
        self.on_submit()
        log.warning(
            "retraining job submitted",
            extra={"model": self.model, "job_id": job_id, "entities": named(entities)},
        )
        return {"submitted": True, **record}

    def skip(self, reason: str) -> dict[str, Any]:
        """Record why no job was submitted (shown as `last_skip`)."""
        self.events.set_state(self._key("last_skip"), {"time": time.time(), "reason": reason})
        log.info("retraining not submitted", extra={"model": self.model, "reason": reason})
        return {"submitted": False, "reason": reason}


def gate_key(model: str, entity: str) -> str:
    """Where an entity's gate counts live in the drift event store (`/v1/drift?entity=` reads them)."""
    return f"{model}/retrain_gate/{entity}"


@dataclass(frozen=True)
class GateVerdict:
    ready: bool  # a job may be submitted for this entity now
    reason: str  # why not, or what earned it
    since_id: int | None = None  # the first served row of the persistent drift: the challenger learns from it on
    held_by: str | None = None  # which rule held a drifted window back: "persistence" or "budget"


class RetrainGate:
    """Whether an entity's drift has earned it a retraining job, counted in test windows of its served
    rows and the days they span (the data's own clock: a replay at any speed and a live fleet decide alike).

    - **Persistence**: `persist_windows` consecutive drifted windows. An incident is a distribution change
      too; it drifts the window it falls in and is gone from the next, and a challenger fitted on it learns
      little. A machine that changed stays changed.
    - **Budget**: at most one training per entity in `min_days_between` days of its served data, counting
      the champion's own: its first windows after it started serving, and those after a drift-triggered job.
      Days, not windows: a window is a day of 1-minute samples but two days of 5-minute ones
      (`detect.drift.entity_drift_config`), and the budget means the same time on both. A job whose
      challenger lost leaves the champion serving the changed machine; asking again the next day, on one
      more day of data, mostly buys another loss and another job.

    The counts belong to the champion version they were made against: a new champion (promoted, or
    trained by hand) starts them afresh. `observe` takes every tested window of an entity, drifted or not,
    in order; `submitted` records a job. Concept drift and a new machine's own model do not pass here."""

    def __init__(self, model: str, events: DriftEventStore, persist_windows: int, min_days_between: float) -> None:
        self.model = model
        self.events = events
        self.persist_windows = persist_windows
        self.min_days_between = min_days_between

    def _key(self, entity: str) -> str:
        return gate_key(self.model, entity)

    def state(self, entity: str, version: str | None = None) -> dict[str, Any]:
        """{version, streak: consecutive drifted windows, since_id: the first row of the streak,
        days_since_training: days of served data tested since the champion started or the last job}. Fresh
        when it was counted against another version than `version` (None: whichever it was)."""
        state = self.events.get_state(self._key(entity))
        if state is None or (version is not None and state["version"] != version):
            return {"version": version, "streak": 0, "since_id": None, "days_since_training": 0.0}
        if "days_since_training" not in state:  # counted before the budget was in days: a window was a day
            state = dict(state)
            state["days_since_training"] = float(state.pop("windows_since_training", 0))
        return state

    def observe(
        self, entity: str, version: str | None, drifted: bool, first_id: int, window_days: float = 1.0
    ) -> GateVerdict:
        """One tested window of `window_days` days of the entity's served data."""
        state = self.state(entity, version)
        state["days_since_training"] = round(state["days_since_training"] + window_days, 9)
        if drifted:
            state["since_id"] = state["since_id"] if state["streak"] else first_id
            state["streak"] += 1
        else:
            state["streak"], state["since_id"] = 0, None
        self.events.set_state(self._key(entity), state)
        return self._verdict(state)

    def _verdict(self, state: dict[str, Any]) -> GateVerdict:
        streak, since_training = state["streak"], state["days_since_training"]
        if not streak:
            return GateVerdict(False, "no drift in the latest window")
        if streak < self.persist_windows:
            return GateVerdict(
                False,
                f"drift in {streak} consecutive window(s) of the {self.persist_windows} that earn a job "
                "(an incident drifts one window; a changed machine stays changed)",
                held_by="persistence",
            )
        if since_training < self.min_days_between:
            return GateVerdict(
                False,
                f"retraining budget: {since_training:g} day(s) of data since the champion started serving or "
                f"the entity's last retraining job (at most one in {self.min_days_between:g} days)",
                held_by="budget",
            )
        return GateVerdict(True, f"drift in {streak} consecutive windows", state["since_id"])

    def restart_streak(self, entity: str) -> None:
        """A new reference (a baseline reset): drift is counted afresh against it."""
        state = self.state(entity)
        if state["streak"]:
            self.events.set_state(self._key(entity), {**state, "streak": 0, "since_id": None})

    def submitted(self, entity: str) -> None:
        state = self.state(entity)
        self.events.set_state(self._key(entity), {**state, "streak": 0, "since_id": None, "days_since_training": 0.0})
