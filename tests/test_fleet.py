"""Fleet models (detect/fleet.py, train/fleet.py): one autoencoder per metric schema that scores a new
entity from its first row. In-process parts here; the served cold start and the own model taking over
after a retraining job run on a real Ray, Serve and job API in tests/test_cold_start.py."""

from __future__ import annotations

import numpy as np
import pytest

from detect.fleet import CHECKPOINTS, EntityStats, WindowNormaliser, fleet_key, robust_stats


@pytest.fixture(scope="module")
def fleet_model():
    from detect.sequence import AutoencoderDetector
    from detect.synthetic import machine_days

    series = []
    for seed in (1, 2, 3):
        _, metrics, values = machine_days(1, seed=seed)
        series.append(values)
    det = AutoencoderDetector(epochs=2, hidden=32).fit_fleet(series, metrics)
    _, _, unseen = machine_days(1, seed=11)
    return det, metrics, unseen[:900]


def test_fleet_key_names_a_schema_whatever_the_order():
    assert fleet_key(["cpu", "mem"]) == fleet_key(["mem", "cpu"]) != fleet_key(["cpu", "mem", "disk"])
    assert fleet_key(["cpu"]).startswith("fleet:1m-")


def test_windows_are_normalised_by_statistics_of_rows_before_them():
    from detect.features import FeatureSpec

    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 2.0, size=(400, 3))
    values[300:320] += 50.0  # an incident after the last checkpoint: it must not move the statistics
    norm = WindowNormaliser(prior_scale=np.ones(3), prior_rows=16)
    spec = FeatureSpec(metrics=("a", "b", "c"), window=4, lags=(1,), rolling=(4,), diffs=(1,), rates=(1,))
    windows = norm.series_windows(values, spec)
    assert windows.shape == (400, 4, 3)
    assert np.all(windows[0] == 0)  # nothing before the first row: centred on itself
    stats = EntityStats.of_series(values)
    k = int(np.searchsorted(stats.rows, 307, side="right")) - 1  # the window of row 310 starts at row 307
    assert stats.rows[k] == CHECKPOINTS[-1] == 192
    centre, spread = robust_stats(values[:192:3])  # every third of the first 192 rows
    scale = np.sqrt((192 * spread**2 + 16) / (192 + 16))
    np.testing.assert_allclose(windows[310, -1], (values[310] - centre) / scale, rtol=1e-5)
    assert windows[310, -1].min() > 15  # the incident stands out: its rows are after the statistics
    # the window of row 13 starts at row 10: it uses the checkpoint of 4 rows, rows before it only
    centre, spread = robust_stats(values[:4])
    scale = np.sqrt((4 * spread**2 + 16) / (4 + 16))
    np.testing.assert_allclose(windows[13, 0], (values[10] - centre) / scale, rtol=1e-5)


def test_served_windows_of_a_new_entity_equal_the_batch_path(fleet_model):
    """Whatever the entity's age, a request with only the model's context rows, the entity's statistics and
    its place scores as the batch path."""
    from train.kinds import export_graphs, kind_of

    det, _, X = fleet_model
    runtime = kind_of(det).runtime(det, export_graphs(det))
    context = det.context_rows()
    batch = runtime.score_series(X)
    np.testing.assert_allclose(batch, det.score(X), rtol=1e-4, atol=1e-4)
    for end in (0, 3, 4, 17, 70, 80, 500, 899):
        n = min(3, end + 1)
        first = max(0, end + 1 - n - context)
        stats = EntityStats.of_series(X[: end + 1]).for_windows_from(first - 63)  # what the ingress sends
        served, _, _ = runtime.score_tails([(X[first : end + 1], n, (stats, first))])
        np.testing.assert_allclose(served, batch[end + 1 - n : end + 1], rtol=1e-6, atol=1e-9)


