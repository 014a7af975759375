"""Detector deployments: EnsembleDetector, LSTMDetector, AutoencoderDetector.

Each replica serves the model versions that the MLflow aliases `champion` and (when set) `challenger`
point to. It reads each version's manifest, and loads an entity's model (ONNX Runtime scorers) from
that entity's own artifacts when a request first needs it: Serve's model multiplexing keeps at most
`models_per_replica` model keys per replica (least recently used evicted first) and routes a key's
single-entity calls to a replica that holds it. A watcher thread polls the aliases and loads a new
version's models of the keys the replica holds beside the old ones before swapping the reference, so
in-flight requests finish on the version they started with. Single requests are grouped by
`@serve.batch` into one ONNX Runtime call per model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from detect.features import entity_windows
from detect.fleet import EntityStats
from detect.kinds import DETECTOR_KINDS, traits_of
from detect.logs import process_logging
from detect.runtime import GROWN_AT_ONCE
from detect.state import file_stamp, settled
from serve.history import HISTORY_ROWS
from serve.memory import MemoryTrim
from serve.schemas import result_rows
from serve.settings import ServeSettings
from serve.wire import full_column, full_tuple, is_packed, pack, packed, unpack
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
        top, top_values = _explained(contributions)
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

    def grown_columns(self, rows: np.ndarray, stats_rows: np.ndarray, stats_values: np.ndarray) -> dict[str, Any]:
        """`score_arrays` of many grown entities of a fleet model with one new row each (a fleet lane's
        call: `rows` (k, context + 1, M), their statistics' one checkpoint `stats_rows` (k, 1) and
        `stats_values` (k, 1, 2, M)), answered as the columns `serve.wire.pack` makes of its per-item
        dicts, with no dict per entity."""
        contributions = self.runtime.score_grown(rows, stats_values[:, 0, 0], stats_values[:, 0, 1], stats_rows[:, 0])
        top, top_values = _explained(contributions)
        k = len(contributions)
        return {
            "scores": contributions.sum(axis=1)[:, None],
            "threshold": [float(self.threshold)] * k,
            "probability": [None] * k,
            "top": top[:, None],
            "top_values": top_values[:, None],
            "metrics": [self.metrics] * k,
            "attribution_half_life_rows": [self.detector.attribution_half_life_rows] * k,
        }

    def takes_grown_columns(self, rows: np.ndarray, stats_rows: np.ndarray) -> bool:
        """Whether `grown_columns` scores these items as `score_arrays` would: enough of them for its
        vectorised path, each exactly its context and one new row, with one checkpoint of statistics."""
        grown_rows = getattr(self.runtime, "grown_rows", None)
        return (
            grown_rows is not None
            and len(rows) >= GROWN_AT_ONCE
            and rows.ndim == 3
            and rows.shape[1:] == (grown_rows, len(self.metrics))
            and stats_rows.shape == (len(rows), 1)
        )

    def forecast(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        window = entity_windows(rows, self.runtime.spec)[-1:]
        steps = []
        for _ in range(horizon):
            nxt = self.runtime.forecast_next(window)[0]
            steps.append(nxt)
            window = np.concatenate([window[:, 1:], nxt[None, None, :].astype(np.float32)], axis=1)
        return np.asarray(steps)


@dataclass(frozen=True)
class ModelSlot:
    """One model version a replica serves (the version an alias points to): its checked manifest, which
    says per entity what the ingress needs (metrics, context rows, threshold, served SPOT state). The
    entities' models load on demand, each from its own files (`entity_model`)."""

    manifest: registry.VersionManifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def entities(self) -> dict[str, dict[str, Any]]:
        return self.manifest.entities

    @property
    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "variant": self.manifest.variant}


def _explained(contributions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The TOP_METRICS metrics that explain each row's score most (indices, first first) and their
    contributions."""
    top = np.argsort(-contributions, axis=1)[:, :TOP_METRICS]
    return top, np.take_along_axis(contributions, top, axis=1)


def _model_input(item: dict[str, Any]) -> tuple:
    """(rows, new rows) for an entity's own model; a fleet model's item adds the entity's statistics and
    the row of its life that `rows` starts at (detect/fleet.py)."""
    if "model_key" not in item:
        return item["rows"], int(item["n_new"])
    rows, values = item["stats"]
    stats = EntityStats(np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float64))
    return item["rows"], int(item["n_new"]), (stats, int(item["offset"]))


def entity_model(slot: ModelSlot, key: str, parallel_rows: int | None = None) -> EntityModel:
    """Load one entity's (or fleet model's) model of `slot`'s version from its own artifacts."""
    files = registry.load_entity(slot.manifest, key)
    det = files.detector
    plugin = kind_of(det)
    runtime = plugin.runtime(det, files.graphs or plugin.export_graphs(det), parallel_rows=parallel_rows)
    return EntityModel(files.metrics, runtime, det, det.threshold_, det.context_rows(), det.served_spot())


