"""Training as a Ray job: `ray job submit` (the CLI, as an operator types it) against the `ray start
--head` cluster of the test session, then waits for success and finds the registered version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_ray_job_submit_trains_and_registers(ray_cluster, data_dir, mlflow_store):
    from train import jobs, registry

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    address = os.environ["RAYWATCH_JOB_ADDRESS"]  # the dashboard of the session's head
    submitted = subprocess.run(
        [
            ray_cli,
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            "raywatch-test-train",
            "--runtime-env-json",
            json.dumps(
                {"env_vars": {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"], "RAYWATCH_DATA": str(data_dir)}}
            ),
            "--no-wait",
            "--",
            sys.executable,
            "-m",
            "train.pipeline",
            "--model",
            "autoencoder",
            "--entities",
            "asd/omi-2",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert jobs.wait("raywatch-test-train", timeout_s=300, address=address) == "SUCCEEDED", jobs.logs(
        "raywatch-test-train", address
    )[-3000:]
    status = subprocess.run(
        [ray_cli, "job", "status", "--address", address, "raywatch-test-train"], capture_output=True, text=True
    )
    assert "succeeded" in (status.stdout + status.stderr).lower()
    assert registry.alias_version("autoencoder", registry.CHAMPION) == "1"  # the job registered and promoted v1
