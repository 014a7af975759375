"""MLflow tracking and the model registry: runs, registered versions, aliases champion / previous.

Default tracking store: a SQLite file `mlflow.db` in the working directory, artifacts in
`./mlartifacts`. `MLFLOW_TRACKING_URI` points it elsewhere.

Integrity: a bundle's manifest lists the SHA-256 of every artifact file (`detect.bundle`), and at
registration the manifest's own SHA-256 is recorded as the model version's tag `bundle_sha256`, in the
tracking store, apart from the artifact store. Loading refuses a version whose downloaded manifest does
not match that tag, any file whose checksum does not match the manifest, and any file that is not JSON,
NPZ (loaded with `allow_pickle=False`) or ONNX: nothing from the registry is unpickled.

An unreachable or unreadable tracking store raises (`MlflowException`); only "not found" answers
become `None` / `RegistryError`, so a registry outage is never mistaken for "no such alias".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from detect.bundle import BundleError, EntityModelFiles, ModelBundle, entity_files, sha256
from detect.bundle import load_entity as load_entity_files
from detect.kinds import DETECTOR_KINDS

log = logging.getLogger(__name__)

EXPERIMENT = "raywatch"
MODEL_NAMES = {kind: f"raywatch-{kind}" for kind in DETECTOR_KINDS}
CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
T = TypeVar("T")
ROLLOUT_TAG = "raywatch.rollout"  # a retrained version to roll out as a canary: {"status", "plan"} (JSON)
CHECKSUM_TAG = "bundle_sha256"  # SHA-256 of the version's manifest.json, recorded at registration
DATA_TAG = "data_sha256"  # SHA-256 of the training data's per-entity hashes (`train.assemble.data_sha256`)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done: unknown model or version, no previous champion."""


def _not_found(exc: MlflowException) -> bool:
    """Whether MLflow answered "no such model / version / alias" (and not: the store failed)."""
    code = getattr(exc, "error_code", "")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return code in ("INVALID_PARAMETER_VALUE", "NOT_FOUND") and "not found" in str(exc).lower()


def _lookup(call: Callable[[], T]) -> T | None:
    """`call()`, or None when MLflow answers "not found"; any other failure (the store is down or
    unreadable) raises, so an outage is never taken for "no such model / version / alias"."""
    try:
        return call()
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


_store_uri: str | None = None  # set by `use_store`: a long-lived process (a Serve replica, a monitor) told its store


def use_store(uri: str) -> None:
    """Point this process's registry calls at `uri` (what deployments and monitors are given as an argument)."""
    global _store_uri
    _store_uri = uri
    mlflow.set_tracking_uri(uri)


def tracking_uri() -> str:
    """`use_store`'s URI, else MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return _store_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup(experiment: str = EXPERIMENT) -> MlflowClient:
    """Point MLflow at the configured store and make sure the experiment exists."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return MlflowClient(uri)


def model_name(model: str) -> str:
    if model in MODEL_NAMES.values():
        return model
    if model not in MODEL_NAMES:
        raise RegistryError(f"unknown model {model!r}; choose from {sorted(MODEL_NAMES)}")
    return MODEL_NAMES[model]


def register_bundle(bundle: ModelBundle, run_id: str, tags: dict[str, str] | None = None) -> str:
    """Log the bundle as the run's artifacts under `bundle/` and register a new model version."""
    client = setup()
    name = model_name(bundle.kind)
    with tempfile.TemporaryDirectory() as folder:
        digest = sha256(bundle.save(folder) / "manifest.json")
        client.log_artifacts(run_id, folder, artifact_path="bundle")
    if _lookup(lambda: client.get_registered_model(name)) is None:
        client.create_registered_model(name, description=f"raywatch {bundle.kind} detector bundles")
    source = f"{client.get_run(run_id).info.artifact_uri}/bundle"
    tags = {"variant": "fp32", **(tags or {}), CHECKSUM_TAG: digest, **_data_tag(bundle)}
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    log.info("registered model version", extra={"model": name, "version": version.version})
    return str(version.version)


