"""Shared fixtures: the shipped telemetry and a scratch directory per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from detect.data import default_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return default_data_dir()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance (token authentication on, as Ray 2.60 defaults), shared by the session."""
    import os

    import ray

    from train.pipeline import TRAIN_POLL_ENV

    if not ray.is_initialized():
        os.environ.setdefault(TRAIN_POLL_ENV, "0.2")
        ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow SQLite store in a scratch directory, which is also the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAYWATCH_HOME", str(tmp_path))
    return tmp_path
