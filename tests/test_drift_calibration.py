"""Drift tests calibrated on the entity's own history (detect/drift_calibration.py): on a held-out normal
day of a shipped real series the calibrated tests stay quiet where the iid ones fire, a 2-sigma mean
shift on 10% of the metrics still fires them, and the calibration travels with the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from detect.bundle import ModelBundle
from detect.data import load_series
from detect.drift import (
    DriftConfig,
    DriftReference,
    EntityDriftDetectors,
    as_drift_reference,
    calibrate_drift,
    drift_reference,
    entity_drift_config,
    reference_sample,
)
from detect.drift_calibration import DriftCalibration, fit_scale, max_quantile, tail_p_values

DAY = 288  # asd: one day of 5-minute samples, one test window
CONFIG = DriftConfig.for_period(DAY, mmd_permutations=100)


@pytest.fixture(scope="module")
def omi3() -> tuple[np.ndarray, list[str]]:
    """asd/omi-3's train split: its first half calibrates, its second half is held out."""
    import torch

    torch.set_num_threads(1)
    series = load_series("asd", "omi-3")
    return series.train[series.metrics].to_numpy(np.float64), series.metrics


@pytest.fixture(scope="module")
def calibrated(omi3) -> tuple[EntityDriftDetectors, EntityDriftDetectors]:
    """(calibrated, iid) detectors of the same reference, fitted on the first half of train only."""
    values, names = omi3
    period = values[: len(values) // 2]
    ref = reference_sample(period)
    calibration = calibrate_drift(period, None, CONFIG)
    assert calibration is not None and calibration.windows == len(period) // DAY
    return (
        EntityDriftDetectors("m", "asd/omi-3", ref, names, config=CONFIG, calibration=calibration),
        EntityDriftDetectors("m", "asd/omi-3", ref, names, config=CONFIG),
    )


def held_out_day(values: np.ndarray, day: int) -> np.ndarray:
    start = len(values) // 2 + day * DAY
    return values[start : start + DAY].copy()


def test_held_out_normal_day_is_quiet_calibrated_but_not_iid(calibrated, omi3):
    cal, iid = calibrated
    values, _ = omi3
    for day in (0, 5):
        window = held_out_day(values, day)
        ks_iid = iid.test_inputs(window)[0]
        assert ks_iid.is_drift, "the iid KS test flags this normal day (the problem calibration solves)"
        ks, mmd = cal.test_inputs(window)
        assert not ks.is_drift and not mmd.is_drift, (ks, mmd)
        assert ks.extra["calibrated"] and ks.extra["iid_is_drift"]
        assert ks.p_value >= ks.extra["iid_p_value"]  # the calibrated p-value never goes below the iid one


def test_two_sigma_shift_on_a_tenth_of_the_metrics_fires_the_calibrated_tests(calibrated, omi3):
    cal, _ = calibrated
    values, names = omi3
    window = held_out_day(values, 5)
    sigma = cal.reference_.std(axis=0)
    varying = np.flatnonzero(sigma > 1e-12)
    shifted = np.random.default_rng(0).choice(varying, size=math.ceil(0.1 * len(names)), replace=False)
    window[:, shifted] += 2.0 * sigma[shifted]
    ks, mmd = cal.test_inputs(window)
    assert ks.is_drift and set(ks.drifted_features) <= {names[i] for i in shifted}
    assert ks.drifted_features
    assert mmd.is_drift


def test_calibrated_ks_ignores_a_metric_that_goes_flat_at_its_usual_value():
    """asd/omi-1, held-out day 23 of train: metric m03 sits at one value all day, a step of about a
    quarter of a std from its usual mass. KS, a rank test, reports it at distance 0.87; it moved little."""
    series = load_series("asd", "omi-1")
    values = series.train[series.metrics].to_numpy(np.float64)
    cfg = DriftConfig.for_period(DAY, use_mmd=False)
    period = values[: len(values) // 2]
    calibration = calibrate_drift(period, None, cfg)
    cal = EntityDriftDetectors("m", "e", reference_sample(period), series.metrics, config=cfg, calibration=calibration)
    window = values[23 * DAY : 24 * DAY]
    ks = cal.test_inputs(window)[0]
    m03 = series.metrics.index("m03")
    assert ks.extra["iid_is_drift"] and ks.extra["top_distances"]["m03"] > 0.8
    assert cal.shift_sigma(cal.select(window))[m03] < cfg.ks_min_shift_sigma
    assert not ks.is_drift


def test_scores_are_calibrated_too(omi3):
    values, names = omi3
    period = values[: len(values) // 2]
    score = np.abs(period - period.mean(axis=0)).mean(axis=1)
    calibration = calibrate_drift(period, score, DriftConfig.for_period(DAY, use_mmd=False))
    assert calibration.score_scale is not None and calibration.score_scale > 0
    assert calibration.mmd_scale is None


class MeanScorer:
    def score(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows).mean(axis=1)


def test_drift_reference_carries_the_calibration_through_a_bundle_file(tmp_path, omi3):
    values, names = omi3
    cfg = DriftConfig.for_period(DAY, use_mmd=False)
    reference, scores = drift_reference(MeanScorer(), values[: 6 * DAY], config=cfg)
    assert isinstance(reference, DriftReference)
    assert reference.shape == (512, len(names)) and np.asarray(reference).shape == reference.shape
    assert reference.calibration is not None and reference.calibration.windows == 6
    assert len(scores) == 512
    np.savez(tmp_path / "ref.npz", **reference.to_arrays())
    with np.load(tmp_path / "ref.npz", allow_pickle=False) as npz:
        loaded = DriftReference.from_arrays(npz)
    assert loaded.calibration == reference.calibration
    np.testing.assert_array_equal(loaded.rows, reference.rows)
    # too little history (2 whole windows): no calibration, the iid decision applies
    short, _ = drift_reference(MeanScorer(), values[: 2 * DAY + 10], config=cfg)
    assert short.calibration is None
    assert as_drift_reference(np.zeros((60, 2))).calibration is None


def test_a_calibration_for_other_windows_is_refused(omi3):
    values, names = omi3
    calibration = calibrate_drift(values[: 4 * DAY], None, DriftConfig.for_period(DAY, use_mmd=False))
    other = DriftConfig(window=240, thin=6, use_mmd=False)
    assert "calibrated for windows of 1 x 288" in calibration.fits(other.window, other.thin, len(names))
    assert "features" in calibration.fits(288, 1, len(names) - 1)
    with pytest.raises(ValueError, match="does not fit"):
        EntityDriftDetectors("m", "e", values[:512], names, config=other, calibration=calibration)


def test_fitted_scale_is_an_upper_confidence_bound_on_the_null_scale():
    """Draws of a known scale: the fitted scale is at least the true one in about `confidence` of trials."""
    rng = np.random.default_rng(0)
    true_scale, n, confidence = 0.1, 10, 0.9
    fitted = [fit_scale(true_scale * stats.kstwobign.rvs(size=n, random_state=rng), "kolmogorov", confidence)
              for _ in range(2000)]  # fmt: skip
    assert np.mean(np.array(fitted) >= true_scale) == pytest.approx(confidence, abs=0.03)
    assert max_quantile(n, confidence) ** n == pytest.approx(1 - confidence)


def test_tail_p_values_of_a_zero_scale_metric():
    """A metric constant on every training window: no change is normal, any change is drift."""
    p = tail_p_values(np.array([0.0, 0.2, 0.05]), np.array([0.0, 0.0, 0.1]), "kolmogorov")
    assert p[0] == 1.0 and p[1] == 0.0 and 0.0 < p[2] < 1.0


def test_calibration_round_trips_without_optional_scales():
    calibration = DriftCalibration(window=240, thin=6, windows=7, ks_scales=(0.1, 0.0))
    assert DriftCalibration.from_arrays(calibration.to_arrays()) == calibration
    assert DriftCalibration.from_arrays({"reference": np.zeros((2, 2))}) is None
    assert calibration.blind_features(0.005) == []
    assert DriftCalibration(window=240, thin=6, windows=7, ks_scales=(0.9,)).blind_features(0.005) == [0]


def test_a_bundle_saves_and_loads_the_calibration_with_its_reference(tmp_path, omi3):
    from detect.bundle import ModelBundle
    from detect.peers import PCADetector

    values, names = omi3
    det = PCADetector().fit(values[: 6 * DAY])
    reference, scores = drift_reference(det, values[: 6 * DAY], config=DriftConfig.for_period(DAY, use_mmd=False))
    bundle = ModelBundle("pca", {"asd/omi-3": det}, {"asd/omi-3": names}, {"asd/omi-3": reference},
                         reference_scores={"asd/omi-3": scores})  # fmt: skip
    loaded = ModelBundle.load(bundle.save(tmp_path / "bundle")).references["asd/omi-3"]
    assert loaded.calibration == reference.calibration and loaded.calibration.score_scale is not None
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(reference))
    # a bundle whose reference is a plain array (saved before calibration existed) loads uncalibrated
    bundle.references["asd/omi-3"] = np.asarray(reference)
    assert ModelBundle.load(bundle.save(tmp_path / "old")).references["asd/omi-3"].calibration is None


def test_each_entity_is_tested_with_the_windows_its_training_calibrated(mlflow_store, omi3):
    """Training fits each entity's calibration for windows of whole days at its sampling rate and records
    that rate with its drift reference; a monitor with the default config tests it with those windows, so
    it uses the calibration: an ASD (5-minute) machine gets two-day windows of 576 rows, a machine of
    unknown rate one day of 1-minute rows, one whose series said it is sampled every 15 minutes (96 a
    day, as a Prometheus source with that step says) four-day windows of 384 rows. A monitor whose config
    sets the window itself tests with that, uncalibrated, and says so."""
    from detect.sequence import AutoencoderDetector
    from monitoring.monitor import DriftMonitor
    from train.pipeline import register_fitted

    values, names = omi3
    det = AutoencoderDetector(epochs=1, hidden=8).fit(values, names)
    # web-01: 8,640 rows are six days at 1 minute; node/db-02, 90 days at 15 minutes
    entities = {"asd/omi-3": values, "web-01": values, "node/db-02": values}
    register_fitted(
        "autoencoder",
        {e: det for e in entities},
        {e: names for e in entities},
        entities,
        rows_per_day={"node/db-02": 96},
    )

    monitor = DriftMonitor("autoencoder", {}, str(mlflow_store / "state"))
    status = monitor.status()
    assert status["window_rows"] == {"asd/omi-3": 576, "node/db-02": 384, "web-01": 1440}
    assert status["rows_per_day"] == {"asd/omi-3": 288, "node/db-02": 96, "web-01": 1440}
    assert status["calibrated"] == ["asd/omi-3", "node/db-02", "web-01"]
    assert monitor._window_days("node/db-02") == 4.0  # what the retraining budget counts

    explicit = DriftMonitor("autoencoder", {"drift": {"window": 288, "thin": 1}}, str(mlflow_store / "s2")).status()
    assert explicit["window_rows"] == {"asd/omi-3": 288, "node/db-02": 288, "web-01": 288}
    assert explicit["calibrated"] == []


def test_an_entitys_drift_config_follows_its_sampling_rate():
    assert (entity_drift_config("asd/omi-1").window, entity_drift_config("asd/omi-1").thin) == (288, 2)
    assert entity_drift_config("smd/machine-1-6") == DriftConfig() == entity_drift_config("web-01")
    assert entity_drift_config("asd/omi-1", {"mmd_permutations": 7}).mmd_permutations == 7
    assert entity_drift_config("asd/omi-1", {"window": 100, "thin": 3}).span == 300
    with pytest.raises(ValueError, match="unknown DriftConfig field"):
        entity_drift_config("asd/omi-1", {"windows": 2})


def test_a_new_machine_takes_the_sampling_rate_its_dataset_recorded():
    """A new machine served by a fleet model has no reference of its own: the job that fits its own model
    takes the samples per day another machine of its source recorded (`ModelBundle.rows_per_day`)."""
    rows = np.zeros((10, 2))
    references = {"node/a:9100": DriftReference(rows, None, 5760), "old/b": rows, "asd/omi-1": DriftReference(rows)}
    bundle = ModelBundle("autoencoder", {}, {}, references)
    assert bundle.rows_per_day("node/a:9100") == bundle.rows_per_day("node/new:9100") == 5760
    assert bundle.rows_per_day("old/b") is bundle.rows_per_day("old/c") is bundle.rows_per_day("web-01") is None
    assert bundle.rows_per_day("asd/omi-1") is None  # a reference from before the record
