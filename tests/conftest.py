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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real Ray head started as an operator would (`ray start --head`, token authentication on, as
    Ray 2.60 keeps it), on free ports, with its dashboard and job server; the tests connect to it.

    `ray start --block` runs in its own process group, so stopping it stops this cluster only
    (never `ray stop`, which would stop every Ray instance on the machine)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    from train.pipeline import TRAIN_POLL_ENV

    os.environ.setdefault(TRAIN_POLL_ENV, "0.2")
    port, dashboard = _free_port(), _free_port()
    log_path = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    head = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            # the agents' fixed default ports would clash with any other Ray on this machine
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        stdout=open(log_path, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log_path.read_text():  # connect once it is up: a failed
        if time.monotonic() > deadline or head.poll() is not None:  # ray.init leaves state behind
            os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError(f"`ray start --head` did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
    except Exception:
        os.killpg(head.pid, signal.SIGKILL)
        raise
    os.environ["RAYWATCH_JOB_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    yield ray
    ray.shutdown()
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow SQLite store in a scratch directory, which is also the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAYWATCH_HOME", str(tmp_path))
    return tmp_path