def data_digest(per_entity: dict[str, str]) -> str:
    """One SHA-256 over the per-entity training-data hashes (the manifest keeps each entity's)."""
    joined = "\n".join(f"{entity} {digest}" for entity, digest in sorted(per_entity.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def _data_tag(bundle: ModelBundle) -> dict[str, str]:
    per_entity = bundle.info.get("data_sha256") or {}
    return {DATA_TAG: data_digest(per_entity)} if per_entity else {}


def lineage(model: str, version: str | int) -> dict[str, Any]:
    """Where a served version came from: its MLflow run, the training data's hash, and the version it
    was derived from (a compressed variant's source, a retrained version's champion)."""
    client, name = setup(), model_name(model)
    _check_version(client, name, str(version))
    mv = client.get_model_version(name, str(version))
    run = _lookup(lambda: client.get_run(mv.run_id))
    return {
        "model": name,
        "version": str(mv.version),
        "variant": mv.tags.get("variant", "fp32"),
        "run_id": mv.run_id,
        "run_name": run.info.run_name if run else None,
        "data_sha256": mv.tags.get(DATA_TAG),
        "derived_from": mv.tags.get("source_version") or mv.tags.get("retrained_from"),
        "bundle_sha256": mv.tags.get(CHECKSUM_TAG),
    }


def alias_version(model: str, alias: str) -> str | None:
    client = setup()
    found = _lookup(lambda: client.get_model_version_by_alias(model_name(model), alias))
    return None if found is None else str(found.version)


def _check_version(client: MlflowClient, name: str, version: str) -> None:
    if _lookup(lambda: client.get_model_version(name, str(version))) is None:
        raise RegistryError(f"{name} has no version {version}")


def promote(model: str, version: str | int) -> dict[str, Any]:
    """Make `version` the champion; the champion it replaces is kept as `previous`."""
    client, name = setup(), model_name(model)
    _check_version(client, name, str(version))
    current = alias_version(model, CHAMPION)
    if current == str(version):
        return {"model": name, "champion": current, "previous": alias_version(model, PREVIOUS), "changed": False}
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    log.info("promoted", extra={"model": name, "champion": str(version), "previous": current})
    return {"model": name, "champion": str(version), "previous": current, "changed": True}


def rollback(model: str) -> dict[str, Any]:
    """Restore the previous champion; the rolled-back version becomes `previous` (rollback twice = undo)."""
    client, name = setup(), model_name(model)
    previous, current = alias_version(model, PREVIOUS), alias_version(model, CHAMPION)
    if previous is None:
        raise RegistryError(f"{name} has no previous champion to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    log.info("rolled back", extra={"model": name, "champion": previous, "previous": current})
    return {"model": name, "champion": previous, "previous": current}


def _model_version(model: str, ref: str) -> tuple[str, Any]:
    """(registered name, MLflow model version) of a version number or an alias."""
    client, name = setup(), model_name(model)
    get = client.get_model_version if ref.isdigit() else client.get_model_version_by_alias
    mv = _lookup(lambda: get(name, ref))
    if mv is None:
        raise RegistryError(f"{name} has no version or alias {ref!r}")
    return name, mv


def _checked_manifest(name: str, mv: Any, manifest: Path) -> dict[str, Any]:
    """The downloaded manifest of `mv`, once its SHA-256 matches the one recorded at registration."""
    recorded = (mv.tags or {}).get(CHECKSUM_TAG)
    if not recorded:  # integrity fails closed: a manifest alone can be rewritten with the files it lists
        raise BundleError(
            f"{name} version {mv.version} has no {CHECKSUM_TAG} tag (the manifest's checksum recorded at"
            " registration): refusing the version; register it again with `raywatch train` or register_bundle"
        )
    if not manifest.is_file() or sha256(manifest) != recorded:
        raise BundleError(
            f"{name} version {mv.version}: manifest.json does not match the checksum recorded at registration"
            f" ({CHECKSUM_TAG}); refusing the version"
        )
    return json.loads(manifest.read_text())


def load_bundle(model: str, ref: str = CHAMPION, dst: str | Path | None = None) -> tuple[ModelBundle, str]:
    """Download and load the bundle of a version number or an alias; returns (bundle, version).

    Raises `BundleError` when the download does not match the checksums recorded at registration
    (the `bundle_sha256` tag, then the manifest's per-file SHA-256) or holds a file that is not JSON,
    NPZ or ONNX."""
    name, mv = _model_version(model, ref)
    scratch = dst is None  # a download of our own: removed once loaded (a bundle loads into memory)
    folder = Path(dst or tempfile.mkdtemp(prefix="raywatch-bundle-"))
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(folder)))
        _checked_manifest(name, mv, path / "manifest.json")
        return ModelBundle.load(path), str(mv.version)
    finally:
        if scratch:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class VersionManifest:
    """A registered version's checked manifest: what it holds per entity, without any model loaded."""

    name: str
    version: str
    source: str  # the version's artifact location (its bundle folder)
    manifest: dict[str, Any]

    @property
    def entities(self) -> dict[str, dict[str, Any]]:
        return self.manifest["entities"]

    @property
    def variant(self) -> str:
        return self.manifest.get("info", {}).get("variant", "fp32")


def load_manifest(model: str, ref: str = CHAMPION) -> VersionManifest:
    """Download only the manifest of a version number or an alias, checked against the SHA-256 recorded
    at registration; the entities' models are then loaded one by one (`load_entity`)."""
    name, mv = _model_version(model, ref)
    with tempfile.TemporaryDirectory(prefix="raywatch-manifest-") as folder:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/manifest.json", dst_path=folder)
        return VersionManifest(name, str(mv.version), mv.source, _checked_manifest(name, mv, Path(path)))


def load_entity(version: VersionManifest, entity: str) -> EntityModelFiles:
    """One entity's model of a version: downloads the entity's own folders of the bundle (its detector and
    its ONNX graphs) and nothing else, and refuses them as `load_bundle` would refuse the whole bundle (a
    checksum mismatch, a file the manifest does not list, a file that is not JSON, NPZ or ONNX)."""
    folders = sorted({Path(rel).parent.as_posix() for rel in entity_files(version.manifest, entity)})
    with tempfile.TemporaryDirectory(prefix="raywatch-entity-") as scratch:
        root = Path(scratch)
        for folder in folders:
            (root / folder).parent.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{version.source}/{folder}", dst_path=str((root / folder).parent)
            )
        try:
            return load_entity_files(root, version.manifest, entity)
        except BundleError as exc:
            raise BundleError(f"{version.name} version {version.version}: {exc}") from None


