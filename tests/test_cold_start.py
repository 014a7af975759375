"""Cold start on a real local Ray (Serve, the monitor actor, Ray's job API, MLflow): an entity that was
never trained is scored on its first request by the fleet model of its metrics, exactly as the batch
path scores it; once enough of its rows are kept, the monitor submits the retraining job that fits its own
model, and that model takes over when the promotion rule finds it better."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from serving_fixtures import restore_environ, serve_app, wait_for

pytestmark = pytest.mark.slow

PORT = 8126
NEW = "fleet-newcomer-1"  # never trained
QUIET = "fleet-newcomer-2"  # never trained either, and like the machines the fleet model learnt from
OWN_MODEL_ROWS = 3600  # rows of a new entity kept before the job that fits its own model
MONITOR = {
    "config": {
        "drift": {"window": 240, "thin": 6, "mmd_permutations": 100},
        "cooldown_s": 3600,
        "concept_every_s": 3600,
        "own_model_rows": OWN_MODEL_ROWS,
        "retrain_args": ["--epochs", "3", "--cpus-per-worker", "0.25", "--promote-via", "direct"],
    }
}


@pytest.fixture(scope="module")
def cold(ray_cluster, tmp_path_factory):
    """An autoencoder champion holding one entity's own model and a fleet model of the same metrics. The
    fleet model learnt from stationary machines: a new machine with a daily cycle is one it describes
    worse than the machine's own model will, so the takeover is a win the rule can see."""
    import os

    from ray import serve

    from detect.fleet import fleet_key
    from detect.sequence import AutoencoderDetector
    from detect.synthetic import machine_days
    from monitoring import monitor
    from train.pipeline import register_fitted

    workdir = tmp_path_factory.mktemp("cold")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RAYWATCH_STATE_DIR")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["RAYWATCH_STATE_DIR"] = str(workdir / "state")
    own_entity, metrics, own_rows = machine_days(1, seed=1)
    stationary = [np.random.default_rng(s).normal(size=(1440, len(metrics))) for s in (1, 2, 3)]
    fleet = AutoencoderDetector(epochs=2, hidden=32).fit_fleet(stationary, metrics)
    own = AutoencoderDetector(epochs=2, hidden=32).fit(own_rows, metrics)
    key = fleet_key(metrics)
    register_fitted(
        "autoencoder", {own_entity: own, key: fleet}, {own_entity: metrics, key: metrics}, {own_entity: own_rows}
    )
    _, _, new_rows = machine_days(3, seed=11)
    client = serve_app(
        "raywatch-cold", PORT, {"state_dir": str(workdir / "state"), "reload_interval_s": 0.5, "monitor": MONITOR}
    )
    yield client, metrics, new_rows[:OWN_MODEL_ROWS], key
    client.close()
    serve.shutdown()
    monitor.stop_all()
    restore_environ(saved)


def rows_of(entity: str, metrics: list[str], values: np.ndarray, start: int) -> list[dict]:
    return [
        {"entity": entity, "timestamp": float(start + k), "metrics": dict(zip(metrics, v))}
        for k, v in enumerate(values.tolist())
    ]


