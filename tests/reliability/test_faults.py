"""Faults: replicas killed under load, the process holding /v1/feedback killed after its 2xx, the drift
monitor actor killed, a corrupted or pickled model artifact, MLflow unreadable while serving.

The Ray Train worker kill (the run resumes from its checkpoint) is
tests/test_training.py::test_killed_ray_train_worker_resumes_from_checkpoint, part of `make test`."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from .support import (
    DEPLOYMENTS,
    INGRESS,
    REPLICAS,
    SOAK,
    LoadGenerator,
    summarize,
    wait_for,
)

pytestmark = pytest.mark.slow

RECOVERY_S = 30.0  # full service back within this, after a replica of every deployment is killed, or within
# the time the machine took to deploy the app from nothing where that is longer (a loaded machine)
MAX_ERROR_RATE = 0.01
KILL_LOAD_RPS = float(os.environ.get("RAYWATCH_KILL_RPS", 20))
# how long after a kill Serve's proxy may still route a request to the dead replica: until a call to it fails
# (ActorDiedError: the replica is dropped at once; measured 0.01 s after a kill under 73 requests/s) or the
# controller's health check (every 2 s) reports it
ROUTED_BLIND_S = 2.0


def test_kill_one_replica_of_each_deployment_under_load(served, figures):
    """One replica of the ingress and of each detector deployment killed at once (`ray.kill`) while
    scoring requests keep coming: every deployment is back to full strength, answering from its
    champion, within 30 s (or, on a machine so loaded that deploying the app from nothing took longer,
    within that deploy time: the replacements start the same way), and under 1% of the requests the
    failover answers fail.

    What the killed ingress replica held when it died is lost with it: Serve's proxy answers those
    requests 500 and does not send them again (it retries only a request no replica has accepted yet),
    so their number is the load times the latency at the kill over the replicas, not a property of the
    failover: 1-6 of 350-480 in 5 of 13 CI runs on a loaded 2-core machine, 1.4% and 1.5% in two. They are counted
    apart (`lost_with_ingress`, from the requests in flight at the kill or sent within `ROUTED_BLIND_S`
    after it), and each must be the proxy's bare-text 500 (the app's own 500s are JSON)."""
    import ray

    bound = recovery_bound(figures)
    rate = kill_load_rps(figures)

    victims = {}
    for name in DEPLOYMENTS:
        alive = served.replicas(name)
        assert len(alive) == REPLICAS, f"{name}: {len(alive)} replicas, the test needs {REPLICAS}"
        victims[name] = alive[0]
    gen = LoadGenerator(served, rate=rate, concurrency=16).start()
    time.sleep(3.0)
    killed_at = time.monotonic()
    for victim in victims.values():
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    noticed: dict[str, float] = {}  # Serve counts one replica fewer running
    recovered: dict[str, float] = {}  # a new replica running in its place
    deadline = killed_at + 3 * bound
    while len(recovered) < len(DEPLOYMENTS) and time.monotonic() < deadline:
        for name in DEPLOYMENTS:
            if name in recovered:
                continue
            if name not in noticed and served.running(name) < REPLICAS:
                noticed[name] = round(time.monotonic() - killed_at, 1)
            if served.replaced(name, victims[name]):
                recovered[name] = round(time.monotonic() - killed_at, 1)
        time.sleep(0.25)
    wait_for(served.all_champion, max(1.0, deadline - time.monotonic()), "every detector answering from its champion")
    full_service = round(time.monotonic() - killed_at, 1)
    time.sleep(3.0)  # the load goes on a little on the full set of replicas
    gen.stop()
    summary = summarize(gen.outcomes)
    held, failover = split_at_kill(gen.outcomes, killed_at)
    lost = [o for o in held if not 200 <= o.status < 300]
    after = summarize(failover)
    figures["replica_kill"] = {
        "load_rps": rate,
        "killed": {name: victims[name].pid for name in DEPLOYMENTS},
        "noticed_s": noticed,
        "recovery_s": recovered,
        "full_service_s": full_service,
        "bound_s": bound,
        **summary,
        "lost_with_ingress": len(lost),
        "failover": {k: after[k] for k in ("requests", "errors", "error_rate", "statuses")},
    }
    errors = [o.error for o in failover if not 200 <= o.status < 300][:5]
    assert set(recovered) == set(DEPLOYMENTS), f"not back to {REPLICAS} replicas: {set(DEPLOYMENTS) - set(recovered)}"
    assert summary["requests"] >= 10 * rate, summary
    # Serve's proxy's bare 500; the app's own 500s are JSON (serve/app.py `_internal_error`)
    assert all(o.status == 500 and o.error == "Internal Server Error" for o in lost), [
        (o.status, o.error) for o in lost
    ]
    assert after["error_rate"] < MAX_ERROR_RATE, (figures["replica_kill"], errors)
    assert max(recovered.values()) <= bound and full_service <= bound, figures["replica_kill"]


def split_at_kill(outcomes: list, killed_at: float) -> tuple[list, list]:
    """(the requests a replica killed at `killed_at` may have held: in flight at the kill or sent within
    `ROUTED_BLIND_S` after it, the rest). Only the first may be lost with the killed ingress replica."""
    held, rest = [], []
    for o in outcomes:
        (held if o.sent < killed_at + ROUTED_BLIND_S and o.sent + o.latency >= killed_at else rest).append(o)
    return held, rest


def recovery_bound(figures: dict) -> float:
    """RECOVERY_S, or the time the session's deploy took where this machine was slower than that."""
    return max(RECOVERY_S, figures.get("deploy_s", 0.0))