def test_a_snapshot_of_many_grown_entities_scores_as_each_alone(fleet_model):
    """The vectorised path for many grown entities in one call (a snapshot) gives each entity's scores as
    scoring it alone, and as the batch path; young entities mixed in take the per-item path."""
    from detect.runtime import GROWN_AT_ONCE
    from train.kinds import export_graphs, kind_of

    det, _, X = fleet_model
    runtime = kind_of(det).runtime(det, export_graphs(det))
    context = det.context_rows()
    entities = [X + shift for shift in np.linspace(-3, 3, GROWN_AT_ONCE + 4)]
    items, expected = [], []
    for k, series in enumerate(entities):
        end = 300 + 7 * k if k % 6 else 40  # every sixth one young (under 192 rows)
        first = max(0, end - context)
        stats = EntityStats.of_series(series[: end + 1]).for_windows_from(first - 63)
        items.append((series[first : end + 1], 1, (stats, first)))
        expected.append(runtime.score_series(series[: end + 1])[-1])
    assert len(runtime._grown(items)) >= GROWN_AT_ONCE
    together, _, _ = runtime.score_tails(items)
    alone = [runtime.score_tails([item])[0][0] for item in items]
    np.testing.assert_allclose(together, alone, rtol=1e-6)
    np.testing.assert_allclose(together, expected, rtol=1e-6)


def test_a_lane_call_answered_as_columns_equals_the_per_item_answer(fleet_model):
    """A detector replica answers a fleet lane's call (many grown entities, one new row each) as columns
    (`EntityModel.grown_columns`), with no dict per entity: the same answer, item by item and field by
    field, as scoring the items one dict each and packing them (`serve.wire.pack`)."""
    from detect.runtime import GROWN_AT_ONCE
    from serve.detectors import EntityModel
    from serve.wire import pack, packed, unpack
    from train.kinds import export_graphs, kind_of

    det, metrics, X = fleet_model
    model = EntityModel(list(metrics), kind_of(det).runtime(det, export_graphs(det)), det, 2.5, det.context_rows())
    context, count = det.context_rows(), GROWN_AT_ONCE + 5
    items = []
    for k, series in enumerate(X + shift for shift in np.linspace(-3, 3, count)):
        end = 300 + 7 * k
        first = end - context
        items.append(
            (series[first : end + 1], 1, (EntityStats.of_series(series[: end + 1]).for_windows_from(first - 63), first))
        )
    rows = np.stack([item[0] for item in items])
    stats_rows = np.stack([item[2][0].rows for item in items])
    stats_values = np.stack([item[2][0].values for item in items])
    assert model.takes_grown_columns(rows, stats_rows)
    assert not model.takes_grown_columns(rows[: GROWN_AT_ONCE - 1], stats_rows[: GROWN_AT_ONCE - 1])  # too few
    assert not model.takes_grown_columns(rows[:, 1:], stats_rows)  # not exactly the context and a new row

    as_columns = unpack(packed(count, model.grown_columns(rows, stats_rows, stats_values)))
    per_item = unpack(pack(model.score_arrays(items)))
    assert len(as_columns) == len(per_item) == count
    for got, expected in zip(as_columns, per_item):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
                np.testing.assert_array_equal(got[key], value, err_msg=key)
            else:
                assert got[key] == value, key


def test_a_fleet_model_scores_deviations_in_float32_as_the_rows_themselves(fleet_model):
    """What a fleet lane's call carries for a fleet model (`detect.fleet.as_deviations`): each machine's rows
    as float32 deviations from its centre, with a centre of 0. The model scores them as the float64 rows,
    by either of the replica's paths, even for a metric at a level float32 cannot hold to its moves (5e11
    bytes moving by tens), where float32 rows themselves would not do."""
    from detect.fleet import as_deviations
    from detect.runtime import GROWN_AT_ONCE
    from serve.detectors import EntityModel
    from train.kinds import export_graphs, kind_of

    det, metrics, X = fleet_model
    model = EntityModel(list(metrics), kind_of(det).runtime(det, export_graphs(det)), det, 2.5, det.context_rows())
    context, count = det.context_rows(), GROWN_AT_ONCE + 5
    level = np.zeros(X.shape[1])
    level[0] = 5e11  # the first metric's level: float32 holds it to about 3e4, its moves are far smaller
    rows, stats = [], []
    for k, series in enumerate(X * (1 + 0.2 * k / count) + level for k in range(count)):
        end = 300 + 7 * k
        rows.append(series[end - context : end + 1])
        stats.append(EntityStats.of_series(series[: end + 1]).for_windows_from(end - context - 63))
    rows = np.stack(rows)
    stats_rows, stats_values = np.stack([s.rows for s in stats]), np.stack([s.values for s in stats])
    assert stats_rows.shape == (count, 1)

    expected = model.grown_columns(rows, stats_rows, stats_values)
    deviations, centred = as_deviations(rows, stats_values)
    assert deviations.dtype == np.float32 and deviations.nbytes * 2 == rows.nbytes
    assert np.all(centred[:, :, 0] == 0) and np.array_equal(centred[:, :, 1], stats_values[:, :, 1])
    got = model.grown_columns(deviations, stats_rows, centred)
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-5)
    np.testing.assert_array_equal(got["top"], expected["top"])
    np.testing.assert_allclose(got["top_values"], expected["top_values"], rtol=1e-5)
    items = [
        (deviations[k].astype(np.float64), 1, (EntityStats(stats_rows[k], centred[k]), 300 + 7 * k - context))
        for k in range(count)
    ]  # the per-item path, which a call with too few items takes, reads them alike
    per_item = np.array([answer["scores"][0] for answer in model.score_arrays(items)])
    np.testing.assert_allclose(per_item, expected["scores"][:, 0], rtol=1e-5)

    levels = model.grown_columns(rows.astype(np.float32).astype(np.float64), stats_rows, stats_values)
    assert not np.allclose(levels["scores"], expected["scores"], rtol=1e-2)  # why deviations, not float32 rows
    with pytest.raises(ValueError, match="one checkpoint"):
        as_deviations(rows, np.concatenate([stats_values, stats_values], axis=1))


