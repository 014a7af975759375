"""Drift detection: real alibi-detect KS/MMD on synthetic telemetry, prediction and concept drift,
and the SQLite event store surviving a restart."""

from __future__ import annotations

import numpy as np
import pytest

from detect.drift import (
    DriftConfig,
    DriftResult,
    EntityDriftDetectors,
    reference_sample,
)
from detect.synthetic import generate_fleet
from monitoring.events import DriftEventStore

DAY = 1440  # rows of 1-minute samples
METRICS = ["cpu", "memory", "network_in", "latency_p99", "error_rate", "request_rate"]
CONFIG = DriftConfig(window=240, thin=6, mmd_permutations=100, mmd_max_reference=200)


@pytest.fixture(scope="module")
def telemetry() -> np.ndarray:
    """Four days of one machine, no incidents: days 0-1 are the reference period, days 2-3 held out."""
    import torch

    torch.set_num_threads(1)
    fleet = generate_fleet(n_machines=1, n_steps=4 * DAY, metrics=METRICS, incidents=False, seed=3)
    return fleet.frame[METRICS].to_numpy(np.float64)


@pytest.fixture(scope="module")
def detectors(telemetry) -> EntityDriftDetectors:
    reference = reference_sample(telemetry[: 2 * DAY], 512)
    return EntityDriftDetectors("autoencoder", "machine-00", reference, METRICS, config=CONFIG)


def test_reference_sample_spans_the_whole_series(telemetry):
    ref = reference_sample(telemetry[: 2 * DAY], 512)
    assert ref.shape == (512, len(METRICS))
    np.testing.assert_array_equal(ref[0], telemetry[0])
    np.testing.assert_array_equal(ref[-1], telemetry[2 * DAY - 1])


def test_no_drift_window_from_same_process_is_not_flagged(detectors, telemetry):
    for day in (2, 3):
        results = detectors.test_inputs(telemetry[day * DAY : (day + 1) * DAY], now=123.0)
        assert [r.detector for r in results] == ["ks", "mmd"]
        for r in results:
            assert not r.is_drift, r
            assert r.drifted_features == []
            assert r.window_rows == CONFIG.window
            assert r.time == 123.0 and r.model == "autoencoder" and r.entity == "machine-00"


def test_clear_shift_is_detected_and_names_the_shifted_features(detectors, telemetry):
    window = telemetry[2 * DAY : 3 * DAY].copy()
    sigma = reference_sample(telemetry[: 2 * DAY], 512).std(axis=0)
    shifted = [METRICS.index("cpu"), METRICS.index("latency_p99")]
    window[:, shifted] += 1.5 * sigma[shifted]
    ks, mmd = detectors.test_inputs(window)
    assert ks.is_drift and ks.detector == "ks"
    assert sorted(ks.drifted_features) == ["cpu", "latency_p99"]
    assert ks.p_value < ks.threshold == pytest.approx(CONFIG.p_value / len(METRICS))
    assert mmd.is_drift and mmd.detector == "mmd"
    assert {"cpu", "latency_p99"} <= set(mmd.drifted_features)
    assert mmd.p_value < CONFIG.p_value and mmd.statistic > mmd.extra["distance_threshold"]


def test_fdr_correction_names_the_shifted_feature(telemetry):
    reference = reference_sample(telemetry[: 2 * DAY], 512)
    cfg = DriftConfig(window=240, thin=6, correction="fdr", use_mmd=False)
    det = EntityDriftDetectors("m", "e", reference, METRICS, config=cfg)
    window = telemetry[2 * DAY : 3 * DAY].copy()
    assert not det.test_inputs(window)[0].is_drift
    window[:, 1] += 2 * reference[:, 1].std()
    (ks,) = det.test_inputs(window)
    assert ks.is_drift and ks.drifted_features == ["memory"]


def test_prediction_drift_detects_a_shifted_score_distribution():
    rng = np.random.default_rng(0)
    cfg = DriftConfig(window=200, thin=1, use_mmd=False)
    reference = rng.normal(size=(300, 2))
    det = EntityDriftDetectors(
        "lstm", "e", reference, ["a", "b"], reference_scores=rng.gamma(2.0, 1.0, 500), config=cfg
    )
    same = det.test_scores(rng.gamma(2.0, 1.0, 200))
    moved = det.test_scores(rng.gamma(2.0, 1.0, 200) + 1.0)
    assert same.detector == moved.detector == "prediction_ks"
    assert not same.is_drift and moved.is_drift
    assert 0.0 <= same.extra["js_divergence"] < moved.extra["js_divergence"] <= 1.0
    no_scores = EntityDriftDetectors("lstm", "e", reference, ["a", "b"], config=cfg)
    assert no_scores.test_scores(rng.gamma(2.0, 1.0, 200)) is None


