"""Detector deployments: EnsembleDetector, LSTMDetector, AutoencoderDetector.

Each replica holds ONNX Runtime scorers for the model versions that the MLflow aliases `champion`
and (when set) `challenger` point to, one per entity. A watcher thread polls the aliases and loads a
new version beside the old one before swapping the reference, so in-flight requests finish on the
version they started with. Single requests are grouped by `@serve.batch` into one ONNX Runtime call
per entity model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from detect.features import entity_windows
from detect.fleet import EntityStats
from detect.kinds import DETECTOR_KINDS, traits_of
from detect.state import file_stamp, settled
from serve.history import HISTORY_ROWS
from serve.memory import MemoryTrim
from serve.schemas import result_rows
from serve.settings import ServeSettings
from train import registry
from train.kinds import kind_of

log = logging.getLogger("raywatch.serve")

TOP_METRICS = 3


@dataclass
class EntityModel:
    """One entity's detector inside a loaded version."""

    metrics: list[str]
    runtime: Any
    detector: Any
    threshold: float
    context_rows: int  # rows of history needed before a new row to score it exactly as in batch
    spot: dict[str, Any] | None = None  # the served threshold's starting state (detect.thresholds.SPOT.state)

    def score_rows(self, rows: np.ndarray, n_new: int) -> list[dict[str, Any]]:
        """Score the last `n_new` of `rows` (older rows are context). Returns one dict per new row."""
        return result_rows(self.score_arrays([(rows, n_new)])[0])

    def score_arrays(self, items: list[tuple[np.ndarray, int]]) -> list[dict[str, Any]]:
        """Score several requests' new rows with one ONNX Runtime call: what dynamic batching buys.

        Each item is (rows, n_new) for this entity, oldest first; the windows of every item's new
        rows are stacked, scored together and split again, so the result for an item is the same as
        scoring it alone (the same windows as the batch path, see detect.features.tail_windows).
        Per item: numpy arrays (cheap to send between replicas; `result_rows` makes the JSON rows)."""
        counts = [int(item[1]) for item in items]
        scores, probability, contributions = self.runtime.score_tails(items)
        top = np.argsort(-contributions, axis=1)[:, :TOP_METRICS]
        top_values = np.take_along_axis(contributions, top, axis=1)
        out, at = [], 0
        for n in counts:
            part = slice(at, at + n)
            out.append(
                {
                    "scores": scores[part],
                    "threshold": float(self.threshold),
                    "probability": None if probability is None else probability[part],
                    "top": top[part],
                    "top_values": top_values[part],
                    "metrics": self.metrics,
                    # the ingress holds each metric's peak over this many rows, as `explain` does
                    "attribution_half_life_rows": self.detector.attribution_half_life_rows,
                }
            )
            at += n
        return out

    def forecast(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        window = entity_windows(rows, self.runtime.spec)[-1:]
        steps = []
        for _ in range(horizon):
            nxt = self.runtime.forecast_next(window)[0]
            steps.append(nxt)
            window = np.concatenate([window[:, 1:], nxt[None, None, :].astype(np.float32)], axis=1)
        return np.asarray(steps)


@dataclass
class ModelSlot:
    """One loaded model version."""

    name: str
    version: str
    variant: str
    entities: dict[str, EntityModel]

    @property
    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "variant": self.variant}


def _model_input(item: dict[str, Any]) -> tuple:
    """(rows, new rows) for an entity's own model; a fleet model's item adds the entity's statistics and
    the row of its life that `rows` starts at (detect/fleet.py)."""
    if "model_key" not in item:
        return item["rows"], int(item["n_new"])
    rows, values = item["stats"]
    stats = EntityStats(np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float64))
    return item["rows"], int(item["n_new"]), (stats, int(item["offset"]))


def load_slot(kind: str, alias: str, parallel_rows: int | None = None) -> ModelSlot | None:
    version = registry.alias_version(kind, alias)
    if version is None:
        return None
    bundle, version = registry.load_bundle(kind, version)
    entities = {}
    for entity, det in bundle.detectors.items():
        plugin = kind_of(det)
        graphs = bundle.graphs.get(entity) or plugin.export_graphs(det)
        runtime = plugin.runtime(det, graphs, parallel_rows=parallel_rows)
        context = plugin.context_rows(det)
        if context > HISTORY_ROWS:  # refused: the ingress could not send it what it reads
            raise ValueError(f"{entity}: the model reads {context} rows of history; the ingress keeps {HISTORY_ROWS}")
        entities[entity] = EntityModel(bundle.metrics[entity], runtime, det, det.threshold_, context, det.served_spot())
    return ModelSlot(registry.model_name(kind), version, bundle.variant, entities)


