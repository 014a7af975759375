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
        else ["--set", "rf_trees=30", "--set", "xgb_rounds=30", "--set", "lgbm_rounds=30"]
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
