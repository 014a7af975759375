"""Drift monitors: one Ray actor per served model that tests served inputs and scores for drift and,
on drift, asks Ray for a retraining job.

The Serve ingress hands each monitor what it served (raw metric rows, the model's scores and flags)
off the response path. The monitor appends them to the durable observation log (`detect.state`),
tests every full window per entity against the champion version's reference sample (KS per metric,
MMD, KS on the score distribution; `detect.drift`), checks feedback labels for concept drift on a
cadence, persists every result, and on drift its retraining trigger (`monitoring/trigger.py`) submits
`python -m train.retrain --model M` through Ray's job submission API (cooldown, one running job per model). Everything it needs to resume
(cursors, concept baselines, the last job) is in SQLite, so a restarted actor (max_restarts) carries
on where it stopped and no accepted event is lost.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detect.actors import named_actor
from detect.config import config_from_dict
from detect.data import entity_rows_per_day
from detect.drift import DriftConfig, EntityDriftDetectors, as_drift_reference, entity_drift_config
from detect.kinds import DETECTOR_KINDS
from detect.logs import process_logging
from detect.state import ServingStore, state_dir
from monitoring.events import DriftEventStore
from monitoring.served import ServedColumns
from monitoring.trigger import RetrainGate, RetrainTrigger

log = logging.getLogger("raywatch.monitor")

NAMESPACE = "raywatch"


def monitor_name(model: str) -> str:
    return f"raywatch-drift-{model}"


GRADUATION_RETRY_S = 30.0  # after the trigger turned down new entities' job, the next ask is this much later
PRUNE_SHARE = 0.1  # a new entity's rows are pruned once per this share of `keep_new_observations` new ones


# fields an earlier raywatch read, with what replaced them (a config naming one is refused with this text)
RENAMED_FIELDS = {
    "retrain_min_windows_between": "retrain_min_days_between: one job per so many days of an entity's served "
    "data, not test windows (a window is one day of 1-minute samples, two days of 5-minute ones)",
}


@dataclass
class MonitorConfig:
    """How a monitor tests and when it retrains. `drift` holds `DriftConfig` fields; each entity is tested
    with them and windows of whole days at its sampling rate (`detect.drift.entity_drift_config`, which
    training fits the calibration for), unless they set `window` or `thin` themselves."""

    drift: dict[str, Any] = field(default_factory=dict)
    retrain: bool = True  # submit a retraining job on drift
    cooldown_s: float = 900.0  # at most one submission per model in this time
    # per entity (monitoring/trigger.py RetrainGate): drift must persist this many consecutive test windows
    # (whole days: one of 1-minute samples, two of 5-minute ones) to earn a job, and a job is at most one in
    # so many days of the entity's served data
    retrain_persist_windows: int = 2
    retrain_min_days_between: float = 7.0
    retrain_on: tuple[str, ...] = ("ks", "mmd", "prediction_ks", "concept")  # which detectors trigger it
    retrain_args: list[str] = field(default_factory=list)  # extra `train.pipeline` flags, e.g. ["--epochs", "3"]
    concept_every_s: float = 30.0
    concept_rows: int = 2000  # newest served rows per entity that the concept test looks at
    version_check_s: float = 5.0
    keep_observations: int = 20_000  # per entity with a model of its own; older rows are pruned
    # per new entity scored by a fleet model: its rows only feed the job that fits its own model, which reads
    # the newest `--recent-rows` (5,000 by default); at least `own_model_rows`
    keep_new_observations: int = 5000
    # a new entity scored by a fleet model gets a retraining job for its own model once this many of its
    # rows are kept (and again after as many more while its own model has not won); 0: never
    own_model_rows: int = 2000
    # new entities due their own model at once (a fleet's reach `own_model_rows` together) share one job
    # of at most this many; each still takes over only on its own win (train.promotion.decide_each)
    graduates_per_job: int = 100
    job_address: str | None = None  # Ray dashboard address for job submission (default: this cluster)

    def __post_init__(self) -> None:
        DriftConfig.from_dict(self.drift)  # validates the drift fields early, naming a bad one
        unknown = set(self.retrain_on) - {"ks", "mmd", "prediction_ks", "concept"}
        if unknown:
            raise ValueError(f"MonitorConfig.retrain_on: unknown detector(s) {sorted(unknown)}")
        self.retrain_on = tuple(self.retrain_on)
        for name, least in (("retrain_persist_windows", 1), ("graduates_per_job", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"MonitorConfig.{name} must be an integer >= {least}, got {value!r}")
        days = self.retrain_min_days_between
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 <= days < float("inf"):
            raise ValueError(f"MonitorConfig.retrain_min_days_between must be a number >= 0, got {days!r}")
        if self.keep_new_observations < self.own_model_rows:  # else a new entity never holds enough for its job
            raise ValueError(
                f"MonitorConfig.keep_new_observations ({self.keep_new_observations}) must be at least "
                f"own_model_rows ({self.own_model_rows})"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MonitorConfig:
        renamed = sorted(set(data or {}) & set(RENAMED_FIELDS))
        if renamed:  # a config written for an earlier raywatch: say what the field is now, not just "unknown"
            raise ValueError("; ".join(f"MonitorConfig.{name} is now {RENAMED_FIELDS[name]}" for name in renamed))
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftMonitor:
    """The body of a monitor actor (also usable in-process, which the unit tests do)."""

    def __init__(
        self,
        model: str,
        config: dict[str, Any] | None = None,
        state_dir_path: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        process_logging()
        if tracking_uri:
            _registry().use_store(tracking_uri)
        self.state_root = Path(state_dir_path) if state_dir_path else state_dir()
        self.model = model
        self.config = MonitorConfig.from_dict(config)
        self.drift_config = DriftConfig.from_dict(self.config.drift)  # the fields every entity shares
        self.store = ServingStore(self.state_root / "serving.db")
        self.events = DriftEventStore(self.state_root / "drift.db")
        self.started = time.time()
        self.starts = int(self.events.get_state(self._key("starts"), 0)) + 1
        self.events.set_state(self._key("starts"), self.starts)
        self.detectors: dict[str, EntityDriftDetectors] = {}
        self.metrics: dict[str, list[str]] = {}
        # per entity: samples per day of its series, as the champion's training recorded them
        self.rows_per_day: dict[str, int] = {}
        self.version: str | None = None
        self.load_error: str | None = None
        self._checked_version = 0.0
        self._checked_concept = time.monotonic()
        # rows after each entity's cursor, so a batch short of a window reads nothing
        self._pending: dict[str, int] = {}
        # entities whose kept rows are pruned at the end of the batch, all in one commit (`observe`)
        self._to_prune: dict[str, int] = {}  # entity -> rows it keeps
        # new entities scored by a fleet model (`_graduate`): each one's count in `_pending` at its last prune,
        # those of this batch due their own model, and when they may next ask for the job that fits them
        self._pruned_at: dict[str, int] = {}
        self._graduates: list[str] = []
        self._asks_from = 0.0
        self._metrics = _monitor_metrics()
        self.trigger = RetrainTrigger(
            model,
            self.events,
            self.config.cooldown_s,
            self.config.retrain_args,
            self.config.job_address,
            on_submit=self._count_job,
            state_root=self.state_root,
        )
        self.gate = RetrainGate(
            model, self.events, self.config.retrain_persist_windows, self.config.retrain_min_days_between
        )
        self._load_champion()
        log.info("monitor started", extra={"model": model, "starts": self.starts, "version": self.version})

    def _key(self, name: str) -> str:
        return f"{self.model}/{name}"

    # -- references ------------------------------------------------------------------------------------
    def _load_champion(self) -> None:
        """Build the detectors from the champion's reference samples (or a baseline reset through the API)."""
        registry = _registry()
        try:
            bundle, version = registry.load_bundle(self.model, registry.CHAMPION)
        except Exception as exc:  # no champion yet, or the registry is down: keep what is loaded
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.warning("monitor could not load the champion", extra={"model": self.model, "error": self.load_error})
            return
        since = float(self.events.get_state(self._key(f"version_since/{version}"), 0.0) or 0.0)
        detectors, rows_per_day = {}, {}
        for entity, ref in bundle.references.items():
            reset = self.store.reference(self.model, entity, since=since) if since else None
            rows = np.asarray(reset if reset is not None else ref, dtype=np.float64)
            scores = None if reset is not None else bundle.reference_scores.get(entity)
            # a reset reference has no training history to calibrate on: it is tested with the iid decision
            rows_per_day[entity] = bundle.rows_per_day(entity) or entity_rows_per_day(entity)
            config = entity_drift_config(entity, self.config.drift, rows_per_day[entity])
            calibration = (
                None if reset is not None else self._calibration(entity, ref, config, len(bundle.metrics[entity]))
            )
            try:
                detectors[entity] = EntityDriftDetectors(
                    self.model, entity, rows, bundle.metrics[entity], scores, config, calibration
                )
            except ValueError as exc:
                log.warning("no drift detectors for entity", extra={"entity": entity, "error": str(exc)})
        if version != self.version:
            # a new champion starts fresh windows: what the old one saw must not count against the new one
            if self.version is not None:
                self.events.set_state(self._key("cursors"), {e: self._last_id(e) for e in detectors})
                self._pending.clear()
                self._pruned_at.clear()
            self.events.set_state(self._key(f"version_since/{version}"), since or time.time())
        self.detectors, self.metrics, self.version, self.load_error = detectors, bundle.metrics, version, None
        self.rows_per_day = rows_per_day

    def _calibration(self, entity: str, reference: Any, config: DriftConfig, features: int) -> Any:
        """The entity's calibration stored with the champion's reference, when it was fitted for the
        windows `config` tests; otherwise None (the iid decision), with the reason logged."""
        calibration = as_drift_reference(reference).calibration
        if calibration is None:
            log.warning("drift tests of entity uncalibrated", extra={"entity": entity, "reason": "none stored"})
            return None
        unfit = calibration.fits(config.window, config.thin, features)
        if unfit:
            log.warning("drift tests of entity uncalibrated", extra={"entity": entity, "reason": unfit})
            return None
        return calibration

    def _last_id(self, entity: str) -> int:
        obs = self.store.observations(self.model, entity, limit=1)
        return obs["ids"][-1] if obs["ids"] else 0

    def reset_reference(self, entity: str) -> dict[str, Any]:
        """After `/v1/admin/baseline` stored a new reference: rebuild that entity's detectors from it."""
        rows = self.store.reference(self.model, entity)
        if rows is None:
            raise ValueError(f"no stored reference for {self.model}/{entity}")
        names = self.metrics.get(entity)
        if names is None:
            raise ValueError(f"{self.model} champion has no entity {entity!r}")
        config = entity_drift_config(entity, self.config.drift, self._rows_per_day(entity))
        self.detectors[entity] = EntityDriftDetectors(
            self.model, entity, np.asarray(rows, dtype=np.float64), names, None, config
        )
        cursors = self.events.get_state(self._key("cursors"), {})
        cursors[entity] = self._last_id(entity)
        self.events.set_state(self._key("cursors"), cursors)
        self._pending.pop(entity, None)
        self.gate.restart_streak(entity)
        return {"model": self.model, "entity": entity, "reference_rows": len(rows)}

    # -- observing and testing ---------------------------------------------------------------------------
    def observe(self, items: list[dict[str, Any]] | ServedColumns) -> dict[str, Any]:
        """Take a batch of served rows ({entity, timestamp, values, score, is_anomaly, path}, or the ingress's
        columns of them); test full windows."""
        now = time.monotonic()
        if now - self._checked_version > self.config.version_check_s:
            self._checked_version = now
            self._check_version()
        entities = self._store(items)
        for entity in entities:
            if entity in self._pending:
                self._pending[entity] += 1
        results: list[dict[str, Any]] = []
        for entity in sorted(set(entities)):
            results += self._test_windows(entity)
        self._ask_for_own_models()
        if self._to_prune:  # entities reach their prunes together (a fleet's, a day's windows): one commit
            self.store.prune_observations(self.model, self._to_prune)
            self._to_prune = {}
        if now - self._checked_concept > self.config.concept_every_s:
            self._checked_concept = now
            results += self.check_concept()
        return {"accepted": len(entities), "ignored": len(items) - len(entities), "events": results}

    def _store(self, items: list[dict[str, Any]] | ServedColumns) -> list[str]:
        """Keep the rows of entities this monitor watches: with a model of their own, or new ones scored by a
        fleet model (their rows train their own). Returns the kept rows' entities."""
        if isinstance(items, ServedColumns):
            keep = [i for i, (e, key) in enumerate(zip(items.entities, items.model_keys)) if self._watches(e, key)]
            if keep:
                self.store.add_observation_columns(self.model, *items.stored(keep))
            return [items.entities[i] for i in keep]
        known = [it for it in items if self._watches(it.get("entity"), it.get("model_key"))]
        if known:
            self.store.add_observations(self.model, known)
        return [it["entity"] for it in known]

    def _watches(self, entity: str | None, model_key: str | None) -> bool:
        return entity in self.metrics or model_key in self.metrics

    def _check_version(self) -> None:
        registry = _registry()
        try:
            if registry.alias_version(self.model, registry.CHAMPION) != self.version:
                self._load_champion()
        except Exception as exc:
            log.warning("version check failed", extra={"model": self.model, "error": str(exc)})

    def _test_windows(self, entity: str) -> list[dict[str, Any]]:
        det = self.detectors.get(entity)
        if det is None:
            self._graduate(entity)
            return []
        span = det.config.span
        if self._pending.get(entity, span) < span:
            return []  # no full window yet: known without reading the cursors (a SQLite read per entity and batch)
        cursors = self.events.get_state(self._key("cursors"), {})
        after = int(cursors.get(entity, 0))
        if entity not in self._pending:
            self._pending[entity] = self.store.count_observations(self.model, entity, after_id=after)
        if self._pending[entity] < span:
            return []
        obs = self.store.observations(self.model, entity, after_id=after)
        out = []
        start = 0
        while len(obs["ids"]) - start >= span:
            stop = start + span
            results = det.test_inputs(obs["values"][start:stop])
            scores = obs["scores"][start:stop]
            if det.scores_ks_ is not None and np.isfinite(scores).all():
                results.append(det.test_scores(scores))
            ids = self.events.add_many(results)
            self._count(results)
            cursors[entity] = obs["ids"][stop - 1]
            self.events.set_state(self._key("cursors"), cursors)  # after the events: a crash re-tests, never skips
            out += [{**r.to_dict(), "id": i} for r, i in zip(results, ids)]
            self._after_window(entity, results, ids, first_id=obs["ids"][start])
            start = stop
        self._pending[entity] = len(obs["ids"]) - start
        if start:  # rows were consumed by tests: keep the log bounded (not on every batch)
            self._to_prune[entity] = self.config.keep_observations
        return out

    def _graduate(self, entity: str) -> None:
        """A new entity scored by a fleet model (no drift reference of its own): once `own_model_rows` of its
        rows are kept, it is due the retraining job that fits its own model (`_ask_for_own_models`). Its kept
        rows are bounded: pruned to `keep_new_observations` once per PRUNE_SHARE of it new ones, with
        retraining on or off, together with the batch's other entities due then (one commit per batch: each
        prune a commit of its own took 200 such machines 0.4 s a batch, in process). They only feed its own
        model's job, which reads the newest `--recent-rows`: kept to `keep_observations` (20,000), as an
        entity with a model of its own is, 10,000 new machines would hold about 40 GB at some 200 bytes a row."""
        if entity in self.metrics:
            return
        if entity not in self._pending:
            self._pending[entity] = self.store.count_observations(self.model, entity)
        if self.config.retrain and self.config.own_model_rows and self._pending[entity] >= self.config.own_model_rows:
            self._graduates.append(entity)
        keep = self.config.keep_new_observations
        if self._pending[entity] - self._pruned_at.get(entity, 0) >= keep * PRUNE_SHARE:
            self._to_prune[entity] = keep
            self._pruned_at[entity] = self._pending[entity]

    def _ask_for_own_models(self) -> None:
        """One retraining job for the new entities of this batch due their own model, at most
        `graduates_per_job` of them. A fleet's new machines reach `own_model_rows` together, and the trigger
        runs one job at a time behind its cooldown: a job per machine would take a 10,000-machine fleet about
        100 days at the default 15-minute cooldown. Each ask is a job-API call and a state write, so once the
        trigger turns one down (a job running, its cooldown, a failed submission), none is made for
        GRADUATION_RETRY_S. The entities of a submitted job start counting again from 0 rows: one whose own
        model did not win asks again after `own_model_rows` more."""
        due, self._graduates = self._graduates[: self.config.graduates_per_job], []
        if not due or time.monotonic() < self._asks_from:
            return
        if self.maybe_retrain(due, ["cold_start"], []).get("submitted"):
            for entity in due:
                self._pending[entity] = self._pruned_at[entity] = 0
                self._to_prune[entity] = self.config.keep_new_observations
        else:
            self._asks_from = time.monotonic() + GRADUATION_RETRY_S

    def check_concept(self) -> list[dict[str, Any]]:
        """Concept drift per entity from feedback labels joined with what was served."""
        out = []
        baselines = self.events.get_state(self._key("concept_baseline"), {})
        for entity, det in self.detectors.items():
            obs = self.store.observations(self.model, entity, limit=self.config.concept_rows)
            if not obs["ids"]:
                continue
            labels = self.store.labels(entity, obs["timestamps"])
            pairs = [(int(flag), int(y)) for y, flag in zip(labels, obs["is_anomaly"]) if y >= 0 and flag is not None]
            if len(pairs) < self.drift_config.min_labels:
                continue
            predicted, truth = (np.array(v) for v in zip(*pairs))
            base = baselines.get(entity)
            result = det.test_concept(predicted, truth, *(base or (None, None)))
            if result is None:
                continue
            if base is None:
                baselines[entity] = [result.extra["precision"], result.extra["recall"]]
                self.events.set_state(self._key("concept_baseline"), baselines)
            [event_id] = self.events.add_many([result])
            self._count([result])
            out.append({**result.to_dict(), "id": event_id})
            self._after_concept(entity, [result], [event_id])
        return out

    def _count_job(self) -> None:
        if self._metrics is not None:
            self._metrics["jobs"].inc(tags={"model": self.model})

    def _count(self, results: list[Any]) -> None:
        if self._metrics is None:
            return
        for r in results:
            tags = {"model": self.model, "detector": r.detector}
            self._metrics["tests"].inc(tags=tags)
            if r.is_drift:
                self._metrics["drift"].inc(tags=tags)

    # -- retraining --------------------------------------------------------------------------------------
    def _drifted(self, results: list[Any], ids: list[int]) -> list[tuple[Any, int]]:
        return [(r, i) for r, i in zip(results, ids) if r.is_drift and r.detector in self.config.retrain_on]

    def _rows_per_day(self, entity: str) -> int:
        """Samples per day of the entity's series: as its champion's training recorded them, else (an
        entity without a reference, a version from before the record) from its name."""
        return self.rows_per_day.get(entity) or entity_rows_per_day(entity)

    def _window_days(self, entity: str) -> float:
        """Days of the entity's served data in one of its test windows."""
        det = self.detectors.get(entity)
        day_rows = self._rows_per_day(entity)
        config = det.config if det is not None else entity_drift_config(entity, self.config.drift, day_rows)
        return config.span / day_rows

    def _after_window(self, entity: str, results: list[Any], ids: list[int], first_id: int) -> None:
        """A tested window of served rows: a job only when the gate says the drift earned one. The gate counts
        every window, with retraining on or off, so that turning it on later finds the counts current."""
        drifted = self._drifted(results, ids)
        verdict = self.gate.observe(entity, self.version, bool(drifted), first_id, self._window_days(entity))
        if not drifted or not self.config.retrain:
            return
        if not verdict.ready:
            self.trigger.skip(f"{entity}: {verdict.reason}")
            if self._metrics is not None:
                # a held drifted window always names its rule
                self._metrics["held"].inc(tags={"model": self.model, "rule": verdict.held_by})
            return
        outcome = self.maybe_retrain(
            [entity], [r.detector for r, _ in drifted], [i for _, i in drifted], verdict.since_id
        )
        if outcome["submitted"]:
            self.gate.submitted(entity)

    def _after_concept(self, entity: str, results: list[Any], ids: list[int]) -> None:
        """Concept drift (labels say the champion got worse): a job at once, past the gate."""
        drifted = self._drifted(results, ids)
        if drifted and self.config.retrain:
            self.maybe_retrain([entity], [r.detector for r, _ in drifted], [i for _, i in drifted])

    def maybe_retrain(
        self, entities: list[str], detectors: list[str], event_ids: list[int], since_id: int | None = None
    ) -> dict[str, Any]:
        return self.trigger.maybe_retrain(entities, detectors, event_ids, self.version, since_id)

    # -- introspection -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "champion": self.version,
            "entities": sorted(self.detectors),
            "calibrated": sorted(e for e, det in self.detectors.items() if det.calibration is not None),
            "starts": self.starts,
            "pid": os.getpid(),
            "window_rows": {e: det.config.span for e, det in sorted(self.detectors.items())},
            "rows_per_day": dict(sorted(self.rows_per_day.items())),
            "cursors": self.events.get_state(self._key("cursors"), {}),
            "events": self.events.count(self.model),
            "drift_events": self.events.count(self.model, only_drift=True),
            "last_job": self.trigger.last_job(),
            "last_skip": self.trigger.last_skip(),
            "retrain_gate": {e: self.gate.state(e, self.version) for e in sorted(self.detectors)},
            "load_error": self.load_error,
            "config": self.config.to_dict(),
        }

    def ping(self) -> str:
        return "ok"


