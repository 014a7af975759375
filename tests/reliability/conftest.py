"""The reliability suite's app: the three detectors registered in a real MLflow SQLite store and served
by Ray Serve on the session's `ray start --head` cluster (token authentication on), every deployment
at two replicas, reached over real HTTP on 127.0.0.1:8170. One deployment for the whole package;
the figures each test measures are written to runs/reliability/ and printed at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from .support import APP, PORT, REPLICAS, RESULTS, SOAK, Served, build, new_key

FIGURES: dict[str, object] = {}
# `ingress_replicas`, `rate_limit` and `body_timeout_s` are app arguments of serve.app.build_app
# the app's default: a CI run measured 2 s (once used here, to keep the slow-body test short) misfire on 6
# honest requests of 301 while a replica of every deployment was killed, their bodies held up inside the
# server (load average 5 on 2 cores), not by their clients
BODY_TIMEOUT_S = 10.0


@pytest.fixture(scope="package")
def figures():
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("soak.json" if SOAK else "figures.json")
    FIGURES["machine"] = {**FIGURES.get("machine", {}), "loadavg_end": [round(x, 1) for x in os.getloadavg()]}
    path.write_text(json.dumps({"soak": SOAK, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **FIGURES}, indent=2))
    terminalreporter.section("reliability figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {json.dumps(value)}")
    terminalreporter.write_line(f"(written to {path})")


@pytest.fixture(scope="package")
def served(data_dir, ray_cluster, tmp_path_factory):
    from ray import serve
    from serving_fixtures import register_small_models

    from detect.data import load_series
    from monitoring import monitor

    FIGURES["machine"] = {"cpus": os.cpu_count(), "loadavg_start": [round(x, 1) for x in os.getloadavg()]}
    workdir = tmp_path_factory.mktemp("reliability")
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    series = load_series("asd", "omi-2", data_dir)
    started = time.monotonic()
    register_small_models(series, versions=1)
    keys_file = workdir / "admin_keys"
    args = {
        "tracking_uri": tracking_uri,
        "state_dir": str(workdir / "state"),
        "reload_interval_s": 0.5,
        "admin_keys_file": str(keys_file),
        "breaker_cooldown_s": 1.0,
        "ingress_replicas": REPLICAS,
        "body_timeout_s": BODY_TIMEOUT_S,
        "monitor": {"enabled": False},  # the drift monitor's own fault test runs its actor directly
    }
    context = ray_cluster.get_runtime_context()
    # a driver with a wrong Ray token: started now, judged by test_security (it takes a while to give up)
    probe_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": new_key()}
    probe_env.pop("RAY_AUTH_TOKEN_PATH", None)
    probe = subprocess.Popen(
        [sys.executable, "-c", f"import ray; ray.init(address='{context.gcs_address}'); print('CONNECTED')"],
        env=probe_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    monitor.stop_all()
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    deploying = time.monotonic()
    serve.run(build(args), name=APP, route_prefix="/")
    app = Served(
        base_url=f"http://127.0.0.1:{PORT}",
        client=httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30),
        series=series,
        workdir=workdir,
        keys_file=keys_file,
        state_dir=workdir / "state",
        tracking_uri=tracking_uri,
        args=args,
        gcs_address=context.gcs_address,
        dashboard_url=os.environ["RAYWATCH_JOB_ADDRESS"],
        token_probe=probe,
    )
    app.set_keys([new_key(), new_key()])
    app.wait_ready()
    # how long this machine takes to start every replica from nothing: the control the recovery of killed
    # replicas is judged against (their replacements start the same Python and load the same models)
    FIGURES["deploy_s"] = round(time.monotonic() - deploying, 1)
    FIGURES["setup_s"] = round(time.monotonic() - started, 1)
    yield app
    app.client.close()
    if probe.poll() is None:
        probe.kill()
        probe.wait()
    serve.shutdown()  # the next module starts Serve with its own HTTP options
    monitor.stop_all()
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