def _labelled(tp: int, fp: int, fn: int, tn: int) -> tuple[np.ndarray, np.ndarray]:
    predicted = np.r_[np.ones(tp), np.ones(fp), np.zeros(fn), np.zeros(tn)]
    labels = np.r_[np.ones(tp), np.zeros(fp), np.ones(fn), np.zeros(tn)]
    return predicted, labels


def test_concept_drift_fires_only_beyond_the_margin():
    det = EntityDriftDetectors("ensemble", "e", np.random.default_rng(1).normal(size=(60, 2)), ["a", "b"],
                               config=DriftConfig(window=50, use_mmd=False, min_labels=50))  # fmt: skip
    predicted, labels = _labelled(tp=16, fp=4, fn=4, tn=76)  # precision 0.8, recall 0.8
    big = det.test_concept(predicted, labels, baseline_precision=0.90, baseline_recall=0.80)
    assert big.is_drift and big.detector == "concept" and big.p_value is None
    assert big.extra["dropped"] == ["precision"]
    assert big.statistic == pytest.approx(0.10) and big.threshold == 0.05
    assert big.extra["precision"] == pytest.approx(0.8) and big.extra["recall"] == pytest.approx(0.8)
    small = det.test_concept(predicted, labels, baseline_precision=0.83, baseline_recall=0.82)
    assert not small.is_drift and small.statistic == pytest.approx(0.03)
    recall_drop = det.test_concept(*_labelled(tp=12, fp=0, fn=8, tn=80), baseline_precision=0.8, baseline_recall=0.8)
    assert recall_drop.is_drift and recall_drop.extra["dropped"] == ["recall"]
    assert det.test_concept(*_labelled(tp=5, fp=1, fn=1, tn=10), 0.9, 0.9) is None  # fewer than min_labels


def test_concept_baseline_from_first_labelled_window():
    det = EntityDriftDetectors("ensemble", "e", np.zeros((60, 1)), ["a"], config=DriftConfig(window=50, use_mmd=False))
    first = det.test_concept(*_labelled(tp=18, fp=2, fn=2, tn=78))  # 0.9 / 0.9 becomes the baseline
    assert not first.is_drift and first.extra["baseline_set"]
    assert det.concept_baseline == pytest.approx((0.9, 0.9))
    later = det.test_concept(*_labelled(tp=14, fp=6, fn=6, tn=74))
    assert later.is_drift and later.extra["baseline_precision"] == pytest.approx(0.9)


def _result(model: str, entity: str, detector: str, drift: bool, t: float) -> DriftResult:
    return DriftResult(
        time=t,
        model=model,
        entity=entity,
        detector=detector,
        is_drift=drift,
        statistic=0.3,
        p_value=0.001 if drift else 0.4,
        threshold=0.005,
        drifted_features=["cpu"] if drift else [],
        extra={"js_divergence": np.float32(0.12)},
        window_rows=240,
    )