def versions(model: str) -> list[dict[str, Any]]:
    client, name = setup(), model_name(model)
    found = _lookup(lambda: client.search_model_versions(f"name='{name}'"))
    if not found:
        return []
    # search results carry no aliases: read them from the registered model
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    out = []
    for mv in sorted(found, key=lambda v: int(v.version)):
        out.append(
            {
                "version": mv.version,
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "tags": dict(mv.tags),
                "run_id": mv.run_id,
            }
        )
    return out


class RolloutBusy(RegistryError):
    """A rollout holds the challenger slot: another one cannot be requested until it ends."""


ROLLOUT_HOLDS_SLOT = ("requested", "started")  # ROLLOUT_TAG statuses of a challenger whose rollout is under way


def rollout_in_progress(model: str) -> str | None:
    """The challenger's version while its rollout is requested or running, else None. The serving app marks
    a started rollout's version (`mark_rollout`) and empties the challenger slot when the rollout ends
    (completed, rolled back or aborted), so a challenger whose tag says so holds a rollout under way."""
    held = alias_version(model, CHALLENGER)
    request = rollout_request(model, held) if held is not None else None
    return held if request and request.get("status") in ROLLOUT_HOLDS_SLOT else None


def request_rollout(model: str, version: str | int, plan: dict[str, Any] | None = None) -> None:
    """Ask the serving app to roll `version` out as a canary (serve/rollout.py): it becomes the challenger
    and its ROLLOUT_TAG says "requested" (with the plan, default steps when None). The ingress starts the
    rollout when it loads the challenger and marks the tag "started"; the request's "id" goes into the
    rollout it starts, so that no ingress replica starts it twice (`RolloutStore.start`).

    Refused (`RolloutBusy`), the alias untouched, while a rollout holds the challenger slot: the canary's
    share is scored by whatever the alias points to, so moving it would hand a running rollout's traffic to
    another version, which the rollout would then judge, and promote its own."""
    running = rollout_in_progress(model)
    if running is not None:
        raise RolloutBusy(f"{model_name(model)}: a rollout of version {running} holds the challenger slot")
    set_alias(model, CHALLENGER, version)
    request = json.dumps({"status": "requested", "plan": plan or {}, "id": uuid.uuid4().hex[:12]})
    setup().set_model_version_tag(model_name(model), str(version), ROLLOUT_TAG, request)


