"""The Ray Serve app on a real local Ray, reached over real HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
from serving_fixtures import wait_for

from detect.data import load_series
from serve.router import CircuitBreaker, TrafficPolicy, bucket
from serve.settings import ServeSettings

pytestmark = pytest.mark.slow

PORT = 8123
KEYS = ("key-one-0123456789", "key-two-9876543210")


@pytest.fixture(scope="module")
def served(data_dir, ray_cluster, tmp_path_factory):
    """Three detectors registered in a fresh MLflow store (two versions each), served on 127.0.0.1:8123."""
    import os

    from ray import serve
    from serving_fixtures import register_small_models

    workdir = tmp_path_factory.mktemp("serve")
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI",)}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    keys_file = workdir / "admin_keys"
    keys_file.write_text("\n".join(KEYS) + "\n")
    series = load_series("asd", "omi-2", data_dir)
    register_small_models(series, versions=2)
    from serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = build_app(
        {
            "state_dir": str(workdir / "state"),
            "reload_interval_s": 0.5,
            "admin_keys_file": str(keys_file),
            "breaker_cooldown_s": 1.0,
            "single_rows_in_ingress": ["ensemble"],  # off by default; on here, for its tests below
        }
    )
    serve.run(app, name="raywatch", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30)
    yield client, series
    client.close()
    serve.shutdown()  # the next module starts Serve with its own HTTP options
    from monitoring import monitor

    monitor.stop_all()  # detached actors outlive the app
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


CARRIED = ("top_metrics", "threshold", "alert")


def without_carried_state(answer):
    """A scoring answer without what each request carries on from the ones before: its root causes are held
    across requests (detect/attribution.py), its threshold learns from every served row (DSPOT's moving
    baseline, detect/thresholds.py), and an alert open when the request came goes on through its rows (its
    row count and peak grow), so the same rows sent again get other values of these, whatever model scored
    them."""
    if isinstance(answer, dict):
        return {k: without_carried_state(v) for k, v in answer.items() if k not in CARRIED}
    if isinstance(answer, list):
        return [without_carried_state(v) for v in answer]
    return answer


def row(series, i: int = 0, **override) -> dict:
    values = dict(zip(series.metrics, series.test[series.metrics].iloc[i].tolist()))
    return {"entity": series.name, "timestamp": float(i), "metrics": {**values, **override}}


def test_scores_with_all_three_detectors(served):
    client, series = served
    response = client.post("/v1/score", json={"rows": [row(series, i) for i in range(40)]})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 40
    last = results[-1]
    assert set(last["detectors"]) == {"ensemble", "lstm", "autoencoder"}
    for d in last["detectors"].values():
        assert d["path"] == "champion" and d["model"]["version"] == "1" and d["model"]["variant"] == "fp32"
        assert len(d["top_metrics"]) == 3 and d["top_metrics"][0]["metric"] in series.metrics
        assert np.isfinite(d["anomaly_score"])
    assert 0 <= last["incident_probability"] <= 1
    # one sample at a time gives windowed scores from the kept history
    single = client.post("/v1/score", json={"rows": [row(series, 40)], "detectors": ["autoencoder"]})
    assert single.status_code == 200 and list(single.json()["results"][0]["detectors"]) == ["autoencoder"]
    forecast = client.post("/v1/forecast", json={"entity": series.name, "horizon": 4})
    assert forecast.status_code == 200 and len(forecast.json()["forecast"]) == 4
    assert set(forecast.json()["forecast"][0]) == set(series.metrics)
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200 and "/v1/score" in client.get("/openapi.json").json()["paths"]


def test_batched_scoring_equals_one_by_one_and_the_batch_path(served):
    """What dynamic batching does (several requests' rows in one ONNX Runtime call) changes no score."""
    from serve.detectors import load_models
    from serve.schemas import result_rows

    _, series = served
    X = series.test[series.metrics].to_numpy()[:200]
    for kind in ("ensemble", "lstm", "autoencoder"):
        model = load_models(kind)[series.name]
        items = [(X[max(0, k - model.context_rows) : k + 1], 1) for k in range(100, 130)]
        items += [(X[:140], 40), (X[:3], 2)]  # several new rows; a history shorter than a window
        together = [result_rows(arrays) for arrays in model.score_arrays(items)]
        for (rows, n), got in zip(items, together):
            assert got == model.score_rows(rows, n)
        batch = model.runtime.score_series(X[:130])[100:130]
        np.testing.assert_allclose([r[0]["anomaly_score"] for r in together[:30]], batch, rtol=1e-6, atol=1e-9)
        assert [r["anomaly_score"] for r in together[30]] == pytest.approx(model.runtime.score_series(X[:140])[100:])


def test_bad_inputs_get_4xx_naming_the_field(served):
    client, series = served
    good = row(series)
    big = {"rows": [good] * 10}
    cases = [
        ({"rows": []}, 422, "rows"),
        ({}, 422, "rows"),
        ({"rows": [good], "detectors": ["magic"]}, 422, "detectors[0]"),
        ({"rows": [{**good, "entity": ""}]}, 422, "rows[0].entity"),
        ({"rows": [{**good, "entity": "bad entity!"}]}, 422, "rows[0].entity"),
        ({"rows": [{**good, "entity": "asd/nope"}]}, 422, "rows[0].entity"),
        ({"rows": [{**good, "metrics": {}}]}, 422, "rows[0].metrics"),
        ({"rows": [{**good, "metrics": {"m00": 1.0}}]}, 422, "rows[0].metrics"),
        ({"rows": [{**good, "metrics": {**good["metrics"], "extra": 1.0}}]}, 422, "rows[0].metrics"),
        ({"rows": [{**good, "metrics": {**good["metrics"], "m03": "high"}}]}, 422, "rows[0].metrics.m03"),
        ({"rows": [{**good, "metrics": {**good["metrics"], "m03": None}}]}, 422, "rows[0].metrics.m03"),
        ({"rows": [good, {**good, "colour": "red"}]}, 422, "rows[1].colour"),
        ({"rows": "everything"}, 422, "rows"),
        ({"rows": [good] * 6000}, 422, "rows"),
    ]
    checked = 0
    for body, status, field in cases:
        response = client.post("/v1/score", json=body)
        assert response.status_code == status, (body if len(str(body)) < 300 else field, response.text)
        assert field in response.json()["detail"], (field, response.json())
        checked += 1
    raw = [
        (b'{"rows": [', "application/json", 422, "body"),  # malformed JSON
        (b"not json at all", "application/json", 422, "body"),
    ]
    for body, ctype, status, field in raw:
        response = client.post("/v1/score", content=body, headers={"content-type": ctype})
        assert response.status_code == status and field in response.json()["detail"], response.text
        checked += 1
    nan = client.post(
        "/v1/score",
        content=b'{"rows": [{"entity": "asd/omi-2", "metrics": {"m00": NaN}}]}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422 and "rows[0].metrics.m00" in nan.json()["detail"]
    inf = client.post(
        "/v1/score",
        content=b'{"rows": [{"entity": "asd/omi-2", "metrics": {"m00": Infinity}}]}',
        headers={"content-type": "application/json"},
    )
    assert inf.status_code == 422 and "rows[0].metrics.m00" in inf.json()["detail"]
    huge = client.post("/v1/score", content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "body" in huge.json()["detail"]
    horizon = client.post("/v1/forecast", json={"entity": series.name, "horizon": 0})
    assert horizon.status_code == 422 and "horizon" in horizon.json()["detail"]
    label = client.post("/v1/feedback", json={"entity": series.name, "timestamp": 1, "label": 7})
    assert label.status_code == 422 and "label" in label.json()["detail"]
    checked += 5
    assert checked >= 15
    assert client.post("/v1/score", json=big).status_code == 200  # the service is still up


def test_admin_auth_two_keys(served):
    client, _ = served
    body = {"model": "autoencoder", "challenger_percent": 0, "shadow": False}
    assert client.post("/v1/admin/traffic", json=body).status_code == 401
    assert client.post("/v1/admin/traffic", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.post("/v1/admin/traffic", json=body, headers={"Authorization": "Basic abc"}).status_code == 401
    for key in KEYS:
        assert (
            client.post("/v1/admin/traffic", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        )
    missing = client.post(
        "/v1/admin/promote", json={"model": "lstm", "version": "99"}, headers={"Authorization": f"Bearer {KEYS[0]}"}
    )
    assert missing.status_code == 404 and "no version 99" in missing.json()["detail"]


def test_refused_requests_are_logged_with_their_fields_and_a_bad_key_is_not(served):
    """Serve's line per request is off in the ingress (`ServeSettings.ingress_access_log`); a refused request
    still shows in the replica's log, as raywatch logs it (serve/app.py `Refusals`, detect/logs.py): its
    route, status and the answer's detail as fields. An auth failure's line has no detail, and the key sent
    is in no log. A flood of refusals writes at most REFUSALS_LOGGED_PER_S lines a second, and the next line
    says how many were not logged. Each request is sent again until its line shows: a line that fell in a
    second whose budget other refusals had spent is counted, not written."""
    import uuid
    from pathlib import Path

    from ray._private import worker

    from serve.app import REFUSALS_LOGGED_PER_S

    client, series = served
    logs = Path(worker.global_worker.node.get_logs_dir_path())

    def logged() -> str:
        return "\n".join(
            line
            for path in logs.glob("worker-*.err")
            for line in path.read_text(errors="replace").splitlines()
            if "raywatch.serve: request refused" in line
        )

    def logged_after(send, expected: str, what: str) -> str:
        """Send a refused request until a line holding `expected` is in the logs; that line."""

        def sent_and_seen():
            send()
            return next((line for line in logged().splitlines() if expected in line), None)

        return wait_for(sent_and_seen, 30, what)

    secret = f"not-a-key-{uuid.uuid4().hex}"
    body = {"model": "autoencoder", "challenger_percent": 0, "shadow": False}

    def deny():
        answer = client.post("/v1/admin/traffic", json=body, headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 403, answer.text

    unknown = f"asd/unknown-{uuid.uuid4().hex[:8]}"

    def refuse():
        answer = client.post("/v1/score", json={"rows": [{**row(series), "entity": unknown}]})
        assert answer.status_code == 422 and unknown in answer.json()["detail"], answer.text

    line = logged_after(refuse, unknown, "the refused request's line in the ingress's log")
    assert line.startswith("WARNING ") and 'route="/v1/score" status=422 detail="rows[0].entity: ' in line, line
    logged_after(deny, 'route="/v1/admin/traffic" status=403 detail=None', "a 403's line")
    logged_after(lambda: client.get(f"/v1/{secret}"), 'route="unmatched" status=404 detail="Not Found"', "a 404's")
    assert not any(secret in path.read_text(errors="replace") for path in logs.rglob("*.err")), "a key was logged"

    flood = 3 * REFUSALS_LOGGED_PER_S
    for _ in range(flood):
        refuse()
    line = logged_after(refuse, "not_logged=", "a line saying how many refusals were not logged")
    assert int(line.rsplit("not_logged=", 1)[1].split()[0]) > 0, line  # each refusal is still counted


def test_ab_split_by_stable_entity_hash():
    policy = TrafficPolicy(challenger_percent=30)
    ids = [f"host-{i:05d}.example" for i in range(2000)]
    share = np.mean([policy.path_for(e, has_challenger=True) == "challenger" for e in ids])
    assert abs(share - 0.30) <= 0.05
    assert all(policy.path_for(e, True) == policy.path_for(e, True) for e in ids[:100])  # stable
    assert all(policy.path_for(e, has_challenger=False) == "champion" for e in ids[:100])
    assert 0 <= bucket("x") < 100


def test_fleet_snapshot_scores_good_rows_and_rejects_bad_ones_by_index(served):
    client, series = served
    good = row(series, 5)
    untimed = {k: v for k, v in good.items() if k != "timestamp"}
    snapshot = {
        "timestamp": 1234.0,
        "rows": [
            {**good, "entity": "asd/never-trained"},
            {**good, "metrics": {"m00": 1.0}},
            untimed,  # scored, with the snapshot's timestamp
            {**good, "metrics": {**good["metrics"], "m03": "high"}},
            good,  # the same entity again
            17,
            {**good, "entity": "bad entity!"},
        ],
    }
    answer = client.post("/v1/score/fleet", json=snapshot)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["scored"] == 1 and [r["index"] for r in out["results"]] == [2]
    scored = out["results"][0]
    assert scored["entity"] == series.name and scored["timestamp"] == 1234.0
    assert set(scored["detectors"]) == {"autoencoder", "lstm", "ensemble"}
    fields = {r["index"]: r["field"] for r in out["rejected"]}
    assert fields == {
        0: "rows[0].entity",
        1: "rows[1].metrics",
        3: "rows[3].metrics.m03",
        4: "rows[4].entity",
        5: "rows[5]",
        6: "rows[6].entity",
    }, out["rejected"]
    assert "unknown entity 'asd/never-trained'" in out["rejected"][0]["message"]
    assert "already at rows[2]" in out["rejected"][3]["message"]
    nothing = client.post("/v1/score/fleet", json={"rows": [{**good, "entity": "asd/nope"}]})
    assert nothing.status_code == 422 and nothing.json()["detail"].startswith("rows[0].entity: no row"), nothing.text


def test_batch_matrix_route_scores_as_the_batch_path_and_feeds_history(served):
    """/v1/score/batch (one entity's rows as a matrix, columns in any order) gives the offline batch
    path's scores, answers column-wise, and its rows join the entity's history for later requests."""
    from serve.detectors import load_models

    client, series = served
    X = series.test[series.metrics].to_numpy()[500:801]
    names = list(reversed(series.metrics))
    body = {
        "entity": series.name,
        "metrics": names,
        "values": X[:300, ::-1].tolist(),
        "timestamps": [float(t) for t in range(500, 800)],
    }
    response = client.post("/v1/score/batch", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["entity"] == series.name and out["timestamps"] == body["timestamps"]
    assert len(out["is_anomaly"]) == len(out["incident_probability"]) == 300
    assert set(out["detectors"]) == {"ensemble", "lstm", "autoencoder"}
    flagged = np.zeros(300, dtype=bool)
    for kind, columns in out["detectors"].items():
        model = load_models(kind)[series.name]
        assert columns["path"] == "champion" and columns["model"]["version"] == "1"
        scores = np.asarray(columns["anomaly_score"])
        # rows past the models' context depend on this batch alone: the offline batch path's scores
        start = model.context_rows
        np.testing.assert_allclose(scores[start:], model.runtime.score_series(X[:300])[start:], rtol=1e-6, atol=1e-9)
        assert columns["is_anomaly"] == (scores >= columns["thresholds"]).tolist()
        assert columns["threshold"] == columns["thresholds"][-1]
        assert len(columns["top_metrics"]) == 300 and set(columns["top_metrics"][-1]) <= set(series.metrics)
        assert len(columns["top_contributions"][-1]) == 3
        flagged |= scores >= columns["thresholds"]
    assert out["is_anomaly"] == flagged.tolist()
    assert out["incident_probability"] == out["detectors"]["ensemble"]["incident_probability"]
    # the next single row is scored after the batch's rows, as if they had come one by one
    nxt = client.post("/v1/score", json={"rows": [row(series, 800)], "detectors": ["autoencoder"]}).json()
    model = load_models("autoencoder")[series.name]
    expected = model.runtime.score_series(X)[-1]
    assert nxt["results"][0]["detectors"]["autoencoder"]["anomaly_score"] == pytest.approx(expected, rel=1e-6)


def test_served_rows_come_grouped_into_one_alert_per_episode(served):
    """Alerts, not rows: twelve rows with one metric pushed far out are one alert (opened once, carried by
    the rows while it fires, closed once after quiet rows), naming that metric, on both scoring routes."""
    client, series = served
    quiet = series.train[series.metrics].to_numpy()[-200:]  # like the rows the model learnt from
    spiked = quiet[60:72].copy()
    spiked[:, 0] += 5.0  # the metrics are scaled to [0, 1]: five ranges out
    values = np.vstack([quiet[:60], spiked, quiet[72:]])
    body = {
        "entity": series.name,
        "metrics": series.metrics,
        "values": values.tolist(),
        "timestamps": [float(10_000 + t) for t in range(len(values))],
        "detectors": ["autoencoder"],
    }
    response = client.post("/v1/score/batch", json=body)
    assert response.status_code == 200, response.text
    alerts = response.json()["detectors"]["autoencoder"]["alerts"]
    states = [a and a["state"] for a in alerts]
    assert len(alerts) == len(values)
    assert states[:60].count("opened") <= 1 and states[59] is None, states[:60]  # any earlier alert has closed
    assert states[60:80].count("opened") == 1, states[60:80]
    opened = alerts[60 + states[60:80].index("opened")]
    assert 10_060 <= opened["started"] <= opened["opened"] <= 10_072 and opened["top_metrics"][0] == series.metrics[0]
    after = states[72:]
    assert after.count("closed") == 1 and after.count("opened") == 0, after
    closed = alerts[72 + after.index("closed")]
    assert closed["started"] == opened["started"] and closed["closed"] > 10_072 and closed["rows"] >= 3
    assert set(after[after.index("closed") + 1 :]) == {None}
    # /v1/score reports the same book: a quiet row after the episode carries no alert
    single = client.post("/v1/score", json={"rows": [row(series, 0)], "detectors": ["autoencoder"]}).json()
    assert "alert" in single["results"][0]["detectors"]["autoencoder"]


def test_served_thresholds_are_spot_learning_as_evaluate_judges(served):
    """Each served row is judged against the operational threshold (DSPOT), started from the state the model's bundle was
    saved with and learning from the served rows that are no alert's: over every row a newly promoted
    version serves, across both routes, the thresholds are those `raywatch evaluate` computes over the
    same scores (`detect.alerting.online_alerts`), and they move as it learns."""
    from detect.alerting import online_alerts
    from detect.thresholds import DSPOT, threshold_from_state
    from train import registry

    client, series = served
    admin = {"Authorization": f"Bearer {KEYS[0]}"}
    quiet = series.train[series.metrics].to_numpy()[-400:]
    settle = {"entity": series.name, "metrics": series.metrics, "values": quiet[:20].tolist(), "detectors": ["lstm"]}
    assert client.post("/v1/score/batch", json=settle).json()["detectors"]["lstm"]["alerts"][-1] is None
    promoted = client.post("/v1/admin/promote", json={"model": "lstm", "version": "2"}, headers=admin)
    assert promoted.status_code == 200 and promoted.json()["serving"]["champion"] == "2", promoted.text
    try:
        scores, thresholds = [], []
        for k in range(200):  # single rows until version 2 answers: its rows from the first one on
            answer = client.post("/v1/score", json={"rows": [row(series, k)], "detectors": ["lstm"]}).json()
            d = answer["results"][0]["detectors"]["lstm"]
            if d["model"]["version"] == "2":
                scores.append(d["anomaly_score"])
                thresholds.append(d["threshold"])
            if len(scores) >= 5:
                break
        assert len(scores) == 5, "version 2 never answered"
        X = series.test[series.metrics].to_numpy()[200:1700]
        body = {"entity": series.name, "metrics": series.metrics, "values": X.tolist(), "detectors": ["lstm"]}
        columns = client.post("/v1/score/batch", json=body).json()["detectors"]["lstm"]
        assert columns["model"]["version"] == "2"
        assert columns["is_anomaly"] == (np.asarray(columns["anomaly_score"]) >= columns["thresholds"]).tolist()
        scores += columns["anomaly_score"]
        thresholds += columns["thresholds"]
        state = registry.load_bundle("lstm", "2")[0].detectors[series.name].served_spot()
        started = threshold_from_state(state)
        assert isinstance(started, DSPOT)
        expected, _ = online_alerts(np.asarray(scores), started)
        np.testing.assert_allclose(thresholds, expected, rtol=1e-9)
        assert len(set(thresholds)) > 1 and thresholds[0] == threshold_from_state(state).threshold_
    finally:
        client.post("/v1/admin/rollback", json={"model": "lstm"}, headers=admin)


def test_batch_matrix_route_bad_inputs_get_422_naming_the_field(served):
    client, series = served
    X = series.test[series.metrics].to_numpy()[:5]
    good = {"entity": series.name, "metrics": list(series.metrics), "values": X.tolist()}
    ragged = [*good["values"][:3], good["values"][3][:-1], good["values"][4]]
    cases = [
        ({**good, "values": []}, "values"),
        ({**good, "values": ragged}, "values[3]"),
        ({**good, "metrics": [*series.metrics[:-1], series.metrics[0]]}, "metrics"),
        ({**good, "metrics": [*series.metrics[:-1], "nope"]}, "metrics"),
        ({**good, "timestamps": [1.0, 2.0]}, "timestamps"),
        ({**good, "entity": "asd/nope"}, "entity"),
        ({**good, "values": [[*good["values"][0][:-1], "high"]]}, "values[0]"),
        ({**good, "detectors": ["magic"]}, "detectors[0]"),
        ({**good, "rows": []}, "rows"),
        ({**good, "values": good["values"] * 1001}, "values"),
    ]
    for body, field in cases:
        response = client.post("/v1/score/batch", json=body)
        assert response.status_code == 422, (field, response.text[:300])
        assert response.json()["detail"].startswith(field), (field, response.json()["detail"])
    values = ", ".join(["NaN"] + ["1.0"] * (len(series.metrics) - 1))  # NaN: not JSON, but parsers take it
    text = f'{{"entity": "{series.name}", "metrics": {json.dumps(list(series.metrics))}, "values": [[{values}]]}}'
    nan = client.post("/v1/score/batch", content=text.encode(), headers={"content-type": "application/json"})
    assert nan.status_code == 422 and nan.json()["detail"].startswith("values[0][0]"), nan.text
    assert client.post("/v1/score/batch", json=good).status_code == 200  # the service is still up


def test_ab_and_shadow_over_http(served):
    client, series = served
    admin = {"Authorization": f"Bearer {KEYS[0]}"}
    rows = [row(series, i) for i in range(100, 140)]
    first = client.post("/v1/score", json={"rows": rows}).json()
    baseline = client.post("/v1/score", json={"rows": rows}).json()  # context = the same 40 rows from now on
    assert (
        client.post(
            "/v1/admin/traffic",
            json={"model": "lstm", "challenger_version": "2", "shadow": True, "challenger_percent": 0},
            headers=admin,
        ).status_code
        == 200
    )
    shadowed = client.post("/v1/score", json={"rows": rows}).json()
    # the challenger's outputs are never returned: the same scores, flags, models and paths
    assert without_carried_state(shadowed) == without_carried_state(baseline)
    assert without_carried_state(first) != without_carried_state(baseline)  # (the comparison above can fail)
    deadline = time.time() + 10
    while time.time() < deadline:
        stats = client.get("/v1/models").json()["models"]["lstm"]["traffic"]
        if stats["shadow_rows"] >= 40:
            break
        time.sleep(0.2)
    assert stats["shadow_rows"] >= 40  # the challenger did score a copy
    bucket_share = 100.0 if bucket(series.name) < 100 else 0.0
    client.post("/v1/admin/traffic", json={"model": "lstm", "challenger_percent": bucket_share}, headers=admin)
    routed = client.post("/v1/score", json={"rows": rows[:1]}).json()["results"][0]["detectors"]["lstm"]
    assert routed["path"] == "challenger" and routed["model"]["version"] == "2"
    client.post("/v1/admin/traffic", json={"model": "lstm", "challenger_percent": 0}, headers=admin)
    routed = client.post("/v1/score", json={"rows": rows[:1]}).json()["results"][0]["detectors"]["lstm"]
    assert routed["path"] == "champion" and routed["model"]["version"] == "1"


def test_injected_failure_opens_circuit_and_fallback_answers(served):
    from ray import serve

    client, series = served
    handle = serve.get_deployment_handle("AutoencoderDetector", app_name="raywatch")
    handle.set_fault.remote(True).result()
    try:
        paths = []
        for i in range(8):
            response = client.post("/v1/score", json={"rows": [row(series, 200 + i)], "detectors": ["autoencoder"]})
            assert response.status_code == 200
            paths.append(response.json()["results"][0]["detectors"]["autoencoder"]["path"])
        assert set(paths) == {"fallback"}
        assert client.get("/v1/models").json()["models"]["autoencoder"]["circuit"] == "open"
    finally:
        handle.set_fault.remote(False).result()
    time.sleep(1.2)  # cooldown: the next call is a half-open probe
    recovered = client.post("/v1/score", json={"rows": [row(series, 210)], "detectors": ["autoencoder"]}).json()
    assert recovered["results"][0]["detectors"]["autoencoder"]["path"] == "champion"
    assert client.get("/v1/models").json()["models"]["autoencoder"]["circuit"] == "closed"


def test_promote_switches_version_without_failed_requests(served):
    client, series = served
    statuses, versions = [], []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30) as c:
            i = 300
            while not stop.is_set():
                r = c.post("/v1/score", json={"rows": [row(series, i)], "detectors": ["autoencoder"]})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    d = r.json()["results"][0]["detectors"]["autoencoder"]
                    versions.append((d["path"], d["model"]["version"]))
                i += 1

    worker = threading.Thread(target=load)
    worker.start()
    wait_for(lambda: len(versions) >= 5, 30, "the load's first answers")
    response = client.post(
        "/v1/admin/promote",
        json={"model": "autoencoder", "version": "2"},
        headers={"Authorization": f"Bearer {KEYS[1]}"},
    )
    assert response.status_code == 200 and response.json()["serving"]["champion"] == "2"
    # every ingress replica reads the new champion on its next reload: waited for, not a fixed 1.5 s
    wait_for(lambda: versions[-1] == ("champion", "2"), 30, "the load to be answered by version 2")
    seen = len(versions)
    wait_for(lambda: len(versions) >= seen + 5, 30, "more answers after the switch")
    stop.set()
    worker.join()
    assert statuses and set(statuses) == {200}, statuses
    assert versions[0] == ("champion", "1") and versions[-1] == ("champion", "2")
    assert all(path == "champion" for path, _ in versions)  # never fell back during the switch
    rollback = client.post(
        "/v1/admin/rollback", json={"model": "autoencoder"}, headers={"Authorization": f"Bearer {KEYS[0]}"}
    )
    assert rollback.status_code == 200 and rollback.json()["serving"]["champion"] == "1"


def test_feedback_is_persisted(served, tmp_path):
    client, series = served
    response = client.post("/v1/feedback", json={"entity": series.name, "timestamp": 12.0, "label": 1})
    assert response.status_code == 201 and response.json()["stored"]


def test_lineage_resolves_a_served_answer_to_version_run_and_data_hash(served, tmp_path):
    """`raywatch lineage` on a saved /v1/score answer: each detector's version, the MLflow run that
    registered it and the hash of the rows it learnt from (the fixture's autoencoder: 3,000 train rows)."""
    import subprocess
    import sys
    from pathlib import Path

    from train import registry
    from train.assemble import data_sha256

    client, series = served
    answer = client.post("/v1/score", json={"rows": [row(series, 0)]}).json()
    saved = tmp_path / "answer.json"
    saved.write_text(json.dumps(answer))
    cli = Path(sys.executable).parent / "raywatch"
    out = subprocess.run([cli, "lineage", str(saved)], capture_output=True, text=True, timeout=120, check=True)
    found = {f["model"]: f for f in json.loads(out.stdout)}
    assert set(found) == {"raywatch-autoencoder", "raywatch-lstm", "raywatch-ensemble"}
    served_version = answer["results"][0]["detectors"]["autoencoder"]["model"]["version"]
    autoencoder = found["raywatch-autoencoder"]
    runs = {str(v["version"]): v["run_id"] for v in registry.versions("autoencoder")}
    assert autoencoder["version"] == str(served_version) and autoencoder["run_id"] == runs[str(served_version)]
    train = series.train[series.metrics].to_numpy()[:3000]
    assert autoencoder["data_sha256"] == registry.data_digest({series.name: data_sha256(train)})
    refused = subprocess.run([cli, "lineage", "--version", "1"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--model and --version" in refused.stderr


def ensemble_single_rows_in_ingress(client, series, i: int) -> None:
    """Send a single ensemble row (which starts the ingress's own models of the ensemble, `single_rows_in_ingress`)
    and wait until they score its single rows."""
    client.post("/v1/score", json={"rows": [row(series, i)], "detectors": ["ensemble"]})
    wait_for(
        lambda: client.get("/v1/models").json()["models"]["ensemble"]["single_rows"] == "ingress",
        120,
        "the ensemble's single-row models in the ingress",
    )


def test_models_run_in_the_ingress_score_as_their_deployment_does(served, tmp_path):
    """The ensemble's models in the ingress answer as through its deployment, model version and path included:
    for single-row calls (`single_rows_in_ingress: [ensemble]`, the app of `served`) and for every call
    (`in_ingress`: no ensemble deployment), against an app that sends every call over the hop. The two
    other apps are deployed one at a time (the test cluster's 2 CPUs hold one beside `served`'s)."""
    from ray import serve

    from serve.app import build_app

    client, series = served
    ensemble_single_rows_in_ingress(client, series, 1999)
    rows = [row(series, i) for i in range(2000, 2104)]

    def answers(prefix: str) -> list[dict]:
        url = f"{prefix}/v1/score"
        warm = client.post(url, json={"rows": rows[:64], "detectors": ["ensemble", "lstm"]})  # same history
        assert warm.status_code == 200, warm.text
        return [  # 39 rows, then one more: the single-row path after them
            client.post(url, json={"rows": rows[64:103], "detectors": ["ensemble", "lstm"]}).json(),
            client.post(url, json={"rows": rows[103:], "detectors": ["ensemble"]}).json(),
        ]

    def deployed(prefix: str, settings: dict) -> tuple[list[dict], dict]:
        name = f"raywatch{prefix.replace('/', '-')}"
        args = {"state_dir": str(tmp_path / name), "monitor": {"enabled": False}, **settings}
        serve.run(build_app(args), name=name, route_prefix=prefix)
        try:
            return answers(prefix), serve.status().applications[name].deployments
        finally:
            serve.delete(name)

    hop, hop_deployments = deployed("/hop", {"single_rows_in_ingress": []})
    local, local_deployments = deployed("/local", {"in_ingress": ["ensemble"]})
    assert "EnsembleDetector" in hop_deployments
    assert "EnsembleDetector" not in local_deployments and "LSTMDetector" in local_deployments
    for here in (answers(""), local):
        for a_hop, a_here in zip(hop, here):
            for a, b in zip(a_hop["results"], a_here["results"]):
                for name, d in a["detectors"].items():
                    assert b["detectors"][name]["model"] == d["model"] and b["detectors"][name]["path"] == "champion"
                    assert b["detectors"][name]["anomaly_score"] == pytest.approx(d["anomaly_score"], rel=1e-6)


def test_single_rows_skip_the_hop_and_big_batches_take_it(served):
    """With `single_rows_in_ingress: [ensemble]` (the app of `served`) the ensemble's single-row calls are
    scored in the ingress (its models made there on the first one, the hop meanwhile), and a big batch still
    goes to its deployment: with the deployment failing, the single row is served by the champion, the
    batches fall back and open the deployment's circuit, not the one of the single rows scored in the
    ingress."""
    from ray import serve

    client, series = served
    before = client.get("/v1/models").json()["models"]
    assert before["lstm"]["single_rows"] == "deployment"  # not in single_rows_in_ingress
    ensemble_single_rows_in_ingress(client, series, 399)

    def paths(rows: list[dict]) -> set[str]:
        answer = client.post("/v1/score", json={"rows": rows, "detectors": ["ensemble"]})
        assert answer.status_code == 200, answer.text
        return {r["detectors"]["ensemble"]["path"] for r in answer.json()["results"]}

    batch = [row(series, i) for i in range(500, 500 + ServeSettings().big_batch_rows)]
    handle = serve.get_deployment_handle("EnsembleDetector", app_name="raywatch")
    handle.set_fault.remote(True).result()
    try:
        assert paths([row(series, 400)]) == {"champion"}
        for _ in range(5):  # five failed calls in a row open the deployment's circuit
            assert paths(batch) == {"fallback"}
        assert client.get("/v1/models").json()["models"]["ensemble"]["circuit"] == "open"
        assert paths([row(series, 401)]) == {"champion"}  # the single rows' own circuit is closed
    finally:
        handle.set_fault.remote(False).result()
    wait_for(lambda: paths(batch) == {"champion"}, 30, "the deployment's circuit to close after its cooldown")
    assert client.get("/v1/models").json()["models"]["ensemble"]["circuit"] == "closed"


def test_circuit_breaker_rules():
    now = [0.0]
    breaker = CircuitBreaker(cooldown_s=5, clock=lambda: now[0])
    for _ in range(4):
        breaker.record(False)
    assert breaker.allow()  # 4 in a row: still closed
    breaker.record(False)
    assert not breaker.allow() and breaker.state == "open"
    now[0] = 6
    assert breaker.allow() and breaker.state == "half_open" and not breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed"
    rate = CircuitBreaker(clock=lambda: now[0])
    for i in range(40):
        rate.record(i % 8 != 0)  # 12.5% errors, never 5 in a row
    assert rate.state == "open"


def test_rate_limit_token_bucket_and_client_identity():
    from serve.rate_limit import RateLimit, TokenBuckets, client_id

    buckets = TokenBuckets(RateLimit(requests_per_s=2, burst=3))
    assert [buckets.check("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert buckets.check("a", now=0.0) == pytest.approx(0.5)  # then one token every 0.5 s
    assert buckets.check("b", now=0.0) == 0.0  # per client
    assert buckets.check("a", now=0.5) == 0.0 and buckets.check("a", now=0.5) > 0
    assert buckets.take("c", want=5, now=0.0) == (3, 0.0)  # a lease takes what there is, no more
    assert buckets.take("c", want=1, give_back=2, now=0.0) == (1, 0.0)  # unspent tokens come back
    assert not RateLimit().enabled and TokenBuckets(RateLimit()).check("a") == 0.0
    with pytest.raises(ValueError, match="requests_per_s"):
        RateLimit.from_config({"requests_per_s": -1})
    with pytest.raises(ValueError, match="'rps'"):
        RateLimit.from_config({"rps": 5})
    assert RateLimit(1000, 2000).lease_tokens() == 100 and RateLimit(1, 2).lease_tokens() == 1
    spoofed = {"x-forwarded-for": "10.0.0.9, 10.0.0.1", "authorization": "Bearer anything"}
    assert client_id(spoofed, "192.0.2.7", "") == "ip:192.0.2.7"  # what a client says of itself is not believed
    assert client_id(spoofed, "192.0.2.7", "192.0.2.7") == "ip:10.0.0.1"  # the hop a trusted proxy appended


def test_two_replicas_share_one_rate_limit_through_the_actor(ray_cluster):
    """Two replicas' limiters draw on one named actor: together they allow the limit once, not twice,
    and most checks are answered from the local lease (fewer actor calls than requests)."""
    import asyncio
    import time

    from serve.rate_limit import BUDGET_ACTOR, NAMESPACE, RateLimit, SharedRateLimiter

    limit = RateLimit(requests_per_s=40, burst=40)
    replicas = [SharedRateLimiter(limit), SharedRateLimiter(limit)]

    def ceiling(elapsed: float) -> float:  # one limit; per replica it would be twice
        return limit.burst + limit.requests_per_s * elapsed + 1

    async def flood(
        min_seconds: float, per_round: int = 10, max_seconds: float = 30.0
    ) -> tuple[int, int, float, float]:
        # a client's requests come in bursts of `per_round` to each replica: a local answer takes
        # microseconds and an actor call milliseconds (more on a loaded machine), so the checks per actor
        # call depend on the burst, not on how fast this machine is. It goes on until it has asked for
        # more than both replicas' limits together (a loaded machine answers fewer checks a second), and
        # counts the time it asked nothing for longer than a full bucket lasts (refill past the burst is
        # lost then, and the floor below excludes it)
        allowed, checks, stalled, started = 0, 0, 0.0, time.monotonic()
        last = started
        while (elapsed := time.monotonic() - started) < min_seconds or checks <= 2 * ceiling(elapsed):
            if elapsed > max_seconds:
                break
            for replica in replicas:
                for _ in range(per_round):
                    allowed += await replica.check("ip:203.0.113.5") == 0.0
                    checks += 1
                    now = time.monotonic()
                    stalled += max(0.0, now - last - limit.burst / limit.requests_per_s)
                    last = now
            await asyncio.sleep(0.002)
        return allowed, checks, elapsed, stalled  # elapsed: when it stopped asking

    try:
        # the budget actor's start (a worker process: seconds on a loaded machine) is not part of the flood
        for replica in replicas:
            assert asyncio.run(replica.check("ip:192.0.2.1")) == 0.0
        allowed, checks, elapsed, stalled = asyncio.run(flood(1.5))
        assert checks > 2 * ceiling(elapsed), checks  # the flood asked for more than both replicas' limits together
        assert limit.requests_per_s * (elapsed - stalled) <= allowed <= ceiling(elapsed), (allowed, elapsed, stalled)
        assert sum(r.actor_calls for r in replicas) < checks / 2, [r.actor_calls for r in replicas]
        assert asyncio.run(SharedRateLimiter(limit).check("ip:198.51.100.1")) == 0.0  # another client
    finally:
        ray_cluster.kill(ray_cluster.get_actor(BUDGET_ACTOR, namespace=NAMESPACE))
