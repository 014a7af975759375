"""Shared fixtures: the shipped telemetry and a scratch directory per test."""

from __future__ import annotations

import os
from pathlib import Path

# Ray reads its auth mode once per process: set it before anything imports ray. The test cluster is
# a `ray start --head` with token authentication on, and clients of an explicit address must send it.
os.environ["RAY_AUTH_MODE"] = "token"

import pytest

from detect.data import default_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return default_data_dir()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real Ray head started as an operator would (`ray start --head`, token authentication on, as
    Ray 2.60 keeps it; the token is created when this machine has none), on free ports, with its
    dashboard and job server and its own `.raywatch/env`; the tests connect to it."""
    import ray

    from cluster.local import LocalHead
    from train.jobs import TRAIN_POLL_ENV

    os.environ.setdefault(TRAIN_POLL_ENV, "0.2")
    folder = tmp_path_factory.mktemp("ray-head")
    head = LocalHead(num_cpus=2, log_path=folder / "ray-start.log", client_env=folder / ".raywatch" / "env").start()
    try:
        ray.init(address=head.address, log_to_driver=False)
    except Exception:
        head.stop(kill=True)
        raise
    os.environ["RAYWATCH_JOB_ADDRESS"] = head.dashboard_url
    yield ray
    ray.shutdown()
    head.stop()


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow SQLite store in a scratch directory, which is also the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAYWATCH_HOME", str(tmp_path))
    return tmp_path