def test_a_new_entity_gets_its_own_threshold_from_its_first_scores_not_from_labels():
    from detect.fleet import OWN_QUANTILE, OWN_THRESHOLD_ROWS, OwnThreshold, own_thresholds

    scores = np.random.default_rng(2).gamma(2.0, 5.0, size=2000)  # a machine the fleet threshold floods
    fleet_threshold = 3.0
    batch = own_thresholds(scores, fleet_threshold)
    learnt = float(np.quantile(scores[:OWN_THRESHOLD_ROWS], OWN_QUANTILE))
    assert np.all(batch[:OWN_THRESHOLD_ROWS] == fleet_threshold) and np.all(batch[OWN_THRESHOLD_ROWS:] == learnt)
    assert np.mean(scores >= fleet_threshold) > 0.8 and np.mean(scores[OWN_THRESHOLD_ROWS:] >= learnt) < 0.05
    served = OwnThreshold()  # streamed one row a request, as a scrape sends them: the batch path's thresholds
    streamed, kept = [], []
    for i in range(2000):
        streamed.append(served.observe(scores[i : i + 1], fleet_threshold))
        kept.append(served.kept)
    np.testing.assert_array_equal(streamed, batch)
    # what a young entity costs the ingress: its few largest scores, not all of its first 720
    assert max(kept) == OwnThreshold.TAIL_ROWS <= 10 and kept[OWN_THRESHOLD_ROWS - 1 :] == [0] * (
        2001 - OWN_THRESHOLD_ROWS
    )
    bulk = OwnThreshold()  # a request's rows share the threshold in force when it came
    assert bulk.observe(scores[:1000], fleet_threshold) == fleet_threshold
    assert bulk.observe(scores[1000:1001], fleet_threshold) == learnt
    quiet = OwnThreshold()  # never below the fleet model's own
    for _ in range(8):
        quiet.observe(np.zeros(100), fleet_threshold)
    assert quiet.observe(np.zeros(1), fleet_threshold) == fleet_threshold


def test_the_ingress_sampler_reaches_the_batch_statistics_in_any_request_sizes():
    """What `serve.history.ColdStarts` keeps per young entity (a few dozen sample rows per checkpoint) gives
    the statistics the batch path computes from the whole series, however the rows arrive."""
    from detect.fleet import SAMPLE_ROWS, Sampler

    values = np.random.default_rng(1).normal(size=(500, 3)).cumsum(axis=0)
    expected = EntityStats.of_series(values)
    assert expected.rows.tolist() == list(CHECKPOINTS)
    for sizes in ([1] * 500, [3, 50, 7, 440], [500]):
        sampler, at = Sampler(3), 0
        for size in sizes:
            stats = sampler.add(values[at : at + size])
            at += size
        np.testing.assert_array_equal(stats.rows, expected.rows)
        np.testing.assert_allclose(stats.values, expected.values)
        assert sampler.held_bytes == 0  # grown: it keeps no rows
    young = Sampler(3)
    young.add(values[:150])  # a young entity: at most SAMPLE_ROWS rows for each checkpoint, in one array
    assert 0 < young.held_bytes <= len(CHECKPOINTS) * SAMPLE_ROWS * 3 * 8
    assert expected.for_windows_from(400).rows.tolist() == [CHECKPOINTS[-1]]  # a grown entity's request carries one
    assert expected.for_windows_from(-5).rows.tolist() == list(CHECKPOINTS)


