"""The self-retraining loop end to end on a real local Ray: serve, stream drifted telemetry over HTTP,
drift detected by the monitor actor, a retraining job submitted through Ray's job API and run, a
challenger registered, the promotion decision recorded and visible in /v1/models. Also: the monitor
actor killed mid-stream loses no persisted event and resumes watching."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from detect.data import load_series

pytestmark = pytest.mark.slow

PORT = 8124
WINDOW = 100
MONITOR = {
    "config": {
        "drift": {"window": WINDOW, "thin": 1, "mmd_permutations": 100},
        "cooldown_s": 3600,
        "concept_every_s": 3600,
        "retrain_args": ["--epochs", "3", "--cpus-per-worker", "0.25"],
    }
}


@pytest.fixture(scope="module")
def loop(data_dir, ray_cluster, tmp_path_factory):
    import os

    from ray import serve
    from serving_fixtures import register_small_models

    from detect import monitor

    workdir = tmp_path_factory.mktemp("loop")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RAYWATCH_STATE_DIR")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["RAYWATCH_STATE_DIR"] = str(workdir / "state")
    series = load_series("asd", "omi-2", data_dir)
    register_small_models(series, versions=1, kinds=("autoencoder",))
    from serve.app import build_app

    monitor.stop_all()  # monitors are detached: make sure none from another module is reused
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(
        build_app({"state_dir": str(workdir / "state"), "reload_interval_s": 0.5, "monitor": MONITOR}),
        name="raywatch-loop",
        route_prefix="/",
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60)
    yield client, series, workdir
    client.close()
    serve.shutdown()  # the next module starts Serve with its own HTTP options
    monitor.stop_all()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def stream(client, series, values: np.ndarray, start: int, batch: int = 50) -> None:
    for i in range(0, len(values), batch):
        rows = [
            {"entity": series.name, "timestamp": float(start + i + k), "metrics": dict(zip(series.metrics, v))}
            for k, v in enumerate(values[i : i + batch].tolist())
        ]
        response = client.post("/v1/score", json={"rows": rows, "detectors": ["autoencoder"]})
        assert response.status_code == 200, response.text


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_drift_triggers_retraining_job_and_a_recorded_decision(loop):
    from cluster import jobs

    client, series, _ = loop
    test = series.test[series.metrics].to_numpy()
    train = series.train[series.metrics].to_numpy()
    moving = np.argsort(-train.std(axis=0))[:4]  # 4 of 19 metrics (ones that vary): +3 training sigma
    shifted = [series.metrics[j] for j in moving]
    drifted = test.copy()
    drifted[:, moving] += 3 * train.std(axis=0)[moving]
    # label feedback for the streamed rows (what an operator's incident tool would send)
    n = 8 * WINDOW
    for t in range(0, n, 1):
        if series.labels[t]:
            assert (
                client.post("/v1/feedback", json={"entity": series.name, "timestamp": float(t), "label": 1}).status_code
                == 201
            )
    started = time.monotonic()
    stream(client, series, drifted[:n], start=0)

    events = wait_for(
        lambda: client.get("/v1/drift", params={"model": "autoencoder", "only_drift": True}).json()["events"],
        60,
        "a drift event",
    )
    assert {"ks", "mmd"} & {e["detector"] for e in events}
    ks = [e for e in events if e["detector"] == "ks"]
    assert ks and set(ks[0]["drifted_features"]) & set(shifted)
    job = wait_for(
        lambda: client.get("/v1/drift", params={"model": "autoencoder"}).json()["retraining"]["autoencoder"][
            "last_job"
        ],
        60,
        "a retraining job submission",
    )
    submitted_after = job["submitted"] - (time.time() - (time.monotonic() - started))
    print(f"drift streamed -> job submitted in {submitted_after:.1f} s")
    assert job["job_id"].startswith("raywatch-retrain-autoencoder-")
    assert jobs.status(job["job_id"]) in {"PENDING", "RUNNING", "SUCCEEDED"}
    final = jobs.wait(job["job_id"], timeout_s=300)
    assert final == "SUCCEEDED", jobs.logs(job["job_id"])[-3000:]
    listed = {j["job_id"] for j in jobs.list_jobs()}
    assert job["job_id"] in listed  # what `ray job list` shows

    models = client.get("/v1/models").json()["models"]["autoencoder"]
    decision = models["retraining"]
    assert decision is not None and decision["job_id"] == job["job_id"]
    assert decision["challenger"] == "2"  # the challenger was registered as a new version
    assert decision["reason"]
    # a drifted but healthy stream: the champion alerts on the shift, the challenger learned it
    figures = decision["details"]["entities"][series.name]
    assert figures["challenger"]["value"] > figures["champion"]["value"]
    assert decision["promoted"] is True
    wait_for(
        lambda: client.get("/v1/models").json()["models"]["autoencoder"]["slots"]["champion"]["version"] == "2",
        10,
        "serving v2",
    )


def test_killed_monitor_keeps_events_and_resumes(loop):
    import ray

    from detect import monitor

    client, series, _ = loop
    actor = monitor.find("autoencoder")
    assert actor is not None
    before = ray.get(actor.status.remote())
    events_before = client.get("/v1/drift", params={"model": "autoencoder", "limit": 1000}).json()["events"]
    assert events_before
    ray.kill(actor, no_restart=False)  # a crash: Ray restarts it (max_restarts=-1)
    values = series.test[series.metrics].to_numpy()[1000 : 1000 + 2 * WINDOW]
    stream(client, series, values, start=10_000)
    after = wait_for(
        lambda: (s := ray.get(monitor.find("autoencoder").status.remote()))["events"] >= before["events"] + 2 and s,
        60,
        "the restarted monitor to test new windows",
    )
    assert after["starts"] == before["starts"] + 1 and after["pid"] != before["pid"]
    events_after = client.get("/v1/drift", params={"model": "autoencoder", "limit": 1000}).json()["events"]
    ids_after = {e["id"] for e in events_after}
    assert {e["id"] for e in events_before} <= ids_after  # nothing persisted was lost
