"""The registry loader trusts only what was registered: checksums recorded at registration, JSON, NPZ
(no pickles) and ONNX only; an unreadable tracking store is an error, never "no such version"."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from detect.bundle import BundleError, sha256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(data_dir, tmp_path_factory):
    """One small autoencoder version in a fresh MLflow store, and a pristine copy of its artifacts."""
    from mlflow.tracking import MlflowClient

    from detect.data import load_series
    from detect.sequence import AutoencoderDetector
    from train import registry
    from train.pipeline import register_fitted

    root = tmp_path_factory.mktemp("integrity")
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    series = load_series("asd", "omi-2", data_dir)
    train = series.train[series.metrics].to_numpy()[:1200]
    det = AutoencoderDetector(epochs=1, hidden=8).fit(train, series.metrics)
    version = register_fitted("autoencoder", {series.name: det}, {series.name: series.metrics}, {series.name: train})
    source = MlflowClient(registry.tracking_uri()).get_model_version(registry.model_name("autoencoder"), version).source
    folder = Path(source.removeprefix("file://"))
    shutil.copytree(folder, root / "pristine")
    yield root, version, folder
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture()
def registered(store):
    """(version, its artifact folder), the folder as registered."""
    root, version, folder = store
    shutil.rmtree(folder)
    shutil.copytree(root / "pristine", folder)
    return version, folder


def test_registration_records_the_manifest_checksum(registered):
    from train import registry

    version, folder = registered
    tags = registry.versions("autoencoder")[0]["tags"]
    assert tags[registry.CHECKSUM_TAG] == sha256(folder / "manifest.json")
    bundle, loaded = registry.load_bundle("autoencoder", version)
    assert loaded == version and list(bundle.detectors) == ["asd/omi-2"]


class Payload:
    """What a pickle in the registry could run on load (here: nothing harmful)."""

    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("name", ["model.pkl", "entities/asd__omi-2/weights.pickle", "reference/extra.npy", "run.sh"])
def test_a_file_that_is_not_json_npz_or_onnx_is_refused(registered, name, capsys):
    from train import registry

    version, folder = registered
    (folder / name).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(BundleError, match=f"refusing {name}: only JSON, NPZ and ONNX"):
        registry.load_bundle("autoencoder", version)
    assert "unpickled!" not in capsys.readouterr().out


def _record_in_manifest(folder, path) -> None:
    """Rewrite the bundle's manifest entry for `path` to its current checksum (what a tamperer who can
    write the artifact store would do next)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["checksums"][path.relative_to(folder).as_posix()] = sha256(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_pickle_disguised_as_npz_is_refused(registered):
    """An NPZ of the version replaced by a pickle: the checksum refuses it; with the manifest rewritten to
    match, the checksum recorded at registration refuses it; NPZ is read with allow_pickle=False anyway."""
    from train import registry

    version, folder = registered
    npz = folder / "entities" / "asd__omi-2" / "arrays.npz"
    npz.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(BundleError, match="checksum mismatch for entities/asd__omi-2/arrays.npz"):
        registry.load_bundle("autoencoder", version)
    _record_in_manifest(folder, npz)
    with pytest.raises(BundleError, match="does not match the checksum recorded at registration"):
        registry.load_bundle("autoencoder", version)
    with pytest.raises(ValueError, match="allow_pickle"):
        np.load(npz, allow_pickle=False)


def test_tampered_weights_with_a_consistent_manifest_are_refused(registered):
    """Whoever can write the artifact store can rewrite a file and its manifest entry together; the
    manifest's checksum was recorded at registration in the tracking store, apart from the artifacts."""
    from train import registry

    version, folder = registered
    meta = folder / "entities" / "asd__omi-2" / "detector.json"
    data = json.loads(meta.read_text())
    data["threshold"] = 1e9  # never alert
    meta.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="checksum mismatch for entities/asd__omi-2/detector.json"):
        registry.load_bundle("autoencoder", version)
    _record_in_manifest(folder, meta)
    with pytest.raises(BundleError, match="recorded at registration"):
        registry.load_bundle("autoencoder", version)


def test_a_version_without_its_recorded_checksum_is_refused_with_the_reason(registered, store):
    """Integrity fails closed: a version whose `bundle_sha256` tag is missing (registered by hand, or
    removed) does not load, and the error says why."""
    from train import registry

    version, _ = registered
    client, name = registry.setup(), registry.model_name("autoencoder")
    recorded = client.get_model_version(name, version).tags[registry.CHECKSUM_TAG]
    client.delete_model_version_tag(name, version, registry.CHECKSUM_TAG)
    try:
        with pytest.raises(BundleError, match=f"has no {registry.CHECKSUM_TAG} tag.*refusing the version"):
            registry.load_bundle("autoencoder", version)
    finally:
        client.set_model_version_tag(name, version, registry.CHECKSUM_TAG, recorded)
    registry.load_bundle("autoencoder", version)  # with the tag back it loads


def test_a_symlink_among_the_artifacts_is_refused(registered, tmp_path):
    from detect.bundle import ModelBundle
    from train import registry

    version, folder = registered
    bundle = registry.load_bundle("autoencoder", version)[0].save(tmp_path / "bundle")
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    (bundle / "link.json").symlink_to(target)
    with pytest.raises(BundleError, match="refusing link.json: symbolic links"):
        ModelBundle.load(bundle)
    (folder / "link.json").symlink_to(target)  # in the registry: MLflow's download refuses it first
    with pytest.raises((BundleError, MlflowException)):
        registry.load_bundle("autoencoder", version)


def test_an_unreadable_tracking_store_is_an_error_not_a_missing_alias(registered, store):
    """Serving drops nothing when the registry fails: lookups raise instead of answering "no alias"."""
    from train import registry

    version, _ = registered
    assert registry.alias_version("autoencoder", "challenger") is None  # really missing: None
    with pytest.raises(registry.RegistryError, match="no version 99"):
        registry.promote("autoencoder", "99")
    db = store[0] / "mlflow.db"
    original = db.read_bytes()
    with open(db, "r+b") as f:
        f.write(b"\0" * 100)
    try:
        for call in (
            lambda: registry.alias_version("autoencoder", "champion"),
            lambda: registry.promote("autoencoder", version),
            lambda: registry.load_bundle("autoencoder", "champion"),
            lambda: registry.versions("autoencoder"),
        ):
            with pytest.raises(MlflowException):
                call()
    finally:
        db.write_bytes(original)
    assert registry.alias_version("autoencoder", "champion") == version