def test_a_fleet_model_survives_its_bundle_and_is_refused_a_drift_reference(fleet_model, tmp_path):
    from detect.bundle import ModelBundle
    from train.assemble import fitted_bundle

    det, metrics, X = fleet_model
    key = fleet_key(metrics)
    bundle = fitted_bundle("autoencoder", {key: det}, {key: metrics}, {})
    assert key not in bundle.references  # drift monitors watch entities with a model of their own
    loaded = ModelBundle.load(bundle.save(tmp_path / "b")).detectors[key]
    assert loaded.normaliser_ is not None
    np.testing.assert_allclose(loaded.score(X), det.score(X), rtol=1e-6)


def test_a_new_entity_with_an_incident_is_flagged_by_the_fleet_model(fleet_model):
    """Cold start that is worth serving: an injected incident on a machine the fleet never saw scores above
    the fleet model's threshold, and its normal rows mostly do not."""
    det, metrics, X = fleet_model
    hit = X.copy()
    hit[600:640, metrics.index("cpu")] += 8 * X[:, metrics.index("cpu")].std()
    scores = det.score(hit)
    assert np.mean(scores[605:640] >= det.threshold_) > 0.8
    assert np.mean(scores[CHECKPOINTS[-1] : 580] >= det.threshold_) < 0.1


@pytest.mark.slow
def test_train_fleet_registers_a_fleet_model_per_schema_beside_the_champions_entities(
    data_dir, ray_cluster, mlflow_store
):
    """`raywatch train --fleet` on Ray Train: one fleet model per metric schema (ASD's 19 metrics and SMD's 38:
    two Ray Train runs in one job), in a version that keeps the champion's own models and becomes champion."""
    from detect.data import load_series
    from detect.sequence import AutoencoderDetector
    from train import registry
    from train.fleet import train_fleet
    from train.pipeline import register_fitted

    omi1 = load_series("asd", "omi-1", data_dir)
    own = AutoencoderDetector(epochs=1, hidden=16).fit(omi1.train[omi1.metrics].to_numpy()[:2000], omi1.metrics)
    register_fitted(
        "autoencoder",
        {omi1.name: own},
        {omi1.name: omi1.metrics},
        {omi1.name: omi1.train[omi1.metrics].to_numpy()[:2000]},
    )
    result = train_fleet(data_dir, ["asd/omi-2", "asd/omi-3", "smd/machine-1-6"], {"epochs": 1, "hidden": 16})
    key, smd = fleet_key(omi1.metrics), fleet_key(load_series("smd", "machine-1-6", data_dir).metrics)
    assert set(result["schemas"]) == {key, smd} and result["version"] == "2" and result["based_on"] == "1"
    assert set(result["schemas"][key]["cold_start"]) == {"asd/omi-2", "asd/omi-3"}
    assert registry.alias_version("autoencoder", registry.CHAMPION) == "2"
    bundle, _ = registry.load_bundle("autoencoder", "2")
    assert set(bundle.detectors) == {omi1.name, key, smd}
    assert bundle.detectors[smd].n_metrics_ == 38 and bundle.detectors[key].normaliser_ is not None
    assert key not in bundle.references and omi1.name in bundle.references
    assert result["schemas"][key]["windows"] > 0 and result["schemas"][key]["fit_seconds"] > 0


def _graduating_monitor(fleet_model, tmp_path, monkeypatch, **config):
    """A drift monitor in process over a champion that holds only a fleet model, with the job API out of
    reach (nothing listens at its address), and a function making a snapshot of new machines' served rows."""
    from monitoring.monitor import DriftMonitor
    from train.pipeline import register_fitted

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    det, metrics, _ = fleet_model
    key = fleet_key(metrics)
    register_fitted("autoencoder", {key: det}, {key: metrics}, {})
    settings = {
        "job_address": "http://127.0.0.1:9",
        "cooldown_s": 0,
        "own_model_rows": 5,
        "keep_new_observations": 20,
        "keep_observations": 1000,  # for entities with a model of their own: none here
    }
    monitor = DriftMonitor("autoencoder", {**settings, **config}, str(tmp_path / "state"))

    def snapshot(machines: list[str], t: int) -> list[dict]:
        row = {"values": [float(t)] * len(metrics), "score": 0.1, "is_anomaly": False, "path": "champion"}
        return [{**row, "entity": e, "timestamp": float(t), "model_key": key} for e in machines]

    return monitor, snapshot


