"""The self-retraining loop end to end on a real local Ray: serve, stream drifted telemetry over HTTP,
drift detected by the monitor actor, a retraining job submitted through Ray's job API and run, a
challenger registered, the promotion decision recorded and visible in /v1/models. Also: the monitor
actor killed mid-stream loses no persisted event and resumes watching."""

from __future__ import annotations

import time

import numpy as np
import pytest
from serving_fixtures import restore_environ, serve_app, wait_for

pytestmark = pytest.mark.slow

PORT = 8124
DAY = 1440  # one day of 1-minute samples: one monitor window (240 rows kept of 1,440, the default)
MONITOR = {
    "config": {
        "drift": {"window": 240, "thin": 6, "mmd_permutations": 100},
        "cooldown_s": 3600,
        # one drifted day is this story: it earns the job at once (tests/test_retrain_gate.py has the gate)
        "retrain_persist_windows": 1,
        "retrain_min_days_between": 0,
        "concept_every_s": 3600,
        "retrain_args": ["--epochs", "3", "--cpus-per-worker", "0.25"],
    }
}


def register_autoencoder(entity: str, metrics: list[str], train: np.ndarray) -> None:
    from detect.sequence import AutoencoderDetector
    from train.pipeline import register_fitted

    det = AutoencoderDetector(epochs=3, hidden=32).fit(train, metrics)
    register_fitted("autoencoder", {entity: det}, {entity: metrics}, {entity: train})


@pytest.fixture(scope="module")
def loop(ray_cluster, tmp_path_factory):
    import os

    from ray import serve

    from detect.synthetic import machine_days
    from monitoring import monitor

    workdir = tmp_path_factory.mktemp("loop")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RAYWATCH_STATE_DIR")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["RAYWATCH_STATE_DIR"] = str(workdir / "state")
    entity, metrics, values = machine_days(6)
    register_autoencoder(entity, metrics, values[: 3 * DAY])
    client = serve_app(
        "raywatch-loop", PORT, {"state_dir": str(workdir / "state"), "reload_interval_s": 0.5, "monitor": MONITOR}
    )
    yield client, entity, metrics, values
    client.close()
    serve.shutdown()  # the next module starts Serve with its own HTTP options
    monitor.stop_all()
    restore_environ(saved)


def stream(client, entity: str, metrics: list[str], values: np.ndarray, start: int, batch: int = 480) -> None:
    for i in range(0, len(values), batch):
        rows = [
            {"entity": entity, "timestamp": float(start + i + k), "metrics": dict(zip(metrics, v))}
            for k, v in enumerate(values[i : i + batch].tolist())
        ]
        response = client.post("/v1/score", json={"rows": rows, "detectors": ["autoencoder"]})
        assert response.status_code == 200, response.text


def drift_events(client, only_drift: bool = False) -> list[dict]:
    params = {"model": "autoencoder", "only_drift": only_drift, "limit": 1000}
    return client.get("/v1/drift", params=params).json()["events"]