def rollout_request(model: str, version: str | int) -> dict[str, Any] | None:
    """The version's rollout request ({"status", "plan", "id"}; no "id" in a tag written before
    2026-12-07), or None when none was made."""
    mv = _lookup(lambda: setup().get_model_version(model_name(model), str(version)))
    return rollout_request_in(mv.tags or {}) if mv is not None else None


def rollout_request_in(tags: dict[str, str]) -> dict[str, Any] | None:
    """The rollout request a version's tags hold (as `versions` lists them), or None."""
    raw = tags.get(ROLLOUT_TAG)
    return json.loads(raw) if raw else None


def mark_rollout(model: str, version: str | int, status: str, reason: str | None = None) -> None:
    """Set the status of the version's rollout request ("started", "refused" with the reason, ...); a
    reason given with an earlier status is dropped."""
    request = rollout_request(model, version) or {"plan": {}}
    request["status"] = status
    request.pop("reason", None)
    if reason is not None:
        request["reason"] = reason
    setup().set_model_version_tag(model_name(model), str(version), ROLLOUT_TAG, json.dumps(request))


def refuse_rollout(model: str, version: str | int, reason: str, running: str | None = None) -> None:
    """Mark a rollout request that cannot start "refused", with the reason, and give the challenger slot back
    what the request took from it: the rollout under way (`running`, whose canary share the slot scores; the
    request moved the alias because the tags missed it, now marked "started"), else nothing, so that no
    replica keeps loading a version nobody will serve. A slot moved again since is left alone."""
    mark_rollout(model, version, "refused", reason)
    if alias_version(model, CHALLENGER) != str(version):
        return
    if running is None:
        clear_alias(model, CHALLENGER, version)
        return
    set_alias(model, CHALLENGER, running)
    if (rollout_request(model, running) or {}).get("status") not in ROLLOUT_HOLDS_SLOT:
        mark_rollout(model, running, "started")


def clear_alias(model: str, alias: str, version: str | int | None = None) -> None:
    """Remove an alias (e.g. `challenger`); no-op when it is not set, or when `version` is given and the
    alias points elsewhere (a late cleanup of one version must not remove the next one's alias)."""
    client, name = setup(), model_name(model)
    registered = _lookup(lambda: client.get_registered_model(name))
    if registered is None or alias not in registered.aliases:
        return
    if version is None or str(registered.aliases[alias]) == str(version):
        client.delete_registered_model_alias(name, alias)


def set_alias(model: str, alias: str, version: str | int) -> None:
    """Point an alias (e.g. `challenger`) at an existing version."""
    client, name = setup(), model_name(model)
    _check_version(client, name, str(version))
    client.set_registered_model_alias(name, alias, str(version))