def autoencoder_scores(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return [r["detectors"]["autoencoder"]["anomaly_score"] for r in response.json()["results"]]


def test_a_new_entity_is_scored_on_its_first_request_through_the_fleet_model(cold):
    from detect.fleet import OWN_QUANTILE, OWN_THRESHOLD_ROWS
    from serve.detectors import load_models

    client, metrics, values, key = cold
    first = client.post("/v1/score", json={"rows": rows_of(NEW, metrics, values[:1], 0)})
    assert first.status_code == 200, first.text
    answer = first.json()["results"][0]
    assert list(answer["detectors"]) == ["autoencoder"]  # the only kind with a fleet model
    assert answer["detectors"]["autoencoder"]["path"] == "champion"
    assert answer["detectors"]["autoencoder"]["model"]["version"] == "1"
    # one row at a time through the baseline's freezing (row 192) and past it, then in batches
    served = autoencoder_scores(first)
    for i in range(1, 300):
        served += autoencoder_scores(
            client.post("/v1/score", json={"rows": rows_of(NEW, metrics, values[i : i + 1], i)})
        )
    for i in range(300, 900, 150):
        served += autoencoder_scores(
            client.post("/v1/score", json={"rows": rows_of(NEW, metrics, values[i : i + 150], i)})
        )
    fleet = load_models("autoencoder")[key]
    np.testing.assert_allclose(served, fleet.runtime.score_series(values[:900]), rtol=1e-5, atol=1e-6)
    # its own threshold, learnt from its first 720 scores, in force from the request after them (rows 750..)
    last = client.post("/v1/score", json={"rows": rows_of(NEW, metrics, values[900:901], 900)})
    own = float(np.quantile(served[:OWN_THRESHOLD_ROWS], OWN_QUANTILE))
    assert own > fleet.threshold  # the fleet model's threshold would flood this machine
    assert last.json()["results"][0]["detectors"]["autoencoder"]["threshold"] == pytest.approx(own, rel=1e-6)

    # a schema no fleet model knows is still refused, naming why
    odd = client.post("/v1/score", json={"rows": [{"entity": "odd-1", "metrics": {"x": 1.0}}]})
    assert odd.status_code == 422 and "no fleet model" in odd.json()["detail"], odd.text
    assert odd.json()["field"] == "rows[0].entity"


def test_a_snapshot_of_many_new_entities_scores_each_as_the_batch_path(cold):
    """/v1/score/fleet with 20 never-trained entities per snapshot (a chunk sent to the detector packed as
    columns, serve/wire.py), 360 snapshots: through the statistics checkpoints to the vectorised path of
    grown entities, whose state the fleet lane then holds (serve/fleet_lane.py). One entity's row goes to
    /v1/score instead in one snapshot, which takes it out of the lane, and the next snapshot takes it back.
    Each entity's served scores are the fleet model's batch scores of its own series."""
    from serve.detectors import load_models

    client, metrics, values, key = cold
    entities = [f"fleet-snapshot-{i}" for i in range(20)]
    series = {e: values[7 * i : 7 * i + 360] for i, e in enumerate(entities)}
    served: dict[str, list[float]] = {e: [] for e in entities}
    lane = []
    for t in range(360):
        alone = entities[0] if t == 330 else None  # a per-entity request for it, this once
        rows = [{"entity": e, "metrics": dict(zip(metrics, series[e][t].tolist()))} for e in entities if e != alone]
        answer = client.post("/v1/score/fleet", json={"timestamp": float(t), "rows": rows})
        assert answer.status_code == 200 and answer.json()["scored"] == len(rows), answer.text[:300]
        for result in answer.json()["results"]:
            served[result["entity"]].append(result["detectors"]["autoencoder"]["anomaly_score"])
        if alone:
            single = client.post("/v1/score", json={"rows": rows_of(alone, metrics, series[alone][t : t + 1], t)})
            served[alone] += autoencoder_scores(single)
        if t in (250, 329, 330, 359):
            lane.append(client.get("/v1/models").json()["fleet_lane"]["machines"])
    assert lane == [0, 20, 19, 20]  # grown at row 274 (its next windows read its last statistics only)
    fleet = load_models("autoencoder")[key]
    for e in entities:
        np.testing.assert_allclose(served[e], fleet.runtime.score_series(series[e]), rtol=1e-5, atol=1e-6)


def test_a_snapshot_wider_than_a_step_is_answered_in_order_with_its_bad_rows_by_index(cold):
    """A 2,500-entity snapshot is scored in steps of `SNAPSHOT_CHUNK` entities (serve/app.py), two under way
    at once, and its answer written a step at a time. The answer is still one list in the snapshot's order,
    each row with its index, the bad rows rejected by theirs wherever they fall, and each entity's scores the
    fleet model's batch scores of its own rows."""
    from serve.app import SNAPSHOT_CHUNK
    from serve.detectors import load_models

    client, metrics, values, key = cold
    n, bad = 2500, {3, SNAPSHOT_CHUNK + 1, 2 * SNAPSHOT_CHUNK + 7}
    assert n > 2 * SNAPSHOT_CHUNK
    entities = [f"fleet-wide-{i}" for i in range(n)]
    served: dict[str, list[float]] = {e: [] for e in entities}
    for t in range(2):
        rows = [
            {"entity": e, "metrics": dict(zip(metrics, values[i % 500 + t].tolist()))} for i, e in enumerate(entities)
        ]
        for i in bad:
            rows[i] = {"entity": entities[i], "metrics": {}}  # no metric: rejected by its index
        answer = client.post("/v1/score/fleet", json={"timestamp": float(t), "rows": rows})
        assert answer.status_code == 200, answer.text[:300]
        body = answer.json()
        assert body["scored"] == n - len(bad)
        assert [r["index"] for r in body["results"]] == [i for i in range(n) if i not in bad]
        assert [r["entity"] for r in body["results"]] == [e for i, e in enumerate(entities) if i not in bad]
        assert sorted(r["index"] for r in body["rejected"]) == sorted(bad)
        assert all(r["field"].startswith(f"rows[{r['index']}].metrics") for r in body["rejected"]), body["rejected"]
        for result in body["results"]:
            served[result["entity"]].append(result["detectors"]["autoencoder"]["anomaly_score"])
    fleet = load_models("autoencoder")[key]
    for i in range(0, n, 97):
        if i not in bad:
            expected = fleet.runtime.score_series(values[i % 500 : i % 500 + 2])
            np.testing.assert_allclose(served[entities[i]], expected, rtol=1e-5, atol=1e-6)


def test_its_own_model_takes_over_after_the_retraining_job(cold):
    """Two new machines reach `own_model_rows` in the same snapshot and share one job, in which each is
    judged alone against the fleet model (train.promotion.decide_each): the one with a daily cycle, which
    its own model describes better, takes over; the other is served by its own model only if it won too."""
    from detect.state import ServingStore
    from train import jobs

    client, metrics, values, _ = cold
    quiet = np.random.default_rng(4).normal(size=(OWN_MODEL_ROWS, len(metrics)))  # like the fleet's machines
    for i in range(901, len(values) - 1, 450):  # the rest of its 2.5 days but one row: the monitor keeps them
        autoencoder_scores(
            client.post("/v1/score", json={"rows": rows_of(NEW, metrics, values[i : min(i + 450, len(values) - 1)], i)})
        )
    for i in range(0, len(quiet) - 1, 450):
        autoencoder_scores(
            client.post("/v1/score", json={"rows": rows_of(QUIET, metrics, quiet[i : min(i + 450, len(quiet) - 1)], i)})
        )
    store = ServingStore()  # the monitor's (RAYWATCH_STATE_DIR): both one row short, the feed drained
    wait_for(
        lambda: all(store.count_observations("autoencoder", e) == OWN_MODEL_ROWS - 1 for e in (NEW, QUIET)),
        60,
        "both new machines' rows but one kept by the monitor",
    )
    last = [{"entity": e, "metrics": dict(zip(metrics, v[-1].tolist()))} for e, v in ((NEW, values), (QUIET, quiet))]
    answer = client.post("/v1/score/fleet", json={"timestamp": float(OWN_MODEL_ROWS - 1), "rows": last})
    assert answer.status_code == 200 and answer.json()["scored"] == 2, answer.text

    def submitted():
        return client.get("/v1/drift", params={"model": "autoencoder"}).json()["retraining"]["autoencoder"]["last_job"]

    job = wait_for(submitted, 60, "the job that fits the new machines' own models")
    assert sorted(job["entities"]) == sorted([NEW, QUIET]) and job["trigger"] == ["cold_start"]
    assert jobs.wait(job["job_id"], timeout_s=300) == "SUCCEEDED", jobs.logs(job["job_id"])[-3000:]
    decision = client.get("/v1/models").json()["models"]["autoencoder"]["retraining"]
    print(f"decision: {decision['reason']}")
    details = decision["details"]
    for entity in (NEW, QUIET):
        assert details["entities"][entity]["evidence"] == "injected" and not details["entities"][entity]["refused"]
        assert details["each"][entity]["promoted"] == (entity in details["graduated"])
    assert decision["promoted"] and NEW in details["graduated"], decision["reason"]  # a significant win alone

    def served_by(entity: str, rows: np.ndarray):
        response = client.post("/v1/score", json={"rows": rows_of(entity, metrics, rows[-1:], len(rows))})
        return response.json()["results"][0]["detectors"]["autoencoder"]["model"]

    wait_for(
        lambda: served_by(NEW, values)["version"] == decision["challenger"], 30, "the new machine on its own model"
    )
    slots = client.get("/v1/models").json()["models"]["autoencoder"]["slots"]["champion"]
    assert NEW in slots["entities"]
    assert (QUIET in slots["entities"]) == (QUIET in details["graduated"])  # not carried in by the other's win
