"""A model version's self-contained artifact set: one fitted detector per entity plus a manifest.

Layout of a bundle directory:

    manifest.json                 kind, entities (metrics, threshold, context rows, served SPOT state,
                                  folder), evaluation, checksums
    entities/<dataset>__<entity>/ detector.json + arrays.npz (the detector's own save format)
    onnx/<dataset>__<entity>/     <graph>.onnx: what serving runs (FP32, INT8 or a distilled student)
    reference/<...>.npz           reference sample of training inputs (and the model's scores on them),
                                  for the drift monitors

Every file's SHA-256 is recorded in the manifest at save time and checked at load time; files other
than JSON, NPZ and ONNX are refused, so loading a bundle never unpickles anything.

Each entity's model is addressable on its own (`entity_files`, `load_entity`): a Serve replica reads the
manifest of a version, then loads only the entities it serves (serve/detectors.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detect.base import Detector
from detect.drift import DriftReference, as_drift_reference

ALLOWED_SUFFIXES = {".json", ".npz", ".onnx"}


class BundleError(ValueError):
    """A bundle that cannot be trusted or used: bad checksum, unexpected file, unknown kind."""


def detector_classes() -> dict[str, type[Detector]]:
    # deferred: the sequence detectors import torch, which readers of a bundle's files (the Serve
    # ingress through train.registry) never need
    from detect.ensemble import EnsembleDetector
    from detect.peers import PEERS
    from detect.sequence import SEQUENCE_DETECTORS

    return {**PEERS, **SEQUENCE_DETECTORS, "ensemble": EnsembleDetector}


def entity_folder(entity: str) -> str:
    return entity.replace("/", "__")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class ModelBundle:
    kind: str
    detectors: dict[str, Detector]
    metrics: dict[str, list[str]]
    # per entity: the drift reference rows with their calibration (`detect.drift.DriftReference`; a plain
    # array is a reference without calibration)
    references: dict[str, DriftReference | np.ndarray] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    graphs: dict[str, dict[str, bytes]] = field(default_factory=dict)  # entity -> graph name -> ONNX
    # the model's anomaly scores on (the rows around) its reference sample: prediction-drift reference
    reference_scores: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return self.info.get("variant", "fp32")

    def rows_per_day(self, entity: str) -> int | None:
        """Samples per day of the series `entity`'s model learnt from, as its training recorded it with
        the drift reference. For an entity without a reference of its own (a new machine a fleet model
        serves, whose own model a job is about to fit), what another entity of its dataset (the name
        before "/", e.g. a Prometheus source's) recorded. None where neither is known, or the version
        predates the record."""
        if entity in self.references:
            return as_drift_reference(self.references[entity]).rows_per_day
        dataset, slash, _ = entity.partition("/")
        siblings = (ref for name, ref in self.references.items() if slash and name.startswith(f"{dataset}/"))
        return next((rate for ref in siblings if (rate := as_drift_reference(ref).rows_per_day)), None)

    def detector_for(self, entity: str) -> Detector:
        try:
            return self.detectors[entity]
        except KeyError:
            raise KeyError(
                f"model {self.kind!r} has no detector for entity {entity!r}; known: {sorted(self.detectors)}"
            ) from None

    def save(self, path: str | Path) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        entities = {}
        for entity, det in self.detectors.items():
            folder = f"entities/{entity_folder(entity)}"
            det.save(root / folder)
            entities[entity] = {
                "folder": folder,
                "metrics": self.metrics[entity],
                "threshold": det.threshold_,
                # what the serving ingress needs to know of a model without loading it (serve/detectors.py)
                "context_rows": det.context_rows(),
                "spot": det.served_spot(),
            }
            for name, graph in self.graphs.get(entity, {}).items():
                target = root / "onnx" / entity_folder(entity) / f"{name}.onnx"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(graph)
                entities[entity].setdefault("graphs", {})[name] = str(target.relative_to(root))
            if entity in self.references:
                ref = root / "reference" / f"{entity_folder(entity)}.npz"
                ref.parent.mkdir(exist_ok=True)
                extra = {"scores": self.reference_scores[entity]} if entity in self.reference_scores else {}
                np.savez(ref, **as_drift_reference(self.references[entity]).to_arrays(), **extra)
                entities[entity]["reference"] = str(ref.relative_to(root))
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
        manifest = {
            "format": 1,
            "kind": self.kind,
            "entities": entities,
            "evaluation": self.evaluation,
            "info": self.info,
            "checksums": {str(p.relative_to(root)): sha256(p) for p in files},
        }
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
        return root

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        root = Path(path)
        manifest_path = root / "manifest.json"
        if not manifest_path.exists():
            raise BundleError(f"{root}: not a raywatch bundle (no manifest.json)")
        manifest = json.loads(manifest_path.read_text())
        verify(root, manifest)
        detectors, metrics, references, graphs, reference_scores = {}, {}, {}, {}, {}
        for entity, entry in manifest["entities"].items():
            model = _read_entity(root, manifest, entity)
            detectors[entity], metrics[entity] = model.detector, model.metrics
            if model.graphs:
                graphs[entity] = model.graphs
            if "reference" in entry:
                with np.load(root / entry["reference"], allow_pickle=False) as npz:
                    references[entity] = DriftReference.from_arrays(npz)
                    if "scores" in npz.files:
                        reference_scores[entity] = npz["scores"]
        return cls(
            manifest["kind"],
            detectors,
            metrics,
            references,
            manifest.get("evaluation", {}),
            manifest.get("info", {}),
            graphs,
            reference_scores,
        )


@dataclass
class EntityModelFiles:
    """One entity's model read from its own files of a bundle: what a server needs to score it."""

    detector: Detector
    metrics: list[str]
    graphs: dict[str, bytes]  # graph name -> ONNX (empty: export them from the detector)


def entity_files(manifest: dict[str, Any], entity: str) -> list[str]:
    """The files that hold one entity's model in a bundle: its detector folder and its ONNX graphs, not its
    drift reference (the monitors read that). A server downloads these, and only these, for the entity."""
    try:
        entry = manifest["entities"][entity]
    except KeyError:
        raise KeyError(f"the bundle has no model for entity {entity!r}") from None
    folder = entry["folder"].rstrip("/") + "/"
    return sorted(
        {rel for rel in manifest["checksums"] if rel.startswith(folder)} | set(entry.get("graphs", {}).values())
    )


def load_entity(root: str | Path, manifest: dict[str, Any], entity: str) -> EntityModelFiles:
    """One entity's model from a folder holding (at least) its files laid out as in the bundle, checked
    against `manifest` (which the caller has checked): every file of the entity's folders must be listed
    and match its checksum, as `verify` asks of a whole bundle."""
    root = Path(root)
    files = entity_files(manifest, entity)
    folders = {root / Path(rel).parent for rel in files}
    present = sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir())
    _check_files(root, manifest, present, files)
    return _read_entity(root, manifest, entity)