def _store_stamp() -> tuple[int, ...] | None:
    """Modification stamp of a local SQLite MLflow store (None for any other store, or no file):
    lets the alias watcher skip its query while nothing was written, instead of asking MLflow each
    second in every replica."""
    uri = registry.tracking_uri()
    return file_stamp(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


class DetectorServer:
    """The body of every detector kind's deployment (one per kind, made by `_deployment`)."""

    kind: str = ""

    def __init__(
        self,
        tracking_uri: str | None = None,
        reload_interval_s: float = 1.0,
        max_batch_size: int = 64,
        batch_wait_timeout_s: float = 0.002,
        settings: ServeSettings | None = None,
    ) -> None:
        self.settings = settings or ServeSettings()
        if tracking_uri:
            registry.use_store(tracking_uri)
        from ray.util import metrics

        self.batch_sizes = metrics.Histogram(
            "raywatch_batch_size",
            description="rows per model call",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1024],
            tag_keys=("detector",),
        )
        self.version_gauge = metrics.Gauge(
            "raywatch_model_version", description="served model version", tag_keys=("detector", "alias")
        )
        self.slots: dict[str, ModelSlot | None] = {"champion": None, "challenger": None}
        self._big: asyncio.Semaphore | None = None
        self.fault = False
        self.memory = MemoryTrim()  # freed pages back to the system after big calls (a fleet snapshot)
        self.load_error: str | None = None
        self._stamp = settled(_store_stamp())  # before loading: a write during the load is seen by the watcher
        self._reload()
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(reload_interval_s,), daemon=True)
        self._watcher.start()

    # -- model versions ------------------------------------------------------------------------------
    def _reload(self) -> dict[str, str | None]:
        """Load what the aliases point to now; swap in new versions only once fully loaded. A version
        that cannot be loaded (registry down, checksum mismatch, refused artifact) leaves what is
        loaded serving; a replica with nothing loaded falls back to the `previous` champion."""
        errors = []
        for alias in ("champion", "challenger"):
            try:
                wanted = registry.alias_version(self.kind, alias)
                current = self.slots[alias]
                if wanted is None:
                    self.slots[alias] = None
                elif current is None or current.version != wanted:
                    self.slots[alias] = load_slot(
                        self.kind, alias, self.settings.big_batch_rows
                    )  # one reference swap: no request sees half a model
                    log.info(f"{self.kind}: loaded {alias} v{wanted}")
            except Exception as exc:  # keep serving what is loaded
                error = f"{alias}: {type(exc).__name__}: {exc}"
                errors.append(error)
                log.warning(f"{self.kind}: {error}; keeping what is loaded")
                if alias == "champion" and self.slots["champion"] is None:
                    self._load_previous()
        self.load_error = "; ".join(errors) or None
        for alias, slot in self.slots.items():
            self.version_gauge.set(float(slot.version) if slot else 0.0, tags={"detector": self.kind, "alias": alias})
        return self.versions()

    def _load_previous(self) -> None:
        """A replica that starts while the champion is refused serves the previous champion meanwhile."""
        try:
            slot = load_slot(self.kind, registry.PREVIOUS, self.settings.big_batch_rows)
        except Exception as exc:
            log.warning(f"{self.kind}: previous champion not loadable either: {type(exc).__name__}: {exc}")
            return
        if slot is not None:
            self.slots["champion"] = slot
            log.warning(f"{self.kind}: serving the previous champion v{slot.version} meanwhile")

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            stamp = _store_stamp()
            if stamp is not None and stamp == self._stamp and self.load_error is None:
                continue  # a SQLite store nobody wrote to: the aliases cannot have moved
            self._stamp = settled(stamp)
            self._reload()

    def reload(self) -> dict[str, str | None]:
        return self._reload()

    def versions(self) -> dict[str, str | None]:
        return {alias: (slot.version if slot else None) for alias, slot in self.slots.items()}

    def info(self) -> dict[str, Any]:
        slots = {}
        for alias, slot in self.slots.items():
            if slot:
                slots[alias] = {
                    **slot.ref,
                    "entities": {
                        e: {
                            "metrics": m.metrics,
                            "context_rows": m.context_rows,
                            "threshold": m.threshold,
                            "spot": m.spot,
                        }
                        for e, m in slot.entities.items()
                    },
                }
        return {"detector": self.kind, "slots": slots, "load_error": self.load_error, "fault": self.fault}

    def set_fault(self, on: bool) -> bool:
        """Fault injection for resilience tests: every model call fails while on."""
        self.fault = bool(on)
        return self.fault

    # -- scoring ---------------------------------------------------------------------------------------
    async def score_items(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score a list of items in one call (what the ingress sends: the requests it has gathered).
        Big ones (PARALLEL_ROWS new rows or more) are scored on a worker thread, so the replica takes the
        next call in meanwhile and two big batches use two cores (numpy and ONNX Runtime release the GIL);
        small ones stay on the event loop, where a thread hand-off would cost more than the scoring."""
        if sum(int(item.get("n_new", 1)) for item in items) >= self.settings.big_batch_rows:
            if self._big is None:
                self._big = asyncio.Semaphore(self.settings.big_at_once)  # in the replica's event loop
            async with self._big:
                return await asyncio.to_thread(self._score_items, items)
        return self._score_items(items)

    def _score_items(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score a list of items, grouped by (model version, entity): one ONNX Runtime call per group.
        `score` gathers single callers into such lists with `@serve.batch`."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[tuple[int, str], tuple[ModelSlot, EntityModel, list[int]]] = {}
        for i, item in enumerate(items):
            try:
                if self.fault:
                    raise RuntimeError("injected model failure")
                slot = self.slots[item["path"]] or self.slots["champion"]
                if slot is None:
                    raise RuntimeError(
                        f"no {self.kind} model is loaded ({self.load_error or 'no champion registered'})"
                    )
                key = item.get("model_key") or item["entity"]  # a fleet model's key for a new entity
                model = slot.entities.get(key)
                if model is None:
                    raise KeyError(f"{slot.name} v{slot.version} has no model for entity {item['entity']!r}")
                item["rows"] = np.asarray(item["rows"], dtype=np.float64)
                # one ONNX Runtime call per model: a fleet model's items from many entities go together
                groups.setdefault((id(slot), key), (slot, model, []))[2].append(i)
            except Exception as exc:  # reported per item: one bad item must not fail its batch-mates
                out[i] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        for slot, model, idx in groups.values():
            pairs = [_model_input(items[i]) for i in idx]
            try:
                scored = model.score_arrays(pairs)
            except Exception:  # find the bad item(s): score the group one by one
                scored = []
                for pair in pairs:
                    try:
                        scored.append(model.score_arrays([pair])[0])
                    except Exception as exc:
                        scored.append(exc)
            for i, arrays in zip(idx, scored):
                if isinstance(arrays, Exception):
                    out[i] = {"ok": False, "error": f"{type(arrays).__name__}: {arrays}"}
                else:
                    out[i] = {"ok": True, "model": slot.ref, "arrays": arrays}
        self.batch_sizes.observe(len(items), tags={"detector": self.kind})
        self.memory.after(len(items))
        return out

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def score_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._score_items(items)

    async def score(self, item: dict[str, Any]) -> dict[str, Any]:
        return await self.score_batch(item)

    async def forecast(self, entity: str, rows: list[list[float]], horizon: int) -> dict[str, Any]:
        slot = self.slots["champion"]
        if slot is None or entity not in slot.entities:
            raise KeyError(f"no forecasting model for entity {entity!r}")
        model = slot.entities[entity]
        steps = model.forecast(np.asarray(rows, dtype=np.float64), horizon)
        return {"model": slot.ref, "metrics": model.metrics, "steps": steps.tolist()}

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()


# autoscaling and the access log come from ServeSettings, applied by `detector_deployments`
_DEPLOYMENT = dict(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    graceful_shutdown_timeout_s=5,
    health_check_period_s=2,  # a dead replica is noticed in seconds, not Serve's default 10 s
)


def _deployment(kind: str) -> Any:
    """The Serve deployment of one detector kind: a `DetectorServer` subclass that knows its kind's name,
    made a module attribute so that Ray pickles it by reference, like a class written out."""
    name = traits_of(kind).deployment
    server = type(f"{name}Deployment", (DetectorServer,), {"kind": kind, "__module__": __name__})
    globals()[server.__name__] = server
    return serve.deployment(**_DEPLOYMENT)(server).options(name=name)


DEPLOYMENTS = {kind: _deployment(kind) for kind in DETECTOR_KINDS}


class InProcessHandle:
    """A detector kind's `DetectorServer` inside the calling process (the ingress replica, `in_ingress`),
    called as its deployment would be: `handle.score_items.remote(items)` and the like, awaited. The same
    code loads, watches and scores the models; only the hop to another replica is gone."""

    def __init__(self, kind: str, **server_args: Any) -> None:
        server = type(f"InProcess{traits_of(kind).deployment}", (DetectorServer,), {"kind": kind})
        self.server = server(**server_args)

    def __getattr__(self, method: str) -> _InProcessMethod:
        bound = self.__dict__[method] = _InProcessMethod(getattr(self.server, method))  # made once per method
        return bound


@dataclass(frozen=True)
class _InProcessMethod:
    fn: Any

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        result = self.fn(*args, **kwargs)
        return await result if asyncio.iscoroutine(result) else result


def detector_deployments(settings: ServeSettings) -> dict[str, Any]:
    """The detector deployments with `settings`' autoscaling and access log (serve/config.yaml's
    per-deployment options still override these when Serve applies the file); a kind the ingress runs
    itself (`in_ingress`) has none."""
    # the ingress logs each HTTP request; a line per internal model call would cost the detectors
    # about a tenth of their per-call CPU (detector_access_log brings it back)
    options = {
        "autoscaling_config": settings.autoscaling(),
        "logging_config": {"enable_access_log": settings.detector_access_log},
    }
    return {
        kind: deployment.options(**options)
        for kind, deployment in DEPLOYMENTS.items()
        if kind not in settings.in_ingress
    }