def load_slot(kind: str, ref: str) -> ModelSlot | None:
    """The version `ref` names (a version number, or an alias), its manifest checked, no model loaded; None
    when the alias is unset. A manifest from before the manifest said what a served entity needs gets it
    from the entity's model."""
    version = ref if ref.isdigit() else registry.alias_version(kind, ref)
    if version is None:
        return None
    slot = ModelSlot(registry.load_manifest(kind, version))
    for key, meta in slot.entities.items():
        if "context_rows" not in meta:  # registered before round 2's per-entity loading
            model = entity_model(slot, key)
            meta.update(context_rows=model.context_rows, spot=model.spot)
        if meta["context_rows"] > HISTORY_ROWS:  # refused: the ingress could not send it what it reads
            raise ValueError(
                f"{key}: the model reads {meta['context_rows']} rows of history; the ingress keeps {HISTORY_ROWS}"
            )
    return slot


def load_models(kind: str, alias: str = "champion") -> dict[str, EntityModel]:
    """Every entity's model of the version `alias` points to, loaded now (tests, benchmarks, peers)."""
    slot = load_slot(kind, alias)
    if slot is None:
        raise KeyError(f"{kind} has no version with alias {alias!r}")
    return {key: entity_model(slot, key) for key in slot.entities}


class EntityModels:
    """One model key's loaded models in a replica, per version (champion, challenger): the value that
    Serve's multiplexed LRU keeps per key, so that a promotion does not need a second cache entry."""

    def __init__(self, key: str, parallel_rows: int | None) -> None:
        self.key = key
        self.parallel_rows = parallel_rows
        self.by_version: dict[str, EntityModel] = {}

    def of(self, slot: ModelSlot) -> EntityModel:
        model = self.by_version.get(slot.version)
        if model is None:
            model = self.by_version[slot.version] = entity_model(slot, self.key, self.parallel_rows)
        return model

    def keep(self, versions: set[str]) -> None:
        for version in list(self.by_version):
            if version not in versions:
                self.by_version.pop(version, None)


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
        process_logging()
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
        # the entity models this replica holds: Serve's multiplexed LRU of `EntityModels` per model key (it
        # reports the keys to the routers, which send a key's single-entity calls to a replica holding it);
        # `held` sees the same entries without owning them, for the version swap and /v1/models
        self.capacity = self.settings.models_per_replica
        self.held: weakref.WeakValueDictionary[str, EntityModels] = weakref.WeakValueDictionary()

        async def load_entity_models(key: str) -> EntityModels:
            return await asyncio.to_thread(self._entity_models, key)

        self._load_entity_models = load_entity_models
        self._lru = serve.multiplexed(max_num_models_per_replica=self.capacity)(load_entity_models)
        self._reports_slowed = False
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
                    slot = load_slot(self.kind, wanted)  # the version just read: one alias query
                    self._load_held(slot)
                    self.slots[alias] = slot  # one reference swap: no request sees half a model
                    log.info(f"{self.kind}: loaded {alias} v{wanted}")
            except Exception as exc:  # keep serving what is loaded
                error = f"{alias}: {type(exc).__name__}: {exc}"
                errors.append(error)
                log.warning(f"{self.kind}: {error}; keeping what is loaded")
                if alias == "champion" and self.slots["champion"] is None:
                    self._load_previous()
        self.load_error = "; ".join(errors) or None
        served = {slot.version for slot in self.slots.values() if slot}
        for models in list(self.held.values()):
            models.keep(served)
        for alias, slot in self.slots.items():
            self.version_gauge.set(float(slot.version) if slot else 0.0, tags={"detector": self.kind, "alias": alias})
        return self.versions()

    def _load_held(self, slot: ModelSlot) -> None:
        """Load `slot`'s models of the keys this replica holds before it serves that version, so a promotion
        neither refuses a request nor makes it wait for a download; a replica holding none loads one model as
        a probe. A model that fails its checks refuses the whole version, as a bundle that fails them would."""
        keys = [key for key in list(self.held) if key in slot.entities] or list(slot.entities)[:1]
        for key in keys:
            models = self.held.get(key)
            if models is not None:
                models.of(slot)
            else:
                entity_model(slot, key, self.settings.big_batch_rows)

    def _entity_models(self, key: str) -> EntityModels:
        """A new cache entry for `key`, with the champion's model of it loaded (what most calls want)."""
        models = EntityModels(key, self.settings.big_batch_rows)
        champion = self.slots["champion"]
        if champion is not None and key in champion.entities:
            models.of(champion)
        self.held[key] = models
        return models

    async def _models(self, key: str) -> EntityModels:
        """The models of `key` through Serve's multiplexed LRU (loaded on a miss, least recently used evicted)."""
        held = await self._lru(key)
        if not self._reports_slowed:  # the LRU's reporter exists from its first call on
            self._reports_slowed = report_model_ids_every(self._load_entity_models, self.settings.model_ids_report_s)
        return held

    def _load_previous(self) -> None:
        """A replica that starts while the champion is refused serves the previous champion meanwhile."""
        try:
            slot = load_slot(self.kind, registry.PREVIOUS)
            if slot is not None:
                self._load_held(slot)
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
                        key: {name: meta.get(name) for name in ("metrics", "context_rows", "threshold", "spot")}
                        for key, meta in slot.entities.items()
                    },
                }
        return {
            "detector": self.kind,
            "slots": slots,
            "load_error": self.load_error,
            "fault": self.fault,
            "models_held": sorted(self.held),
            "model_capacity": self.capacity,
            "model_ids_report_s": model_ids_report_s(self._load_entity_models),
        }

    def set_fault(self, on: bool) -> bool:
        """Fault injection for resilience tests: every model call fails while on."""
        self.fault = bool(on)
        return self.fault

    # -- scoring ---------------------------------------------------------------------------------------
    async def score_items(self, items: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]] | dict:
        """Score a list of items in one call (what the ingress sends: the requests it has gathered), or the
        items packed as columns (`serve.wire`: a snapshot's chunk), answered packed."""
        if is_packed(items):
            answer = await self._score_lane_call(items)
            return answer if answer is not None else pack(await self._score_list(unpack(items)))
        return await self._score_list(items)

    async def _score_lane_call(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """A fleet lane's call (serve/fleet_lane.py: one new row of many grown entities, one fleet model, one
        path), scored and answered as columns (`EntityModel.grown_columns`): what `pack` would make of the
        per-item path's answer, without a dict per entity either way. None for any other call, or where
        anything is amiss: the per-item path takes it, and reports each item's error."""
        lane = self._lane_input(payload)
        if lane is None:
            return None
        path, key, rows, stats_rows, stats_values = lane
        found = (await self._models_of([{"path": path, "model_key": key, "entity": key}]))[0]
        if isinstance(found, Exception):  # a fault, a key the version lacks: the per-item path says so per item
            return None
        slot, model = found
        if not model.takes_grown_columns(rows, stats_rows):
            return None
        try:
            arrays = await self._scored(len(rows), model.grown_columns, rows, stats_rows, stats_values)
        except Exception as exc:
            log.warning("lane call failed as columns; scoring it item by item", extra={"error": str(exc)})
            return None
        n = len(rows)
        ref = packed(n, {key: [value] * n for key, value in slot.ref.items()})
        self.batch_sizes.observe(n, tags={"detector": self.kind})
        self.memory.after(n)
        return packed(n, {"ok": [True] * n}, nested={"model": ref, "arrays": packed(n, arrays)})

    @staticmethod
    def _lane_input(payload: dict[str, Any]) -> tuple | None:
        """(path, model key, rows, statistics' rows and values) of a packed call with one path and one model
        key for all its items, each with one new row; else None."""
        columns = {key: full_column(payload, key) for key in ("path", "model_key", "n_new", "rows")}
        stats = full_tuple(payload, "stats")
        if any(value is None for value in columns.values()) or stats is None or len(stats) != 2:
            return None
        paths, keys = set(columns["path"]), set(columns["model_key"])
        if len(paths) != 1 or len(keys) != 1 or set(columns["n_new"]) != {1}:
            return None
        rows, (stats_rows, stats_values) = columns["rows"], stats
        if not all(isinstance(a, np.ndarray) for a in (rows, stats_rows, stats_values)):
            return None
        return (
            paths.pop(),
            keys.pop(),
            np.asarray(rows, dtype=np.float64),
            np.asarray(stats_rows, dtype=np.int64),
            np.asarray(stats_values, dtype=np.float64),
        )

    async def _score_list(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`score_items` of a list."""
        models = await self._models_of(items)
        new_rows = sum(int(item.get("n_new", 1)) for item in items)
        return await self._scored(new_rows, self._score_items, items, models)

    async def _scored(self, new_rows: int, score: Callable[..., Any], *args: Any) -> Any:
        """`score(*args)`, the scoring of `new_rows` rows. Big work (PARALLEL_ROWS new rows or more) runs on a
        worker thread, so the replica takes the next call in meanwhile and two big batches use two cores
        (numpy and ONNX Runtime release the GIL); small work stays on the event loop, where a thread hand-off
        would cost more than the scoring."""
        if new_rows < self.settings.big_batch_rows:
            return score(*args)
        if self._big is None:
            self._big = asyncio.Semaphore(self.settings.big_at_once)  # in the replica's event loop
        async with self._big:
            return await asyncio.to_thread(score, *args)

    async def _models_of(self, items: list[dict[str, Any]]) -> list[tuple[ModelSlot, EntityModel] | Exception]:
        """Per item: the version that serves it and its model there, loaded through the replica's LRU when it
        is not held; or why it cannot be scored (reported per item: one bad item must not fail the others)."""
        out: list[tuple[ModelSlot, EntityModel] | Exception] = []
        entries: dict[str, EntityModels] = {}  # one LRU lookup per key and call (a snapshot: thousands of items)
        for item in items:
            try:
                if self.fault:
                    raise RuntimeError("injected model failure")
                slot = self.slots[item["path"]] or self.slots["champion"]
                if slot is None:
                    raise RuntimeError(
                        f"no {self.kind} model is loaded ({self.load_error or 'no champion registered'})"
                    )
                key = item.get("model_key") or item["entity"]  # a fleet model's key for a new entity
                if key not in slot.entities:
                    raise KeyError(f"{slot.name} v{slot.version} has no model for entity {item['entity']!r}")
                if key not in entries:
                    entries[key] = await self._models(key)
                out.append((slot, entries[key].of(slot)))
            except Exception as exc:
                out.append(exc)
        return out

    def _score_items(
        self, items: list[dict[str, Any]], models: list[tuple[ModelSlot, EntityModel] | Exception]
    ) -> list[dict[str, Any]]:
        """Score a list of items with their models (`_models_of`), grouped by model: one ONNX Runtime call
        per group. `score` gathers single callers into such lists with `@serve.batch`."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[int, tuple[ModelSlot, EntityModel, list[int]]] = {}
        for i, (item, found) in enumerate(zip(items, models)):
            if isinstance(found, Exception):
                out[i] = {"ok": False, "error": f"{type(found).__name__}: {found}"}
                continue
            try:
                item["rows"] = np.asarray(item["rows"], dtype=np.float64)
            except Exception as exc:
                out[i] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                continue
            slot, model = found
            # one ONNX Runtime call per model: a fleet model's items from many entities go together
            groups.setdefault(id(model), (slot, model, []))[2].append(i)
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
        return self._score_items(items, await self._models_of(items))

    async def score(self, item: dict[str, Any]) -> dict[str, Any]:
        return await self.score_batch(item)

    async def forecast(self, entity: str, rows: list[list[float]], horizon: int) -> dict[str, Any]:
        slot = self.slots["champion"]
        if slot is None or entity not in slot.entities:
            raise KeyError(f"no forecasting model for entity {entity!r}")
        model = (await self._models(entity)).of(slot)
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


def _ids_report(loader: Any) -> tuple[Any, Any, str] | None:
    """(the multiplexed LRU that `serve.multiplexed` keeps for `loader` once it is first called, its metrics
    pusher, the name of its model-id report task), or None while there is no LRU or where this Ray's
    Serve lacks those internals."""
    lru = getattr(loader, "__serve_multiplex_wrapper", None)
    pusher = getattr(lru, "metrics_pusher", None)
    task = getattr(lru, "_PUSH_MULTIPLEXED_MODEL_IDS_TASK_NAME", None)
    if pusher is None or task not in getattr(pusher, "_tasks", {}):
        return None
    return lru, pusher, task


def report_model_ids_every(loader: Any, interval_s: float) -> bool:
    """Make the multiplexed LRU of `loader` report the model keys it holds every `interval_s` instead of
    Serve's fixed 0.1 s (`ray.serve._private.constants.PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S`). Each report
    sets one gauge per held model (`serve_registered_multiplexed_model_id`): with 101 models held, 9.9% of a
    detector replica's py-spy samples during a 1,000-machine snapshot load (2026-12-04). A newly loaded key
    still reaches the routers at the next report. Serve has no setting for it, so this reaches into the
    LRU's metrics pusher. Returns False while the LRU is not made yet (call again after its next call);
    True once done, or once it is clear that this Ray has no such internals (Serve's interval stays)."""
    if getattr(loader, "__serve_multiplex_wrapper", None) is None:
        return False
    found = _ids_report(loader)
    if found is None:
        log.warning("Serve's multiplexed LRU reports its model ids every 0.1 s (its internals were not found)")
        return True
    lru, pusher, task = found
    pusher.register_or_update_task(task, lru._push_model_ids_info, interval_s)
    return True


def model_ids_report_s(loader: Any) -> float | None:
    """How often the multiplexed LRU of `loader` reports its model keys (None before its first call)."""
    found = _ids_report(loader)
    return None if found is None else float(found[1]._tasks[found[2]].interval_s)


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
