"""Ray Tune (ASHA + Optuna) on a real local Ray: the best trial is recorded and `train` uses it."""

from __future__ import annotations

import json

import pytest

from train.pipeline import resolve_config

pytestmark = pytest.mark.slow


def test_tune_records_best_config_in_file_and_mlflow(data_dir, ray_cluster, mlflow_store):
    import mlflow

    from tune.search import tune_model

    result = tune_model("autoencoder", data_dir, ["asd/omi-2"], num_samples=3, max_epochs=2)
    assert result["trials"] == 3 and 3 <= result["trial_epochs"] <= 6
    saved = json.loads((mlflow_store / ".raywatch" / "best_config" / "autoencoder.json").read_text())
    assert saved["config"] == result["best_config"] and {"window", "hidden", "latent", "lr"} <= set(saved["config"])
    config, source = resolve_config("autoencoder", {"epochs": 1})
    assert source.startswith("tuned") and config["window"] == saved["config"]["window"] and config["epochs"] == 1
    runs = mlflow.search_runs(experiment_names=["raywatch"])
    parent = runs[runs["tags.raywatch.kind"] == "tune"]
    assert len(parent) == 1 and parent["metrics.best_val_loss"].iloc[0] == pytest.approx(result["best_score"])
    trials = runs[runs["tags.mlflow.parentRunId"] == parent.run_id.iloc[0]]
    assert len(trials) == 3 and (trials["tags.best"] == "True").sum() == 1