def kill_load_rps(figures: dict) -> float:
    """KILL_LOAD_RPS, scaled down by as much as the session's deploy took longer than RECOVERY_S: on a machine
    that slow (a CI run at 2-4x its usual time) 20 requests/s are more than the surviving replicas answer
    while their replacements start, and the test would measure the overload, not the failover."""
    return round(KILL_LOAD_RPS * RECOVERY_S / recovery_bound(figures), 1)


def test_feedback_acknowledged_survives_ingress_crash(served, figures):
    """Labels keep coming while every ingress process is SIGKILLed: each label that got its 201 is in
    the state store after Serve has restarted the ingress, and the restarted ingress takes labels."""
    from detect.state import ServingStore

    acknowledged: list[tuple[str, int, float]] = []
    refused: list[int] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        with httpx.Client(base_url=served.base_url, timeout=30) as client:
            k = 0
            while not stop.is_set():
                ts, label = f"crash-{w}-{k}", k % 2
                k += 1
                try:
                    r = client.post("/v1/feedback", json={"entity": served.entity, "timestamp": ts, "label": label})
                except httpx.HTTPError:
                    refused.append(0)
                    continue
                if r.status_code == 201:
                    acknowledged.append((ts, label, time.monotonic()))
                else:
                    refused.append(r.status_code)
                time.sleep(0.01)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    killed_at = time.monotonic()
    _, back = served.kill_every_replica(INGRESS, 3 * RECOVERY_S)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    store = ServingStore(served.state_dir / "serving.db")
    stored = {(f["timestamp"], f["label"]) for f in store.feedback(limit=1_000_000) if f["entity"] == served.entity}
    missing = [(ts, label) for ts, label, _ in acknowledged if (ts, label) not in stored]
    before = sum(1 for *_, at in acknowledged if at < killed_at)
    after = sum(1 for *_, at in acknowledged if at > killed_at + back)
    figures["feedback_crash"] = {
        "acknowledged": len(acknowledged),
        "acknowledged_before_kill": before,
        "acknowledged_after_restart": after,
        "refused_during_crash": len(refused),
        "lost": len(missing),
        "ingress_back_s": round(back, 1),
    }
    assert before > 0 and after > 0, figures["feedback_crash"]
    assert not missing, f"acknowledged labels lost: {missing[:10]}"