def _read_entity(root: Path, manifest: dict[str, Any], entity: str) -> EntityModelFiles:
    classes = detector_classes()
    if manifest["kind"] not in classes:
        raise BundleError(f"{root}: unknown detector kind {manifest['kind']!r}")
    entry = manifest["entities"][entity]
    graphs = {name: (root / rel).read_bytes() for name, rel in entry.get("graphs", {}).items()}
    return EntityModelFiles(classes[manifest["kind"]].load(root / entry["folder"]), entry["metrics"], graphs)


def verify(root: Path, manifest: dict[str, Any]) -> None:
    """Refuse files that are not JSON/NPZ/ONNX, symbolic links, files not in the manifest, and checksum
    mismatches. NPZ arrays are always read with `allow_pickle=False`, so an object array is refused too."""
    _check_files(root, manifest, sorted(root.rglob("*")), list(manifest.get("checksums", {})))


def _check_files(root: Path, manifest: dict[str, Any], paths: list[Path], expected: list[str]) -> None:
    """Refuse, among `paths` (under `root`), links, files that are not JSON/NPZ/ONNX, files the manifest
    does not list and checksum mismatches; then refuse the set if a file of `expected` is missing."""
    recorded = manifest.get("checksums", {})
    for p in paths:
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():  # a link could point anywhere outside the checked set
            raise BundleError(f"{root}: refusing {rel}: symbolic links are not loaded")
        if not p.is_file() or p.name == "manifest.json":
            continue
        if p.suffix not in ALLOWED_SUFFIXES:
            raise BundleError(f"{root}: refusing {rel}: only JSON, NPZ and ONNX artifacts are loaded")
        if rel not in recorded:
            raise BundleError(f"{root}: refusing {rel}: not listed in the manifest")
        if sha256(p) != recorded[rel]:
            raise BundleError(f"{root}: checksum mismatch for {rel}: the artifact was modified after registration")
    missing = [rel for rel in expected if not (root / rel).is_file()]
    if missing:
        raise BundleError(f"{root}: artifacts listed in the manifest are missing: {missing}")
