"""`raywatch up` / `status` / `down` as a user runs them (separate processes, a cluster of their own):
up serves the registered champions and starts the monitors, status reports them, down stops exactly
what up started and leaves no Ray process of it behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from detect.data import load_series

pytestmark = pytest.mark.slow


def test_up_status_down(data_dir, mlflow_store):
    from serving_fixtures import register_small_models

    from cluster.local import free_port

    register_small_models(load_series("asd", "omi-2", data_dir))  # every model has a champion: up trains nothing
    cli = os.path.join(os.path.dirname(sys.executable), "raywatch")
    env = {k: v for k, v in os.environ.items() if k not in ("RAYWATCH_JOB_ADDRESS", "RAY_ADDRESS")}
    port = free_port()
    up = subprocess.run([cli, "up", "--port", str(port)], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    assert f"http://127.0.0.1:{port}/docs" in up.stdout and "mlflow ui" in up.stdout
    state = json.loads((mlflow_store / ".raywatch" / "up.json").read_text())
    assert state["started_head"] and state["pgid"]
    try:
        os.killpg(state["pgid"], 0)  # the head is running in its own process group
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["detectors"]["autoencoder"] is True
        status = subprocess.run([cli, "status"], env=env, capture_output=True, text=True, timeout=300)
        assert status.returncode == 0, status.stderr[-3000:]
        assert "AutoencoderDetector" in status.stdout and "v1[champion]" in status.stdout
    finally:
        down = subprocess.run([cli, "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "stopped ray head" in down.stdout and "raywatch-drift-autoencoder" in down.stdout
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(state["pgid"], 0)
            time.sleep(0.5)
        except ProcessLookupError:
            break
    else:
        pytest.fail("processes of the head that `up` started are still running")
    assert not (mlflow_store / ".raywatch" / "up.json").exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