def test_drift_triggers_retraining_job_and_a_recorded_decision(loop):
    from train import jobs

    client, entity, metrics, values = loop
    # day 4: no drift. The monitor tests the window and finds nothing (the control).
    stream(client, entity, metrics, values[3 * DAY : 4 * DAY], start=3 * DAY)
    clean = wait_for(lambda: len(events := drift_events(client)) >= 2 and events, 60, "the clean day's tests")
    assert {e["detector"] for e in clean} >= {"ks", "mmd"}
    assert not any(e["is_drift"] for e in clean), clean
    assert (
        client.get("/v1/drift", params={"model": "autoencoder"}).json()["retraining"]["autoencoder"]["last_job"] is None
    )

    # day 5: +2 sigma on cpu and latency_p99 from its first row
    train = values[: 3 * DAY]
    moving = [metrics.index("cpu"), metrics.index("latency_p99")]
    drifted = values[4 * DAY : 5 * DAY].copy()
    drifted[:, moving] += 2.0 * train.std(axis=0)[moving]
    started = time.time()
    stream(client, entity, metrics, drifted, start=4 * DAY)
    events = wait_for(lambda: drift_events(client, only_drift=True), 60, "a drift event")
    ks = [e for e in events if e["detector"] == "ks"]
    assert ks and set(ks[0]["drifted_features"]) >= {"cpu", "latency_p99"}
    job = wait_for(
        lambda: client.get("/v1/drift", params={"model": "autoencoder"}).json()["retraining"]["autoencoder"][
            "last_job"
        ],
        60,
        "a retraining job submission",
    )
    print(f"drift streamed -> job submitted in {job['submitted'] - started:.1f} s")
    # the gate's counts for the entity, as /v1/drift shows them: the job restarted them
    drift_state = client.get("/v1/drift", params={"model": "autoencoder", "entity": entity}).json()
    gate = drift_state["retraining"]["autoencoder"]["gate"]
    assert gate == {"version": "1", "streak": 0, "since_id": None, "days_since_training": 0.0}, gate
    assert job["job_id"].startswith("raywatch-retrain-autoencoder-") and job["trigger"]
    final = jobs.wait(job["job_id"], timeout_s=300)
    assert final == "SUCCEEDED", jobs.logs(job["job_id"])[-3000:]
    assert job["job_id"] in {j["job_id"] for j in jobs.list_jobs()}  # what `ray job list` shows

    models = client.get("/v1/models").json()["models"]["autoencoder"]
    decision = models["retraining"]
    assert decision is not None and decision["job_id"] == job["job_id"]
    assert decision["challenger"] == "2" and decision["reason"]  # the challenger was registered
    details = decision["details"]
    figures = details["entities"][entity]
    # no incident labels: both models at the same 1% alert budget on incidents injected into the served rows
    assert figures["champion"]["metric"] == "incident_recall_at_budget" and figures["evidence"] == "injected"
    assert figures["incidents"] >= 30 and figures["withheld_rows"] > 0  # the champion's flags are not learnt
    assert details["test"].startswith("one-sided Wilcoxon") and details["alpha"] == 0.05 and details["budget"] == 0.01
    print(f"decision: {decision['reason']}")
    if decision["promoted"]:  # through a canary rollout: the ingress starts it when it loads the challenger
        assert details["p_value"] < details["alpha"] and not figures["refused"]
        rollout = wait_for(
            lambda: client.get("/v1/models").json()["models"]["autoencoder"]["rollout"],
            30,
            "the canary rollout of v2",
        )
        assert rollout["version"] == "2" and rollout["status"] in ("running", "promoting", "completed"), rollout
    else:  # kept: refused, not significant, or below the margin, and the reason says which
        assert figures["refused"] or details["p_value"] >= details["alpha"] or details["gain"] < details["margin"]
        assert client.get("/v1/models").json()["models"]["autoencoder"]["slots"]["champion"]["version"] == "1"


def test_killed_monitor_keeps_events_and_resumes(loop):
    import ray

    from monitoring import monitor

    client, entity, metrics, values = loop
    actor = monitor.find("autoencoder")
    assert actor is not None
    before = ray.get(actor.status.remote())
    events_before = drift_events(client)
    assert events_before
    ray.kill(actor, no_restart=False)  # a crash: Ray restarts it (max_restarts=-1)
    stream(client, entity, metrics, values[5 * DAY : 6 * DAY], start=5 * DAY)
    after = wait_for(
        lambda: (s := ray.get(monitor.find("autoencoder").status.remote()))["events"] > before["events"] and s,
        60,
        "the restarted monitor to test a new window",
    )
    assert after["starts"] == before["starts"] + 1 and after["pid"] != before["pid"]
    assert {e["id"] for e in events_before} <= {e["id"] for e in drift_events(client)}  # nothing persisted was lost