def test_event_store_survives_restart_and_filters(tmp_path):
    path = tmp_path / "drift.db"
    store = DriftEventStore(path)
    first = store.add(_result("autoencoder", "smd/machine-1-6", "ks", True, 1.0))
    ids = store.add_many(
        [
            _result("autoencoder", "smd/machine-1-6", "mmd", False, 2.0),
            _result("autoencoder", "asd/omi-1", "prediction_ks", True, 3.0),
            _result("lstm", "asd/omi-1", "concept", False, 4.0),
        ]
    )
    assert ids == [first + 1, first + 2, first + 3]
    store.set_state("autoencoder/concept_baseline", {"precision": 0.9, "recall": 0.8})
    del store

    reopened = DriftEventStore(path)  # as after an actor restart
    events = reopened.events()
    assert [e["id"] for e in events] == [ids[2], ids[1], ids[0], first]  # newest first
    ks = events[-1]
    assert ks["detector"] == "ks" and ks["is_drift"] is True and ks["drifted_features"] == ["cpu"]
    assert ks["extra"]["js_divergence"] == pytest.approx(0.12) and ks["window_rows"] == 240
    assert {e["model"] for e in reopened.events(model="lstm")} == {"lstm"}
    assert [e["id"] for e in reopened.events(model="autoencoder", entity="asd/omi-1")] == [ids[1]]
    assert [e["id"] for e in reopened.events(only_drift=True)] == [ids[1], first]
    assert [e["id"] for e in reopened.events(since_id=ids[0])] == [ids[2], ids[1]]
    assert len(reopened.events(limit=2)) == 2
    assert reopened.count() == 4 and reopened.count(model="autoencoder") == 3
    assert reopened.count(model="autoencoder", only_drift=True) == 2
    assert reopened.get_state("autoencoder/concept_baseline") == {"precision": 0.9, "recall": 0.8}
    assert reopened.get_state("missing", default=[]) == []
    reopened.set_state("autoencoder/concept_baseline", None)
    assert reopened.get_state("autoencoder/concept_baseline", default="x") is None
    with pytest.raises(ValueError, match="JSON serialisable"):
        reopened.set_state("bad", object())


def test_event_store_default_path_follows_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYWATCH_STATE_DIR", str(tmp_path / "state"))
    store = DriftEventStore()
    assert store.path == tmp_path / "state" / "drift.db"
    store.add(_result("m", "e", "mmd", True, 1.0))
    assert DriftEventStore().count(only_drift=True) == 1


def test_bad_input_raises_value_error_naming_the_problem(detectors, telemetry):
    window = telemetry[2 * DAY : 3 * DAY]
    with pytest.raises(ValueError, match=r"window has 5 feature columns, expected 6"):
        detectors.test_inputs(window[:, :5])
    with_nan = window.copy()
    with_nan[10, METRICS.index("memory")] = np.nan
    with pytest.raises(ValueError, match=r"window: NaN in feature 'memory' \(row 10\)"):
        detectors.test_inputs(with_nan)
    with pytest.raises(ValueError, match=r"window has 60 rows, 10 after keeping every 6th"):
        detectors.test_inputs(window[:60])
    with pytest.raises(ValueError, match="2-D"):
        detectors.test_inputs(window[0])
    with pytest.raises(ValueError, match=r"reference has 6 feature columns, expected 5"):
        EntityDriftDetectors("m", "e", telemetry[:500], METRICS[:5], config=CONFIG)
    with pytest.raises(ValueError, match=r"reference_scores: NaN at row 1"):
        EntityDriftDetectors("m", "e", telemetry[:500], METRICS, reference_scores=[0.1, np.nan] * 50, config=CONFIG)
    with pytest.raises(ValueError, match="predicted has 3 rows but labels has 2"):
        detectors.test_concept(np.ones(3), np.ones(2))


def test_config_round_trip_and_validation():
    cfg = DriftConfig.for_period(288, p_value=0.01)
    assert (cfg.window, cfg.thin, cfg.span) == (288, 1, 288)
    assert DriftConfig.for_period(1440).span == 1440
    assert DriftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DriftConfig field"):
        DriftConfig.from_dict({"windw": 10})
    with pytest.raises(ValueError, match="correction"):
        DriftConfig(correction="holm")
    with pytest.raises(ValueError, match="p_value"):
        DriftConfig(p_value=1.5)


def test_alibi_detect_is_imported_without_transformers():
    """A drift detector is built without HuggingFace transformers in the process (alibi-detect imports it
    for text embeddings raywatch never uses: most of its import time), the detector still detects a shift,
    and the real transformers stays importable afterwards. A fresh interpreter: this one may hold either."""
    import subprocess
    import sys

    script = """
import sys
import numpy as np
from detect.drift import DriftConfig, EntityDriftDetectors
rng = np.random.default_rng(0)
reference = rng.normal(size=(600, 3))
det = EntityDriftDetectors("m", "e", reference, ["a", "b", "c"], config=DriftConfig(window=100, thin=1, mmd_permutations=50))
assert "transformers" not in sys.modules, "alibi-detect loaded transformers"
assert any(r.is_drift for r in det.test_inputs(rng.normal(size=(100, 3)) + 2.0))
import transformers
assert transformers.__version__ and "stand-in" not in (transformers.__doc__ or "")
print("ok")
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr[-3000:]
