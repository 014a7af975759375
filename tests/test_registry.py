"""MLflow: `raywatch train` registers versions; promote / rollback round trip on a real SQLite store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from detect.bundle import BundleError, ModelBundle
from detect.data import load_series
from detect.sequence import AutoencoderDetector

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["autoencoder", "lstm", "ensemble"])
def test_raywatch_train_registers_a_version(model, data_dir, ray_cluster, mlflow_store, capsys):
    import mlflow

    args = ["train", "--model", model, "--data", str(data_dir), "--entities", "asd/omi-2"]
    args += (
        ["--epochs", "2", "--set", "hidden=32"]
        if model != "ensemble"
        else ["--set", "rf_trees=30", "--set", "xgb_rounds=30", "--set", "lgbm_rounds=30", "--epochs", "2"]
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"registered {model} version 1 and promoted to champion" in out
    from train.registry import load_bundle, versions

    assert [v["aliases"] for v in versions(model)] == [["champion"]]
    bundle, version = load_bundle(model, "champion")
    assert version == "1" and list(bundle.detectors) == ["asd/omi-2"]
    assert bundle.references["asd/omi-2"].shape[1] == 19
    runs = mlflow.search_runs(experiment_names=["raywatch"])
    assert len(runs) == 1
    if model != "ensemble":  # per-epoch metrics are tracked
        history = mlflow.tracking.MlflowClient().get_metric_history(runs.run_id[0], "asd/omi-2/train_loss")
        assert [m.step for m in history] == [0, 1]


def _tiny_bundle(series, seed: int) -> ModelBundle:
    X = series.train[series.metrics].to_numpy()[:1500]
    det = AutoencoderDetector(epochs=1, hidden=16, seed=seed).fit(X)
    return ModelBundle("autoencoder", {series.name: det}, {series.name: series.metrics}, {series.name: X[-50:]})


def test_promote_and_rollback_round_trip(data_dir, mlflow_store, capsys):
    import mlflow

    from train import registry

    series = load_series("asd", "omi-3", data_dir)
    registry.setup()
    made = []
    for seed in (1, 2):
        with mlflow.start_run() as run:
            made.append(registry.register_bundle(_tiny_bundle(series, seed), run.info.run_id))
    assert made == ["1", "2"]
    assert main(["promote", "autoencoder", "1"]) == 0
    assert registry.alias_version("autoencoder", "champion") == "1"
    assert registry.alias_version("autoencoder", "previous") is None
    assert main(["promote", "autoencoder", "2"]) == 0
    assert (registry.alias_version("autoencoder", "champion"), registry.alias_version("autoencoder", "previous")) == (
        "2",
        "1",
    )
    assert main(["rollback", "autoencoder"]) == 0
    assert (registry.alias_version("autoencoder", "champion"), registry.alias_version("autoencoder", "previous")) == (
        "1",
        "2",
    )
    assert "champion = version 1 (previous = 2)" in capsys.readouterr().out
    bundle, version = registry.load_bundle("autoencoder", "champion")
    assert version == "1"
    test = series.test[series.metrics].to_numpy()[:300]
    reference = ModelBundle.load(registry.load_bundle("autoencoder", "1")[0].save(mlflow_store / "v1"))
    np.testing.assert_allclose(bundle.detectors[series.name].score(test), reference.detectors[series.name].score(test))
    # a cleanup of one challenger that runs late leaves the next challenger's alias alone
    registry.set_alias("autoencoder", registry.CHALLENGER, "2")
    registry.clear_alias("autoencoder", registry.CHALLENGER, "1")
    assert registry.alias_version("autoencoder", registry.CHALLENGER) == "2"
    registry.clear_alias("autoencoder", registry.CHALLENGER, "2")
    assert registry.alias_version("autoencoder", registry.CHALLENGER) is None
    assert main(["promote", "autoencoder", "9"]) == 2
    assert "raywatch-autoencoder has no version 9" in capsys.readouterr().err
    assert main(["rollback", "lstm"]) == 2
    assert "no previous champion" in capsys.readouterr().err


def test_bundle_refuses_tampering_and_pickles(data_dir, tmp_path):
    series = load_series("asd", "omi-3", data_dir)
    path = _tiny_bundle(series, 0).save(tmp_path / "b")
    ModelBundle.load(path)  # intact: loads
    (path / "evil.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleError, match="refusing evil.pkl: only JSON, NPZ and ONNX"):
        ModelBundle.load(path)
    (path / "evil.pkl").unlink()
    meta = path / "entities" / "asd__omi-3" / "detector.json"
    data = json.loads(meta.read_text())
    data["threshold"] = 0.0
    meta.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="checksum mismatch for entities/asd__omi-3/detector.json"):
        ModelBundle.load(path)


def test_an_entity_model_loads_from_its_own_artifacts_alone(data_dir, mlflow_store):
    """What a Serve replica does for a model key (serve/detectors.py): the version's manifest, then that
    entity's own files, checked like a whole bundle. The other entities' files are never read: with them
    gone from the artifact store, the whole bundle is refused and this entity still loads."""
    import shutil
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from serve.detectors import entity_model, load_slot
    from train import registry
    from train.pipeline import register_fitted

    detectors, metrics, rows = {}, {}, {}
    for name in ("omi-2", "omi-3"):
        series = load_series("asd", name, data_dir)
        rows[series.name] = series.train[series.metrics].to_numpy()[:1200]
        detectors[series.name] = AutoencoderDetector(epochs=1, hidden=8).fit(rows[series.name], series.metrics)
        metrics[series.name] = series.metrics
    version = register_fitted("autoencoder", detectors, metrics, rows)
    source = MlflowClient(registry.tracking_uri()).get_model_version(registry.model_name("autoencoder"), version).source
    folder = Path(source.removeprefix("file://"))

    slot = load_slot("autoencoder", "champion")
    assert slot.version == version and set(slot.entities) == {"asd/omi-2", "asd/omi-3"}
    assert slot.entities["asd/omi-3"]["context_rows"] == detectors["asd/omi-3"].context_rows()
    for sub in ("entities", "onnx"):
        shutil.rmtree(folder / sub / "asd__omi-2")
    with pytest.raises(BundleError, match="missing"):
        registry.load_bundle("autoencoder", version)
    model = entity_model(slot, "asd/omi-3")
    X = rows["asd/omi-3"][:300]
    np.testing.assert_allclose(model.runtime.score_series(X), detectors["asd/omi-3"].score(X), rtol=1e-4, atol=1e-5)

    meta = folder / "entities" / "asd__omi-3" / "detector.json"
    (meta.parent / "model.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleError, match="refusing entities/asd__omi-3/model.pkl: only JSON, NPZ and ONNX"):
        entity_model(slot, "asd/omi-3")
    (meta.parent / "model.pkl").unlink()
    meta.write_text(meta.read_text().replace('"threshold"', '"threshold" ', 1))
    with pytest.raises(BundleError, match="checksum mismatch for entities/asd__omi-3/detector.json"):
        entity_model(slot, "asd/omi-3")


def test_a_promoted_challenger_leaves_a_running_rollout_its_slot(data_dir, mlflow_store):
    """The canary's share is scored by whatever the `challenger` alias points to: a retraining job that
    promotes while a rollout is under way must not move it (the rollout would judge another version's
    calls and promote its own). Its decision says so; once the rollout ended, a request goes through."""
    import mlflow

    from train import registry
    from train import retrain as job

    series = load_series("asd", "omi-3", data_dir)
    registry.setup()
    for seed in (1, 2, 3):
        with mlflow.start_run() as run:
            registry.register_bundle(_tiny_bundle(series, seed), run.info.run_id)
    registry.promote("autoencoder", "1")
    registry.request_rollout("autoencoder", "2")
    registry.mark_rollout("autoencoder", "2", "started")  # what the ingress does when it starts it
    assert registry.rollout_in_progress("autoencoder") == "2"

    reason = job.promote("autoencoder", "3", "rollout")
    assert "not rolled out" in reason and "a rollout of version 2 holds the challenger slot" in reason, reason
    assert "raywatch rollout autoencoder 3" in reason
    assert registry.alias_version("autoencoder", registry.CHALLENGER) == "2"
    assert registry.rollout_request("autoencoder", "3") is None
    with pytest.raises(registry.RolloutBusy):
        registry.request_rollout("autoencoder", "3")

    registry.clear_alias("autoencoder", registry.CHALLENGER, "2")  # the rollout ended: the ingress empties the slot
    assert registry.rollout_in_progress("autoencoder") is None
    assert job.promote("autoencoder", "3", "rollout").startswith("; canary rollout requested")
    assert registry.alias_version("autoencoder", registry.CHALLENGER) == "3"
    assert registry.rollout_request("autoencoder", "3")["status"] == "requested"
    # a challenger with no rollout under way holds no slot: an operator's A/B split, or a rollout that ended
    registry.set_alias("autoencoder", registry.CHALLENGER, "1")  # untagged
    assert registry.rollout_in_progress("autoencoder") is None
    registry.set_alias("autoencoder", registry.CHALLENGER, "2")
    registry.mark_rollout("autoencoder", "2", "rolled_back")
    assert registry.rollout_in_progress("autoencoder") is None
    # nor does one the ingress refused (serve/app.py), which says why; a later status drops that reason
    registry.set_alias("autoencoder", registry.CHALLENGER, "3")
    registry.mark_rollout("autoencoder", "3", "refused", "a rollout of version 2 is in progress; abort it first")
    assert registry.rollout_in_progress("autoencoder") is None
    assert registry.rollout_request("autoencoder", "3")["reason"].startswith("a rollout of version 2")
    registry.mark_rollout("autoencoder", "3", "started")  # an operator's rollout of it, once the other ended
    request = registry.rollout_request("autoencoder", "3")
    assert request["status"] == "started" and "reason" not in request, request
    assert registry.rollout_in_progress("autoencoder") == "3"
