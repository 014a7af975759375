"""Fleet models (detect/fleet.py, train/fleet.py): one autoencoder per metric schema that scores a new
entity from its first row. In-process parts here; the served cold start and the own model taking over
after a retraining job run on a real Ray, Serve and job API in tests/test_cold_start.py."""

from __future__ import annotations

import numpy as np
import pytest

from detect.fleet import BASELINE_MARGIN, BASELINE_ROWS, WindowNormaliser, entity_baseline, fleet_key


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


def test_windows_are_normalised_by_the_rows_before_them_then_by_the_frozen_baseline():
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 2.0, size=(400, 3))
    values[300:320] += 50.0  # an incident after the baseline: it must not move the statistics
    norm = WindowNormaliser(prior_scale=np.ones(3), prior_rows=16)
    from detect.features import FeatureSpec

    spec = FeatureSpec(metrics=("a", "b", "c"), window=4, lags=(1,), rolling=(4,), diffs=(1,), rates=(1,))
    windows = norm.series_windows(values, spec)
    assert windows.shape == (400, 4, 3)
    assert np.all(windows[0] == 0)  # nothing before the first row: centred on itself
    centre, spread = entity_baseline(values[:BASELINE_ROWS])
    scale = np.sqrt((BASELINE_ROWS * spread**2 + 16) / (BASELINE_ROWS + 16))
    np.testing.assert_allclose(windows[310, -1], (values[310] - centre) / scale, rtol=1e-5)
    assert windows[310, -1].min() > 15  # the incident stands out: the statistics are frozen before it


def test_served_windows_of_a_new_entity_equal_the_batch_path(fleet_model):
    """Young (rows from the first) and grown (the frozen baseline) serving both score as the batch path."""
    from train.kinds import export_graphs, kind_of

    det, _, X = fleet_model
    runtime = kind_of(det).runtime(det, export_graphs(det))
    context = kind_of(det).context_rows(det)
    batch = det.score(X)
    np.testing.assert_allclose(runtime.score_series(X), batch, rtol=1e-4, atol=1e-4)
    baseline = entity_baseline(X[:BASELINE_ROWS])
    for end in (0, 3, 100, BASELINE_ROWS + 5, BASELINE_ROWS + BASELINE_MARGIN, 500, 899):
        n = min(3, end + 1)
        if end - n + 1 < BASELINE_ROWS + BASELINE_MARGIN:
            item = (X[: end + 1], n, None)  # young: every row since the first
        else:
            item = (X[end + 1 - n - context : end + 1], n, baseline)  # grown: the model's context only
        served, _, _ = runtime.score_tails([item])
        np.testing.assert_allclose(served, runtime.score_series(X)[end + 1 - n : end + 1], rtol=1e-6, atol=1e-9)


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
    assert np.mean(scores[BASELINE_ROWS:580] >= det.threshold_) < 0.1