def test_killed_drift_monitor_restarts_and_loses_no_event(served, figures):
    """The drift monitor actor of a model, fed served rows, is killed: Ray restarts it, every event
    persisted before the kill is still there, and it goes on testing new windows."""
    import ray

    from monitoring import monitor
    from monitoring.events import DriftEventStore

    config = {
        "drift": {"window": 60, "thin": 1, "mmd_permutations": 20},
        "retrain": False,
        "concept_every_s": 3600,
        "version_check_s": 3600,
    }
    actor = monitor.get_or_create("autoencoder", config, str(served.state_dir), served.tracking_uri)
    values = served.series.test[served.series.metrics].to_numpy()
    sent = [0]

    def feed(windows: int) -> list[dict]:
        events = []
        for _ in range(windows):
            items = [
                {"entity": served.entity, "timestamp": float(sent[0] + i), "values": v, "path": "champion"}
                for i, v in enumerate(values[sent[0] : sent[0] + 60].tolist())
            ]
            sent[0] += 60
            events += ray.get(actor.observe.remote(items), timeout=120)["events"]
        return events

    feed(2)
    before = ray.get(actor.status.remote(), timeout=60)
    store = DriftEventStore(served.state_dir / "drift.db")
    persisted = {e["id"] for e in store.events(model="autoencoder", limit=10_000)}
    assert before["events"] >= 2 and persisted, before
    killed_at = time.monotonic()
    ray.kill(actor, no_restart=False)  # a crash: max_restarts=-1 brings it back
    new_events = feed(2)  # calls made while it restarts are retried (max_task_retries=-1)
    after = ray.get(actor.status.remote(), timeout=60)
    restarted = time.monotonic() - killed_at
    kept = {e["id"] for e in store.events(model="autoencoder", limit=10_000)}
    figures["monitor_kill"] = {
        "events_before": before["events"],
        "events_after": after["events"],
        "lost": len(persisted - kept),
        "restart_and_two_windows_s": round(restarted, 1),
    }
    assert after["starts"] == before["starts"] + 1 and after["pid"] != before["pid"], (before, after)
    assert persisted <= kept, f"events lost: {sorted(persisted - kept)[:10]}"
    assert new_events and after["events"] > before["events"]
    monitor.stop_all()


def _artifact_dir(model: str, version: str) -> Path:
    from mlflow.tracking import MlflowClient

    from train import registry

    source = MlflowClient(registry.tracking_uri()).get_model_version(registry.model_name(model), version).source
    assert source.startswith("file://"), source
    return Path(source.removeprefix("file://"))


def _settle(served, timeout: float = 60) -> None:
    """Best effort, after a fault test whatever its outcome: every detector back on its champion, so the
    next test starts from a healthy app."""
    try:
        wait_for(lambda: served.healthy() and served.all_champion(times=10), timeout, "the app to settle", poll=1.0)
    except AssertionError:
        pass


def _logged(served, text: str) -> int:
    """Files of this Ray session's logs (Serve replicas and their workers' stderr) that contain `text`."""
    from ray._private import worker

    logs = Path(worker.global_worker.node.get_logs_dir_path())
    return sum(1 for p in logs.rglob("*") if p.is_file() and text.encode() in p.read_bytes())


def _served_versions(served, model: str) -> dict:
    return served.client.get("/v1/models").json()["models"][model]


