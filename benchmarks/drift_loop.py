"""The self-retraining loop, timed end to end on a local `ray start --head` cluster, over real HTTP.

    python benchmarks/drift_loop.py [--workdir runs/bench-loop] [--shift 3.0]

Fits an autoencoder on three days of one synthetic machine (1-minute samples), registers and serves
it with the default monitor window (one day: 1,440 rows, every 6th kept), streams a fourth, normal
day (the control: no drift event, no job), then a fifth day with +2 sigma on cpu and latency_p99,
and measures: first drifted request -> drift event -> retraining job submitted -> job done ->
promotion decision; then the time from `POST /v1/admin/rollback` until `/v1/score` is answered by
the restored version. (On the shipped SMD/ASD series the drift tests flag normal days too, see
benchmarks/results/drift.md, so they cannot serve as a control.) Writes
benchmarks/results/drift_loop.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported: the head keeps token auth on

RESULTS = Path(__file__).resolve().parent / "results"
PORT = 8131
KEY = "bench-admin-key-0123456789"
DAY = 1440
MONITOR = {
    "config": {
        "drift": {"window": 240, "thin": 6, "mmd_permutations": 100},
        "cooldown_s": 3600,
        "retrain_persist_windows": 1,  # the one drifted day measured here earns its job at once,
        "retrain_min_days_between": 0,  # the day after the champion's training
        "concept_every_s": 3600,
        "retrain_args": ["--epochs", "3", "--cpus-per-worker", "0.25"],
    }
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench-loop")
    parser.add_argument("--shift", type=float, default=2.0, help="mean shift in training standard deviations")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / f'mlflow-{int(time.time())}.db'}"
    os.environ["RAYWATCH_STATE_DIR"] = str(workdir / f"state-{int(time.time())}")
    (workdir / "admin_keys").write_text(KEY + "\n")
    import httpx
    import numpy as np
    import ray
    from ray import serve

    from cluster.local import LocalHead
    from detect.sequence import AutoencoderDetector
    from detect.synthetic import machine_days
    from monitoring import monitor
    from serve.app import build_app
    from train import jobs
    from train.pipeline import register_fitted

    head = LocalHead(num_cpus=2, log_path=workdir / "ray-start.log").start()
    figures: dict[str, object] = {}
    try:
        ray.init(address=head.address, log_to_driver=False)
        os.environ["RAYWATCH_JOB_ADDRESS"] = head.dashboard_url
        entity, metrics, values = machine_days(6)
        train = values[: 3 * DAY]
        t0 = time.perf_counter()
        det = AutoencoderDetector(epochs=3, hidden=32).fit(train, metrics)
        register_fitted("autoencoder", {entity: det}, {entity: metrics}, {entity: train})
        figures["initial_training_s"] = round(time.perf_counter() - t0, 1)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        app = build_app({"reload_interval_s": 0.5, "monitor": MONITOR, "admin_keys_file": str(workdir / "admin_keys")})
        serve.run(app, name="raywatch", route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60)

        def stream(rows: np.ndarray, start: int) -> None:
            for i in range(0, len(rows), 480):
                batch = [
                    {"entity": entity, "timestamp": float(start + i + k), "metrics": dict(zip(metrics, v))}
                    for k, v in enumerate(rows[i : i + 480].tolist())
                ]
                client.post("/v1/score", json={"rows": batch, "detectors": ["autoencoder"]}).raise_for_status()

        def drift_state() -> dict:
            return client.get("/v1/drift", params={"model": "autoencoder", "limit": 1000}).json()

        stream(values[3 * DAY : 4 * DAY], 3 * DAY)  # the control: a normal day
        deadline = time.monotonic() + 60
        while len(drift_state()["events"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        control = drift_state()
        figures["control_day"] = {
            "tests": len(control["events"]),
            "drift_events": sum(e["is_drift"] for e in control["events"]),
            "job_submitted": control["retraining"]["autoencoder"]["last_job"] is not None,
        }
        moving = [metrics.index("cpu"), metrics.index("latency_p99")]
        drifted = values[4 * DAY : 5 * DAY].copy()
        drifted[:, moving] += args.shift * train.std(axis=0)[moving]
        n = len(drifted)
        print(f"streaming {n} rows with +{args.shift} sigma on cpu and latency_p99")
        started_wall = time.time()
        stream(drifted, 4 * DAY)
        figures["stream_s"] = round(time.time() - started_wall, 2)

        deadline = time.monotonic() + 120
        job = event = None
        while time.monotonic() < deadline and not job:
            drift = client.get("/v1/drift", params={"model": "autoencoder", "only_drift": True}).json()
            if drift["events"] and event is None:
                event = min(drift["events"], key=lambda e: e["id"])
            job = drift["retraining"]["autoencoder"]["last_job"]
            time.sleep(0.2)
        if not job:
            raise RuntimeError("no retraining job was submitted within 120 s")
        figures["drift_to_first_event_s"] = round(event["time"] - started_wall, 2)
        figures["drift_to_job_submitted_s"] = round(job["submitted"] - started_wall, 2)
        figures["first_event"] = {k: event[k] for k in ("detector", "p_value", "drifted_features", "window_rows")}
        print(f"drift -> job submitted in {figures['drift_to_job_submitted_s']} s ({job['job_id']})")
        state = jobs.wait(job["job_id"], timeout_s=600)
        figures["job_status"] = state
        figures["job_done_after_drift_s"] = round(time.time() - started_wall, 1)
        decision = client.get("/v1/models").json()["models"]["autoencoder"]["retraining"]
        figures["decision"] = {k: decision[k] for k in ("promoted", "champion", "challenger", "reason")}
        print(f"decision: {figures['decision']}")

        # rollback: time until the restored version answers
        deadline = time.monotonic() + 30
        while (
            client.get("/v1/models").json()["models"]["autoencoder"]["slots"]["champion"]["version"]
            != decision["challenger"]
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the promoted challenger is not served")
            time.sleep(0.2)
        probe = [{"entity": entity, "timestamp": 1e9, "metrics": dict(zip(metrics, values[-1].tolist()))}]
        t0 = time.perf_counter()
        response = client.post(
            "/v1/admin/rollback", json={"model": "autoencoder"}, headers={"Authorization": f"Bearer {KEY}"}
        )
        response.raise_for_status()
        figures["rollback_api_s"] = round(time.perf_counter() - t0, 3)
        while True:
            out = client.post("/v1/score", json={"rows": probe, "detectors": ["autoencoder"]}).json()
            if out["results"][0]["detectors"]["autoencoder"]["model"]["version"] == decision["champion"]:
                break
            if time.perf_counter() - t0 > 30:
                raise RuntimeError("rollback not served after 30 s")
        figures["rollback_to_serving_s"] = round(time.perf_counter() - t0, 3)
        print(f"rollback served in {figures['rollback_to_serving_s']} s")
        client.close()
        serve.shutdown()
        monitor.stop_all()
    finally:
        ray.shutdown()
        head.stop()
    figures["machine"] = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores"
    figures["command"] = "python benchmarks/drift_loop.py"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift_loop.json").write_text(json.dumps(figures, indent=2, default=str))
    lines = [
        f"Self-retraining loop, measured on {figures['machine']} ({time.strftime('%Y-%m-%d')}), `{figures['command']}`.",
        f"Autoencoder for one synthetic machine (9 metrics, 1-minute samples); monitor window one day (1,440 rows, "
        f"every 6th kept). Control day (normal): {figures['control_day']}. Drift: +{args.shift} training sigma on "
        "cpu and latency_p99.",
        "",
        "| step | seconds after the first drifted request |",
        "|---|---|",
        f"| {n} drifted rows sent (batches of 480) | {figures['stream_s']} |",
        f"| first drift event ({figures['first_event']['detector']}) | {figures['drift_to_first_event_s']} |",
        f"| retraining job submitted | {figures['drift_to_job_submitted_s']} |",
        f"| job {figures['job_status']} (challenger registered, decision recorded) | {figures['job_done_after_drift_s']} |",
        "",
        f"Decision: {figures['decision']}",
        "",
        f"Rollback: admin call answered in {figures['rollback_api_s']} s; `/v1/score` served by the restored version "
        f"{figures['rollback_to_serving_s']} s after the call was sent.",
    ]
    (RESULTS / "drift_loop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
