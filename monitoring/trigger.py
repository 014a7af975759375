"""The retraining trigger: on drift, submit one model's retraining job (`train.retrain`) as a Ray job.

At most one job per model runs at a time and submissions are at least a cooldown apart; every outcome
(the job submitted, or why none was) is kept in the drift event store, so a restarted monitor knows
its last job and `/v1/drift` can show it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        entity: str,
        detectors: list[str],
        event_ids: list[int],
        champion: str | None,
        since_id: int | None = None,
    ) -> dict[str, Any]:
        """Submit a retraining job unless blocked; the outcome is kept. `since_id`: the first served row of
        the drifted window; the challenger learns from that row on."""
        now = time.time()
        blocked = self._blocked_by(now)
        if blocked:
            return self._skip(blocked)
        since = ["--since-id", str(since_id)] if since_id else []
        entrypoint = jobs.retrain_entrypoint(self.model, [entity], [*since, *self.retrain_args])
        try:
            job_id = jobs.submit(
                entrypoint,
                submission_id=f"raywatch-retrain-{self.model}-{int(now * 1000)}",
                env={STATE_DIR_ENV: str(self.state_root)},
                metadata={"model": self.model, "entity": entity, "trigger": ",".join(detectors)},
                address=self.job_address,
            )
        except Exception as exc:
            log.error("retraining job submission failed", extra={"model": self.model, "error": str(exc)})
            return self._skip(f"submission failed: {type(exc).__name__}: {exc}")
        record = {
            "job_id": job_id,
            "submitted": now,
            "entity": entity,
            "trigger": detectors,
            "event_ids": event_ids,
            "champion": champion,
            "entrypoint": entrypoint,
        }
        self.events.set_state(self._key("job"), record)
        self.on_submit()
        log.warning("retraining job submitted", extra={"model": self.model, "job_id": job_id, "entity": entity})
        return {"submitted": True, **record}

    def _skip(self, reason: str) -> dict[str, Any]:
        self.events.set_state(self._key("last_skip"), {"time": time.time(), "reason": reason})
        log.info("retraining not submitted", extra={"model": self.model, "reason": reason})
        return {"submitted": False, "reason": reason}