def test_corrupted_or_pickled_artifact_is_refused_and_previous_keeps_serving(served, figures):
    """A version whose artifacts changed after registration (checksum mismatch) is promoted: serving
    refuses it, says why in /v1/models, and goes on answering from the version it had. The same for
    a pickle placed among a version's artifacts (set as challenger)."""
    from detect.sequence import AutoencoderDetector
    from train import registry
    from train.pipeline import register_fitted

    series = served.series
    train = series.train[series.metrics].to_numpy()[:1500]
    det = AutoencoderDetector(epochs=1, hidden=8, seed=11).fit(train, series.metrics)
    bad = register_fitted(
        "autoencoder", {series.name: det}, {series.name: series.metrics}, {series.name: train}, promote=False
    )
    good = registry.alias_version("autoencoder", registry.CHAMPION)
    meta = _artifact_dir("autoencoder", bad) / "entities" / "asd__omi-2" / "detector.json"
    original = meta.read_bytes()
    tampered = json.loads(original)
    tampered["threshold"] = 0.0  # every row an anomaly: what a tampered model could do
    meta.write_text(json.dumps(tampered))
    try:
        response = served.client.post(
            "/v1/admin/promote", json={"model": "autoencoder", "version": bad}, headers=served.admin()
        )
        assert response.status_code < 500, response.text
        if response.status_code == 200:
            assert response.json()["serving"]["champion"] == good, response.json()
        for _ in range(3 * REPLICAS):  # both replicas, over several reload cycles
            r = served.client.post("/v1/score", json={**served.score_body(), "detectors": ["autoencoder"]})
            assert r.status_code == 200, r.text
            d = r.json()["results"][0]["detectors"]["autoencoder"]
            assert (d["path"], d["model"]["version"]) == ("champion", good), d
            time.sleep(0.3)
        figures["corrupted_artifact"] = {"refused_version": bad, "kept_serving": good, "answers": 3 * REPLICAS}
        error = wait_for(
            lambda: (_served_versions(served, "autoencoder").get("load_error") or "") or None,
            10,
            "the load error in /v1/models",
        )
        assert "checksum mismatch" in error and "detector.json" in error, error
        logged = _logged(served, "checksum mismatch for entities/asd__omi-2/detector.json")
        figures["corrupted_artifact"].update(load_error=error[-160:], reason_in_replica_logs=logged)
        assert logged, "the replicas' logs do not say why the version was refused"

        # a pickle among the artifacts of an otherwise intact version
        meta.write_bytes(original)
        (meta.parent / "model.pkl").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.")
        registry.promote("autoencoder", good)
        response = served.client.post(
            "/v1/admin/traffic",
            json={"model": "autoencoder", "challenger_version": bad, "challenger_percent": 0},
            headers=served.admin(),
        )
        assert response.status_code == 200 and response.json()["serving"]["challenger"] is None, response.text
        error = wait_for(
            lambda: "model.pkl" in (e := _served_versions(served, "autoencoder").get("load_error") or "") and e,
            10,
            "the pickle's load error in /v1/models",
        )
        assert "refusing entities/asd__omi-2/model.pkl: only JSON, NPZ and ONNX" in error, error
        figures["pickled_artifact"] = {"refused_version": bad, "load_error": error[-160:]}
    finally:
        meta.write_bytes(original)
        (meta.parent / "model.pkl").unlink(missing_ok=True)
        from mlflow.tracking import MlflowClient

        registry.promote("autoencoder", good)
        MlflowClient(registry.tracking_uri()).delete_registered_model_alias(
            registry.model_name("autoencoder"), registry.CHALLENGER
        )
        _settle(served)
    wait_for(lambda: _served_versions(served, "autoencoder").get("load_error") is None, 10, "the load error to clear")


def test_replica_restarted_while_champion_is_corrupt_serves_the_previous_version(served, figures):
    """The champion alias points at a version whose artifacts fail their checksum and a detector replica
    restarts: the new replica must serve the last good version (`previous`), not nothing."""
    import ray

    from train import registry

    good = registry.alias_version("autoencoder", registry.CHAMPION)
    bad = max(int(v["version"]) for v in registry.versions("autoencoder"))
    assert str(bad) != good
    meta = _artifact_dir("autoencoder", str(bad)) / "entities" / "asd__omi-2" / "detector.json"
    original = meta.read_bytes()
    meta.write_bytes(original.replace(b'"threshold"', b'"threshold" ', 1))
    try:
        registry.promote("autoencoder", str(bad))  # champion := corrupt, previous := good
        victim = served.replicas("AutoencoderDetector")[0]
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        wait_for(
            lambda: served.replaced("AutoencoderDetector", victim),
            3 * RECOVERY_S,
            "the autoencoder replica restarted",
        )
        answers = []
        for _ in range(6 * REPLICAS):
            r = served.client.post("/v1/score", json={**served.score_body(), "detectors": ["autoencoder"]})
            assert r.status_code == 200, r.text
            d = r.json()["results"][0]["detectors"]["autoencoder"]
            answers.append((d["path"], d["model"]["version"]))
        figures["corrupt_champion_restart"] = {"answers": sorted(set(answers))}
        assert set(answers) == {("champion", good)}, answers
    finally:
        meta.write_bytes(original)
        registry.promote("autoencoder", good)
        _settle(served)
    assert served.all_champion()