def _registry() -> Any:
    """train.registry, imported in the monitor actor when first needed: the Serve ingress imports this
    module to reach the actors, and must not load MLflow for it (slow replica starts, and an import that
    raced the admin routes' registry calls)."""
    from train import registry

    return registry


def _monitor_metrics() -> dict[str, Any] | None:
    """Counters on Ray's metrics endpoint, when running inside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.util import metrics

    keys = ("model", "detector")
    return {
        "tests": metrics.Counter("raywatch_drift_tests_total", description="drift tests run", tag_keys=keys),
        "drift": metrics.Counter(
            "raywatch_drift_detected_total", description="drift tests that found drift", tag_keys=keys
        ),
        "jobs": metrics.Counter(
            "raywatch_retrain_jobs_total", description="retraining jobs submitted", tag_keys=("model",)
        ),
        "held": metrics.Counter(
            "raywatch_retrain_held_total",
            description="drifted windows the retraining gate held back, by rule (persistence, budget)",
            tag_keys=("model", "rule"),
        ),
    }


def get_or_create(
    model: str,
    config: dict[str, Any] | None = None,
    state_dir_path: str | None = None,
    tracking_uri: str | None = None,
) -> Any:
    """The named, detached monitor actor of `model`, created when missing. It restarts on failure
    (max_restarts=-1) and calls made while it restarts are retried (max_task_retries=-1)."""
    args = (model, config, state_dir_path or str(state_dir()), tracking_uri or _registry().tracking_uri())
    return named_actor(DriftMonitor, monitor_name(model), NAMESPACE, *args, max_task_retries=-1, max_concurrency=1)


def find(model: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(monitor_name(model), namespace=NAMESPACE)
    except ValueError:
        return None


def stop_all(models: tuple[str, ...] = DETECTOR_KINDS) -> list[str]:
    """Kill the monitor actors (detached: they outlive the Serve app). Their state stays in SQLite."""
    import ray

    stopped = []
    for model in models:
        actor = find(model)
        if actor is not None:
            ray.kill(actor, no_restart=True)
            stopped.append(monitor_name(model))
    return stopped