def test_a_fleet_of_new_machines_asks_for_its_own_models_once_per_retry_not_once_per_machine(
    fleet_model, tmp_path, monkeypatch, caplog
):
    """New machines reach `own_model_rows` together, and the trigger runs one job at a time. Each ask is a
    job-API call and a state write: once the trigger turns one down, no machine asks again within
    GRADUATION_RETRY_S (before, every machine asked in every batch: 200 took a monitor 0.4 s a batch), and
    each machine's kept rows stay bounded."""
    import logging
    import time

    from monitoring.monitor import GRADUATION_RETRY_S

    monitor, snapshot = _graduating_monitor(fleet_model, tmp_path, monkeypatch)
    machines = [f"fleet-new-{i}" for i in range(50)]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="raywatch.monitor"):
        for t in range(40):
            assert monitor.observe(snapshot(machines, t))["accepted"] == len(machines)
    retries = (time.monotonic() - started) // GRADUATION_RETRY_S  # 0 unless the machine is very slow
    asked = [r for r in caplog.records if r.getMessage() == "retraining job submission failed"]
    assert 1 <= len(asked) <= 1 + retries, f"{len(asked)} asks for the job API in 40 batches of 50 machines"
    assert asked[0].entities == len(machines)  # one job for every machine due (a job each before)
    assert monitor.trigger.last_skip()["reason"].startswith("submission failed")
    kept = monitor.store.observed_entities("autoencoder")
    assert set(kept) == set(machines)
    assert max(kept.values()) <= 20 + 2, kept  # keep_new_observations, and at most a tenth of it more between prunes


def test_a_graduation_job_takes_at_most_graduates_per_job_machines(fleet_model, tmp_path, monkeypatch, caplog):
    import logging

    monitor, snapshot = _graduating_monitor(fleet_model, tmp_path, monkeypatch, graduates_per_job=20)
    machines = [f"fleet-new-{i}" for i in range(50)]
    with caplog.at_level(logging.ERROR, logger="raywatch.monitor"):
        for t in range(6):
            monitor.observe(snapshot(machines, t))
    asked = [r for r in caplog.records if r.getMessage() == "retraining job submission failed"]
    assert [r.entities for r in asked] == [20]


def test_a_new_machines_kept_rows_stay_bounded_with_retraining_off(fleet_model, tmp_path, monkeypatch):
    monitor, snapshot = _graduating_monitor(fleet_model, tmp_path, monkeypatch, retrain=False)
    for t in range(40):
        monitor.observe(snapshot(["fleet-new-0"], t))
    kept = monitor.store.observed_entities("autoencoder")["fleet-new-0"]
    assert 20 <= kept <= 20 + 2, kept  # before: every row of a fleet-scored machine, kept for good
    assert monitor.trigger.last_skip() is None  # nothing was asked of the trigger


def test_an_entity_with_its_own_model_keeps_keep_observations_rows_once_its_windows_are_tested(tmp_path, monkeypatch):
    """The monitor's other prune, beside the new machines' (`_graduate`): rows consumed by drift tests are
    pruned to `keep_observations`, at the end of the batch with the others due (one commit)."""
    from detect.sequence import AutoencoderDetector
    from detect.synthetic import machine_days
    from monitoring.monitor import DriftMonitor
    from train.pipeline import register_fitted

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    entity, metrics, values = machine_days(1, seed=1)
    register_fitted(
        "autoencoder",
        {entity: AutoencoderDetector(epochs=1, hidden=8).fit(values, metrics)},
        {entity: metrics},
        {entity: values},
    )
    config = {"retrain": False, "keep_observations": 100, "drift": {"window": 50, "thin": 2, "mmd_permutations": 20}}
    monitor = DriftMonitor("autoencoder", config, str(tmp_path / "state"))
    row = {"score": 0.1, "is_anomaly": False, "path": "champion"}
    batch = [{**row, "entity": entity, "timestamp": float(t), "values": values[t].tolist()} for t in range(300)]
    assert monitor.observe(batch)["events"], "full windows tested"
    assert monitor.store.observed_entities("autoencoder") == {entity: 100}


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"graduates_per_job": 0}, "graduates_per_job"),
        ({"keep_new_observations": 1000}, "keep_new_observations"),  # fewer than own_model_rows (2,000)
    ],
)
def test_bad_graduation_settings_are_refused_by_name(settings, named):
    from monitoring.monitor import MonitorConfig

    with pytest.raises(ValueError, match=named):
        MonitorConfig.from_dict(settings)