def test_mlflow_unreadable_scoring_continues_admin_answers_503(served, figures):
    """The tracking store becomes unreadable while serving: scoring goes on from the loaded models,
    /v1/models reports the registry error, admin calls answer 503 with a message; all recovers after."""
    from train import registry

    db = Path(served.tracking_uri.removeprefix("sqlite:///"))
    original = db.read_bytes()
    admin = served.admin()
    outage = {}
    try:
        with open(db, "r+b") as f:  # the SQLite header: "file is not a database" for every reader
            f.write(b"\0" * 100)
            f.flush()
            os.fsync(f.fileno())
        error = wait_for(
            lambda: (_served_versions(served, "lstm").get("load_error") or "") or None, 10, "the registry error"
        )
        paths = []
        for _ in range(20):
            r = served.client.post("/v1/score", json=served.score_body())
            assert r.status_code == 200, r.text
            paths += [d["path"] for d in r.json()["results"][0]["detectors"].values()]
        assert set(paths) == {"champion"}, paths
        calls = {
            "promote": ("/v1/admin/promote", {"model": "lstm", "version": "1"}),
            "rollback": ("/v1/admin/rollback", {"model": "lstm"}),
            "traffic": ("/v1/admin/traffic", {"model": "lstm", "challenger_version": "1"}),
        }
        for name, (path, body) in calls.items():
            r = served.client.post(path, json=body, headers=admin)
            outage[name] = r.status_code
            assert r.status_code == 503, (name, r.text)
            assert "registry" in r.json()["detail"], r.json()
        assert served.client.get("/readyz").status_code == 200
        assert served.client.get("/healthz").status_code == 200
    finally:
        db.write_bytes(original)
    wait_for(lambda: _served_versions(served, "lstm").get("load_error") is None, 15, "the registry error to clear")
    r = served.client.post("/v1/admin/promote", json={"model": "lstm", "version": "1"}, headers=admin)
    assert r.status_code == 200, r.text
    assert registry.alias_version("lstm", registry.CHAMPION) == "1"
    figures["mlflow_unreadable"] = {
        "scoring_requests": 20,
        "scoring_5xx": 0,
        "admin_statuses": outage,
        "models_load_error": error[:120],
    }


@pytest.mark.skipif(not SOAK, reason="soak only: `make soak`")
def test_soak_repeated_kills_keep_error_rate_low(served, figures):
    """Soak: one replica of a deployment killed every 20 s, in turn, for 80 s of load."""
    import ray

    gen = LoadGenerator(served, rate=KILL_LOAD_RPS, concurrency=16).start()
    recovered = {}
    for name in DEPLOYMENTS:
        time.sleep(5.0)
        victim = served.replicas(name)[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        wait_for(
            lambda n=name, v=victim: served.replaced(n, v),
            3 * RECOVERY_S,
            f"{name} restarted",
        )
        recovered[name] = round(time.monotonic() - killed_at, 1)
        time.sleep(max(0.0, 20.0 - (time.monotonic() - killed_at)))
    gen.stop()
    summary = summarize(gen.outcomes)
    figures["soak_sequential_kills"] = {"recovery_s": recovered, **summary}
    assert summary["error_rate"] < MAX_ERROR_RATE and max(recovered.values()) <= recovery_bound(figures), figures[
        "soak_sequential_kills"
    ]
