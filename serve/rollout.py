"""Gradual canary rollout with automatic rollback.

`POST /v1/admin/rollout` (or `raywatch rollout MODEL VERSION`) makes VERSION the model's challenger and
moves it through the plan's steps, for example 5% -> 25% -> 100% of the scoring requests. During a
rollout the share is drawn per request at random, not per entity as the manual A/B split is, so the
canary and the champion see two random samples of the same traffic (the same entities, at the same
times) and their rates can be compared directly.

At each step the ingress replicas count, per arm (canary, champion): model calls, failed calls, calls
answered by the fallback, slow calls, rows scored and rows flagged (`ArmStats`), and flush the counts to
`rollout_stats.db` in the state folder about once a second. Every guard is a rate:

| guard | rate | default tolerance (canary minus champion) |
|---|---|---|
| error | failed model calls / calls | 0.02 |
| fallback | calls answered by the fallback / calls | 0.02 |
| latency | calls slower than max(1.5 x the champion's p99, its p99 + 10 ms) / calls, each arm's first 10 calls of a step left out (warm-up) | 0.05 |
| alert | rows flagged / rows scored | 0.02 |
| false alarm (with labels) | flagged rows labelled 0 / flagged rows labelled (trusted feedback) | 0.10 |

The test (`judge`) is the same for each: a one-sided (1 - alpha) confidence interval of the difference
of two proportions, canary minus champion (Agresti-Caffo: one success and one failure added to each
arm, so zero counts are handled; alpha 0.05). The false-alarm guard (one minus precision) is judged only
once both arms have `min_labels` flagged rows with a trusted `/v1/feedback` label. A guard is **breached** when the interval's lower bound is
above its tolerance (the canary is worse by more than the tolerance, with confidence 1 - alpha): the
rollout rolls back at once, at whatever step, and records why. A step **advances** when it was held for
`min_hold_s`, the canary served `min_requests` calls, and for every guard the upper bound is below the
tolerance (enough evidence that the canary is no worse by more than the tolerance). A step that finds
neither within `max_step_s` rolls back as inconclusive. Advancing to 100% promotes the version (the
champion it replaces becomes `previous`) and ends the rollout.

The state of a rollout, its step and its history live in `traffic.db`, beside the traffic policy it
drives, so every ingress replica follows the same step and a restarted replica resumes it; each
transition is one SQLite transaction, so two replicas judging at once cannot both advance a step.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from detect.state import connect, create
from serve.router import TrafficPolicy
from serve.traffic import TrafficStore, write_policy

ARMS = ("canary", "champion")
IN_PROGRESS = ("running", "promoting")  # the statuses of a rollout that still drives the traffic
MIN_CALLS_TO_JUDGE = 10  # calls per arm before any guard can roll back
LATENCY_WARMUP_CALLS = 10  # each arm's first calls of a step, which the latency guard leaves out
MAX_FLAGGED_KEPT = 5000  # flagged rows (entity, timestamp) kept per arm and step, for the precision guard
Labels = Callable[[str, list[str]], Any]  # (entity, timestamps) -> a label per timestamp: 1, 0 or -1 (none)
_SCHEMA = ("CREATE TABLE IF NOT EXISTS rollouts (model TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL)",)
# the per-step counts, in a file of their own: the replicas write them every second, and traffic.db must
# change only when the policy does (every replica rereads the policy when that file changes)
_STATS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rollout_stats (step_key TEXT NOT NULL, arm TEXT NOT NULL, stats TEXT NOT NULL,
       at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rollout_stats_step ON rollout_stats (step_key)",
)
STATS_FILE = "rollout_stats.db"  # beside traffic.db


class RolloutAlreadyStarted(Exception):
    """The rollout request was started before (by this or another ingress replica), whether or not that
    rollout has ended: a request starts one rollout at most."""


class RolloutPlan(BaseModel):
    """How a rollout steps and what it guards; every field can be set per rollout (unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: list[float] = Field(default=[5.0, 25.0, 100.0], description="challenger shares in %, rising, ending at 100")
    min_hold_s: float = Field(60.0, ge=0, description="least time a step is held")
    min_requests: int = Field(200, ge=1, description="least canary model calls before a step may advance")
    max_step_s: float = Field(1800.0, gt=0, description="a step with no verdict by then rolls back (inconclusive)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="one-sided significance level of every guard")
    max_error_rate_increase: float = Field(0.02, ge=0, le=1)
    max_fallback_rate_increase: float = Field(0.02, ge=0, le=1)
    max_slow_rate_increase: float = Field(0.05, ge=0, le=1)
    max_alert_rate_increase: float = Field(0.02, ge=0, le=1)
    slow_ratio: float = Field(1.5, ge=1, description="a canary call is slow above this x the champion's p99 ...")
    slow_slack_ms: float = Field(10.0, ge=0, description="... and above the champion's p99 + this")
    max_false_alarm_increase: float = Field(0.10, ge=0, le=1, description="1 - precision, on labelled flags")
    min_labels: int = Field(20, ge=1, description="labelled flagged rows per arm before precision is judged")

    @field_validator("steps")
    @classmethod
    def _rising_to_100(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError(f"must rise strictly within (0, 100] and end at 100, got {steps}")
        return steps


@dataclass
class ArmStats:
    """What one arm served during a step (summed over replicas and flushes)."""

    calls: int = 0
    errors: int = 0
    fallbacks: int = 0
    rows: int = 0
    flagged: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    flagged_rows: list[list[str]] = field(default_factory=list)  # [entity, timestamp] of flagged rows

    def record(
        self, ok: bool, fallback: bool, latency_ms: float, rows: int, flagged: int, flagged_rows: list | None = None
    ) -> None:
        self.calls += 1
        self.errors += not ok
        self.fallbacks += fallback
        self.rows += rows
        self.flagged += flagged
        self.latencies_ms.append(round(latency_ms, 3))
        self.flagged_rows.extend((flagged_rows or [])[: MAX_FLAGGED_KEPT - len(self.flagged_rows)])

    def merge(self, other: ArmStats) -> None:
        for name in ("calls", "errors", "fallbacks", "rows", "flagged"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies_ms.extend(other.latencies_ms)
        self.flagged_rows.extend(other.flagged_rows[: MAX_FLAGGED_KEPT - len(self.flagged_rows)])

    def false_alarms(self, labels: Labels) -> tuple[int, int]:
        """(flagged rows labelled 0, flagged rows labelled at all), from trusted feedback."""
        by_entity: dict[str, list[str]] = {}
        for entity, ts in self.flagged_rows:
            by_entity.setdefault(entity, []).append(ts)
        found = [np.asarray(labels(entity, stamps)) for entity, stamps in by_entity.items()]
        known = np.concatenate(found) if found else np.zeros(0)
        return int(np.sum(known == 0)), int(np.sum(known >= 0))

    def summary(self) -> dict[str, Any]:
        p99 = p99_ms(self.latencies_ms)
        return {
            "calls": self.calls,
            "error_rate": _share(self.errors, self.calls),
            "fallback_rate": _share(self.fallbacks, self.calls),
            "alert_rate": _share(self.flagged, self.rows),
            "p99_ms": None if p99 is None else round(p99, 2),
        }


def p99_ms(latencies_ms: list[float]) -> float | None:
    if len(latencies_ms) < 2:
        return None
    return statistics.quantiles(latencies_ms, n=100, method="inclusive")[98]


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def difference_bounds(x1: int, n1: int, x2: int, n2: int, alpha: float) -> tuple[float, float]:
    """One-sided (1 - alpha) lower and upper confidence bounds of p1 - p2 (Agresti-Caffo)."""
    p1, p2 = (x1 + 1) / (n1 + 2), (x2 + 1) / (n2 + 2)
    z = statistics.NormalDist().inv_cdf(1 - alpha)
    half = z * math.sqrt(p1 * (1 - p1) / (n1 + 2) + p2 * (1 - p2) / (n2 + 2))
    return p1 - p2 - half, p1 - p2 + half


def guard_counts(
    plan: RolloutPlan, canary: ArmStats, champion: ArmStats, labels: Labels | None = None
) -> dict[str, tuple[int, int, int, int, float]]:
    """Per guard: (canary count, canary total, champion count, champion total, tolerance)."""
    guards = {
        "error": (canary.errors, canary.calls, champion.errors, champion.calls, plan.max_error_rate_increase),
        "fallback": (
            canary.fallbacks,
            canary.calls,
            champion.fallbacks,
            champion.calls,
            plan.max_fallback_rate_increase,
        ),
        "alert": (canary.flagged, canary.rows, champion.flagged, champion.rows, plan.max_alert_rate_increase),
    }
    # latency: each arm's first calls of a step are left out (a version just loaded answers its first
    # calls slower while its runtime warms up; that is not the version's speed)
    warm = [arm.latencies_ms[LATENCY_WARMUP_CALLS:] for arm in (canary, champion)]
    p99 = p99_ms(warm[1])
    if p99 is not None and len(warm[0]) >= MIN_CALLS_TO_JUDGE:
        bound = max(plan.slow_ratio * p99, p99 + plan.slow_slack_ms)
        slow = [sum(x > bound for x in latencies) for latencies in warm]
        guards["latency"] = (slow[0], len(warm[0]), slow[1], len(warm[1]), plan.max_slow_rate_increase)
    if labels is not None:
        (wrong_c, known_c), (wrong_h, known_h) = canary.false_alarms(labels), champion.false_alarms(labels)
        if min(known_c, known_h) >= plan.min_labels:
            guards["false_alarm"] = (wrong_c, known_c, wrong_h, known_h, plan.max_false_alarm_increase)
    return guards


@dataclass
class Verdict:
    action: str  # "hold", "advance" or "rollback"
    reason: str
    guards: dict[str, dict[str, float]]


def judge(
    plan: RolloutPlan, canary: ArmStats, champion: ArmStats, held_s: float, labels: Labels | None = None
) -> Verdict:
    """What a step's evidence says: roll back on a breached guard, advance when every guard is shown
    within its tolerance after the hold, else hold (see the module's docstring)."""
    checks: dict[str, dict[str, float]] = {}
    for name, (xc, nc, xh, nh, tolerance) in guard_counts(plan, canary, champion, labels).items():
        lower, upper = difference_bounds(xc, nc, xh, nh, plan.alpha)
        checks[name] = {
            "canary": _share(xc, nc),
            "champion": _share(xh, nh),
            "lower": round(lower, 4),
            "upper": round(upper, 4),
            "tolerance": tolerance,
        }
        if min(canary.calls, champion.calls) >= MIN_CALLS_TO_JUDGE and lower > tolerance:
            return Verdict(
                "rollback",
                f"{name} guard breached: canary {_share(xc, nc)} vs champion {_share(xh, nh)}, worse by more than "
                f"{tolerance:g} (one-sided {1 - plan.alpha:.0%} lower bound {lower:.3f})",
                checks,
            )
    waiting_for = _waiting_for(plan, canary, held_s, checks)
    if waiting_for and held_s >= plan.max_step_s:  # say what was missing: it is what to look at
        return Verdict("rollback", f"inconclusive: no verdict after {held_s:.0f} s (max_step_s): {waiting_for}", checks)
    if waiting_for:
        return Verdict("hold", waiting_for, checks)
    return Verdict("advance", "every guard within its tolerance", checks)


def _waiting_for(plan: RolloutPlan, canary: ArmStats, held_s: float, checks: dict[str, dict[str, float]]) -> str:
    """What a step still lacks before it may advance ("" when nothing): its hold, its canary calls, or
    guards not yet shown within tolerance (each with its upper bound)."""
    if held_s < plan.min_hold_s or canary.calls < plan.min_requests:
        return f"holding: {held_s:.0f}/{plan.min_hold_s:g} s, {canary.calls}/{plan.min_requests} canary calls"
    unproven = [
        f"{name} (canary {check['canary']} vs champion {check['champion']}, upper bound {check['upper']:.3f})"
        for name, check in sorted(checks.items())
        if check["upper"] >= check["tolerance"]
    ]
    return f"not yet shown within tolerance: {', '.join(unproven)}" if unproven else ""


class RolloutStore:
    """The rollouts and their per-step counts, in traffic.db beside the traffic policy they drive."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.stats_path = self.path.with_name(STATS_FILE)
        TrafficStore(self.path)  # the policy table the rollouts write, with its rollout columns
        create(self.path, _SCHEMA)
        create(self.stats_path, _STATS_SCHEMA)

    def get(self, model: str) -> dict[str, Any] | None:
        with connect(self.path) as db:
            return self._read(db, model)

    def in_progress(self, model: str) -> dict[str, Any] | None:
        """The model's rollout while it still drives the traffic, else None."""
        state = self.get(model)
        return state if state and state["status"] in IN_PROGRESS else None

    def start(
        self, model: str, version: str, plan: RolloutPlan, now: float | None = None, request: str | None = None
    ) -> dict[str, Any]:
        """Begin a rollout at the plan's first step; refused (ValueError) while one is running. `request`,
        the id of the retraining loop's request it answers (`registry.request_rollout`), starts it once:
        `RolloutAlreadyStarted` when the model's newest rollout answered it, even one that has ended."""
        now = time.time() if now is None else now
        state = {
            "id": uuid.uuid4().hex[:12],
            "request": request,
            "model": model,
            "version": str(version),
            "plan": plan.model_dump(),
            "status": "running",
            "step": 0,
            "percent": plan.steps[0],
            "step_started": now,
            "started": now,
            "ended": None,
            "reason": f"started at {plan.steps[0]:g}%",
            "history": [],
        }
        with connect(self.path) as db:
            db.execute("BEGIN IMMEDIATE")
            current = self._read(db, model)
            if request is not None and current and current.get("request") == request:
                raise RolloutAlreadyStarted(f"request {request} started rollout {current['id']} ({current['status']})")
            if current and current["status"] in IN_PROGRESS:
                raise ValueError(f"a rollout of version {current['version']} is in progress; abort it first")
            self._write(db, state, now)
        return state

    def record(self, counts: dict[tuple[str, str], ArmStats]) -> None:
        """Add counts ((step key, arm) -> what the arm served) in one transaction."""
        now = time.time()
        with connect(self.stats_path) as db:
            db.executemany(
                "INSERT INTO rollout_stats (step_key, arm, stats, at) VALUES (?, ?, ?, ?)",
                [(key, arm, json.dumps(asdict(stats)), now) for (key, arm), stats in counts.items()],
            )

    def step_stats(self, step_key: str) -> dict[str, ArmStats]:
        arms = {arm: ArmStats() for arm in ARMS}
        with connect(self.stats_path) as db:
            for arm, stats in db.execute("SELECT arm, stats FROM rollout_stats WHERE step_key = ?", (step_key,)):
                arms[arm].merge(ArmStats(**json.loads(stats)))
        return arms

    def decide(
        self, model: str, now: float | None = None, labels: Labels | None = None
    ) -> tuple[dict[str, Any], Verdict] | None:
        """Judge the running step of `model`'s rollout and apply the verdict in one transaction: advance
        (the policy moves to the next share; the last step sets status `promoting`) or roll back (share
        0). Returns (new state, verdict) when the state changed, else None."""
        now = time.time() if now is None else now
        with connect(self.path) as db:
            db.execute("BEGIN IMMEDIATE")
            state = self._read(db, model)
            if state is None or state["status"] != "running":
                return None
            plan = RolloutPlan(**state["plan"])
            arms = self.step_stats(step_key(state))
            verdict = judge(plan, arms["canary"], arms["champion"], now - state["step_started"], labels)
            if verdict.action == "hold":
                return None
            state["history"].append(
                {
                    "step": state["step"],
                    "percent": state["percent"],
                    "action": verdict.action,
                    "reason": verdict.reason,
                    "held_s": round(now - state["step_started"], 1),
                    "canary": arms["canary"].summary(),
                    "champion": arms["champion"].summary(),
                    "guards": verdict.guards,
                    "at": now,
                }
            )
            state["reason"] = verdict.reason
            if verdict.action == "rollback":
                state.update(status="rolled_back", percent=0.0, ended=now)
            else:
                state["step"] += 1
                state.update(percent=plan.steps[state["step"]], step_started=now)
                if state["percent"] >= 100:
                    state["status"] = "promoting"
            self._write(db, state, now)
        return state, verdict

    def finish(self, model: str, status: str, reason: str, now: float | None = None) -> dict[str, Any] | None:
        """End a rollout: `completed` once promoted, `aborted` by an operator, `rolled_back` after a
        failed promotion. No-op when nothing is in progress."""
        now = time.time() if now is None else now
        with connect(self.path) as db:
            db.execute("BEGIN IMMEDIATE")
            state = self._read(db, model)
            if state is None or state["status"] not in IN_PROGRESS:
                return None
            state.update(status=status, reason=reason, percent=0.0, ended=now)
            self._write(db, state, now)
        return state

    @staticmethod
    def _read(db, model: str) -> dict[str, Any] | None:
        row = db.execute("SELECT state FROM rollouts WHERE model = ?", (model,)).fetchone()
        return json.loads(row[0]) if row else None

    @staticmethod
    def _write(db, state: dict[str, Any], now: float) -> None:
        db.execute(
            "INSERT OR REPLACE INTO rollouts (model, state, updated) VALUES (?, ?, ?)",
            (state["model"], json.dumps(state), now),
        )
        running = state["status"] in IN_PROGRESS
        policy = TrafficPolicy(
            challenger_percent=state["percent"] if running else 0.0,
            split="request" if running else "entity",
            step_key=step_key(state) if running else None,
        )
        write_policy(db, state["model"], policy, now)


def step_key(state: dict[str, Any]) -> str:
    """Names a rollout's step: the counts of a step are summed under it."""
    return f"{state['id']}:{state['step']}"


class StepCounter:
    """An ingress replica's counts for the steps it is serving, flushed to the store about once a second."""

    def __init__(self, store: RolloutStore, flush_s: float = 1.0) -> None:
        self.store, self.flush_s = store, flush_s
        self.pending: dict[tuple[str, str], ArmStats] = {}
        self.flushed_at = time.monotonic()

    def arm(self, step_key: str, arm: str) -> ArmStats:
        """This replica's counts of `arm` at the step, since the last flush (add to them with `record`)."""
        return self.pending.setdefault((step_key, arm), ArmStats())

    def due(self) -> bool:
        return time.monotonic() - self.flushed_at >= self.flush_s

    def flush(self) -> None:
        """Write the counts gathered since the last flush (blocking: call it from a worker thread)."""
        pending, self.pending = self.pending, {}
        self.flushed_at = time.monotonic()
        if pending:
            self.store.record(pending)
