"""Per-entity models through Serve's model multiplexing, on a real local Ray and MLflow store: a detector
replica loads an entity's model from its own artifacts when a request first needs it, keeps at most
`models_per_replica` of them (least recently used evicted first), and a promotion swaps the models it
holds to the new version."""

from __future__ import annotations

import numpy as np
import pytest
from serving_fixtures import restore_environ, serve_app, wait_for

pytestmark = pytest.mark.slow

PORT = 8127
CAPACITY = 2
REPORT_S = 2.5  # how often the replica reports its held model keys (Serve's own: every 0.1 s)
ENTITIES = ("asd/omi-1", "asd/omi-2", "asd/omi-3")


def register(data_dir, seed: int, promote: bool = True) -> str:
    from detect.data import load_series
    from detect.sequence import AutoencoderDetector
    from train.pipeline import register_fitted

    detectors, metrics, rows = {}, {}, {}
    for name in ENTITIES:
        series = load_series(*name.split("/"), data_dir)
        rows[name] = series.train[series.metrics].to_numpy()[:1200]
        detectors[name] = AutoencoderDetector(epochs=1, hidden=8, seed=seed).fit(rows[name], series.metrics)
        metrics[name] = series.metrics
    return register_fitted("autoencoder", detectors, metrics, rows, promote=promote)


@pytest.fixture(scope="module")
def multiplexed(ray_cluster, data_dir, tmp_path_factory):
    """An autoencoder champion of three entities, served by one detector replica that holds two models."""
    import os

    from ray import serve

    from detect.data import load_series
    from monitoring import monitor

    workdir = tmp_path_factory.mktemp("multiplexed")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RAYWATCH_STATE_DIR")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["RAYWATCH_STATE_DIR"] = str(workdir / "state")
    register(data_dir, seed=1)
    client = serve_app(
        "raywatch-multiplexed",
        PORT,
        {
            "state_dir": str(workdir / "state"),
            "reload_interval_s": 0.5,
            "models_per_replica": CAPACITY,
            "model_ids_report_s": REPORT_S,
            "min_replicas": 1,
            "max_replicas": 1,
            "monitor": {"enabled": False},
        },
    )
    series = {name: load_series(*name.split("/"), data_dir) for name in ENTITIES}
    yield client, series
    client.close()
    serve.shutdown()
    monitor.stop_all()
    restore_environ(saved)


def score(client, series, start: int, n: int = 40) -> dict:
    rows = [
        {"entity": series.name, "timestamp": float(k), "metrics": dict(zip(series.metrics, values))}
        for k, values in enumerate(series.test[series.metrics].to_numpy()[start : start + n].tolist(), start)
    ]
    response = client.post("/v1/score", json={"rows": rows, "detectors": ["autoencoder"]})
    assert response.status_code == 200, response.text
    return response.json()


def held(client) -> tuple[list[str], int]:
    models = client.get("/v1/models").json()["models"]["autoencoder"]
    return models["models_held"], models["model_capacity"]


def served_scores(answer: dict) -> tuple[str, list[float]]:
    detectors = [r["detectors"]["autoencoder"] for r in answer["results"]]
    assert {d["path"] for d in detectors} == {"champion"}, detectors[0]
    return detectors[0]["model"]["version"], [d["anomaly_score"] for d in detectors]


def test_a_replica_holds_at_most_its_capacity_and_scores_every_entity_as_in_process(multiplexed):
    from serve.detectors import load_models

    client, series = multiplexed
    in_process = load_models("autoencoder")
    for name in ENTITIES:  # three keys through a replica that holds two
        version, scores = served_scores(score(client, series[name], 0))
        X = series[name].test[series[name].metrics].to_numpy()[:40]
        assert version == "1"
        np.testing.assert_allclose(scores, in_process[name].runtime.score_series(X), rtol=1e-5, atol=1e-6)
        keys, capacity = held(client)
        assert capacity == CAPACITY and len(keys) <= CAPACITY and name in keys, keys
    assert sorted(held(client)[0]) == sorted(ENTITIES[1:])  # the least recently used one was evicted
    # the LRU reports its keys at the configured interval, not Serve's 0.1 s (a gauge per held model each time)
    assert client.get("/v1/models").json()["models"]["autoencoder"]["model_ids_report_s"] == REPORT_S
    score(client, series[ENTITIES[0]], 40)  # loaded again, evicting the next least recently used
    assert sorted(held(client)[0]) == sorted([ENTITIES[0], ENTITIES[2]])


def test_a_promotion_swaps_the_held_models_to_the_new_version(multiplexed, data_dir):
    client, series = multiplexed
    keys = held(client)[0]
    version = register(data_dir, seed=2)
    wait_for(
        lambda: client.get("/v1/models").json()["models"]["autoencoder"]["slots"]["champion"]["version"] == version,
        30,
        f"the replica to serve version {version}",
    )
    for name in keys:
        answered, _ = served_scores(score(client, series[name], 80))
        assert answered == version
    assert sorted(held(client)[0]) == sorted(keys)  # the same keys, their models of the new version
