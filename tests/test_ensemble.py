"""The ensemble learns from whatever labels an entity has: never fails for want of incidents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detect.ensemble import EnsembleDetector, split_with_incidents_on_both_sides, with_enough_incidents
from detect.evidence import n_features
from detect.metrics import segments

ROWS = 1000  # split in tenths: rows 200-299, 500-599 and 800-899 are the interleaved validation blocks


def telemetry(incidents: list[tuple[int, int]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(ROWS)
    X = np.sin(2 * np.pi * t[:, None] / 200 + np.arange(4)) + rng.normal(0, 0.1, (ROWS, 4))
    labels = np.zeros(ROWS, dtype=np.int8)
    for a, b in incidents:
        X[a:b, 1] += 4.0
        labels[a:b] = 1
    return X, labels


def small() -> EnsembleDetector:
    return EnsembleDetector(rf_trees=20, xgb_rounds=20, lgbm_rounds=20)


def test_the_split_gives_both_parts_an_incident_when_the_blocks_would_not():
    # both incidents fall in validation blocks and none in the newest 30%: the first goes to the fit part
    target = np.zeros(ROWS, dtype=np.int8)
    target[210:250] = 1
    target[510:560] = 1
    fit, val = split_with_incidents_on_both_sides(target, 0.3)
    assert target[fit].any() and target[val].any()
    assert fit[210:250].all()  # the first incident, moved to the fit part
    assert not (fit & val).any() and (fit | val).all()


def test_two_real_incidents_in_validation_blocks_are_learnt_without_injection():
    X, labels = telemetry([(210, 250), (520, 560)])
    det = small().fit(X, labels)
    assert det.injected_incidents_ == 0
    assert det.validation_["positives"] > 0


def test_one_real_incident_is_kept_and_injected_ones_are_added():
    """One incident, in a validation block: before, the fit part held no positive and the logistic member
    raised ("needs samples of at least 2 classes"), so `evaluate` lost the entity."""
    X, labels = telemetry([(520, 560)])
    det = small()
    features, target, fit, val = det.prepare(X, labels)
    assert det.injected_incidents_ >= 1
    assert target[fit].any() and target[val].any()
    assert target[510:560].all()  # the real incident (and its lead rows) is still an incident
    det.fit(X, labels)
    scores = det.score(X)
    assert np.isfinite(scores).all()
    assert scores[520:560].mean() > np.median(scores)  # and it learnt what an incident looks like here


def test_rows_too_few_to_inject_into_say_so():
    X, labels = telemetry([])
    with pytest.raises(ValueError, match="too few to inject"):
        small().fit(X[:40], labels[:40])


def test_injected_incidents_never_overwrite_real_ones():
    X, labels = telemetry([(520, 560)])
    injected_X, injected, _, count = with_enough_incidents(X, labels, horizon=10, seed=0)
    assert np.array_equal(injected_X[520:560], X[520:560])  # the real incident's rows, untouched
    assert injected[520:560].all()  # and still labelled
    assert count >= 1 and len(segments(injected)) >= 2


def stacked() -> EnsembleDetector:
    return EnsembleDetector(rf_trees=20, xgb_rounds=20, lgbm_rounds=20, evidence_epochs=2)


def test_stacked_members_learn_from_the_evidence_and_never_fall_as_it_grows():
    X, labels = telemetry([(300, 360), (700, 760)])
    normal, _ = telemetry([], seed=1)
    det = stacked().fit(X, labels, normal=normal)
    assert [d.name for d in det.evidence_] == ["autoencoder", "lstm"]
    F = det.features(X)
    assert F.shape == (ROWS, n_features(2))
    raised = F + np.random.default_rng(0).uniform(0, 2, F.shape).astype(np.float32)
    # every member, not only the vote: a label set cannot teach any of them that more error is normal
    assert (det.member_matrix(raised) >= det.member_matrix(F) - 1e-9).all()
    assert (det.logistic_[:-1] >= 0).all()
    scores = det.score(X)
    assert scores[labels == 1].mean() > 3 * scores[labels == 0].mean()
    assert det.explain(X).shape == X.shape  # which metrics the evidence comes from
    assert det.explain(X)[320:340].mean(axis=0).argmax() == 1  # the incidents moved m01


def test_evidence_detectors_learn_normal_from_the_rows_not_labelled_as_incidents():
    X, labels = telemetry([(300, 360), (700, 760)])  # incidents move m01 by +4
    det = stacked()
    det.fit_evidence(X, labels)
    normal_mean, all_mean = X[labels == 0, 1].mean(), X[:, 1].mean()
    assert all_mean - normal_mean > 0.3
    for evidence in det.evidence_:
        assert abs(evidence.scaler_.mean[1] - normal_mean) < 1e-6, evidence.name
    assert len(det.evidence_scales_) == 2 and min(det.evidence_scales_) > 0


def test_a_window_feature_ensemble_saved_before_stacking_loads_as_one(tmp_path):
    X, labels = telemetry([(300, 360), (700, 760)])
    det = EnsembleDetector(rf_trees=20, xgb_rounds=20, lgbm_rounds=20, evidence=()).fit(X, labels)
    det.save(tmp_path)
    meta = json.loads((tmp_path / "detector.json").read_text())
    for key in ("evidence", "evidence_scales"):  # what a bundle saved before the stacking lacks
        del meta["params"][key]
    for key in ("evidence", "evidence_epochs"):
        del meta["params"]["config"][key]
    (tmp_path / "detector.json").write_text(json.dumps(meta))
    old = EnsembleDetector.load(tmp_path)
    assert old.config.evidence == () and old.evidence_ == []
    assert old.context_rows() == det.context_rows() == det.spec_.history - 1
    np.testing.assert_allclose(old.score(X), det.score(X), atol=1e-4)


def test_a_stacked_ensemble_saves_and_loads_its_evidence_detectors(tmp_path):
    X, labels = telemetry([(300, 360), (700, 760)])
    det = stacked().fit(X, labels)
    det.save(tmp_path)
    loaded = EnsembleDetector.load(tmp_path)
    assert [d.name for d in loaded.evidence_] == ["autoencoder", "lstm"]
    assert loaded.evidence_scales_ == det.evidence_scales_ and loaded.context_rows() == det.context_rows()
    np.testing.assert_allclose(loaded.score(X), det.score(X), atol=1e-4)


def test_the_ensemble_serves_the_decision_threshold_it_learnt_on_labelled_validation_rows(tmp_path):
    """Its operational threshold is the validation-F1 one (`fit_vote`), not a tail of normal scores: the
    same object `raywatch evaluate` judges, saved with the model for the ingress, and it survives a load."""
    from detect.alerting import online_alerts
    from detect.thresholds import DecisionThreshold, threshold_from_state

    X, labels = telemetry([(300, 360), (700, 760)])
    det = small().fit(X, labels)
    assert det.online_threshold() == DecisionThreshold(det.threshold_)
    assert det.served_spot() == {"kind": "decision", "threshold": det.threshold_}
    det.save(tmp_path)
    assert threshold_from_state(EnsembleDetector.load(tmp_path).served_spot()) == det.online_threshold()
    scores = det.score(X)
    thresholds, alerts = online_alerts(scores, det.online_threshold())
    assert (thresholds == det.threshold_).all() and alerts  # the incidents alert; the bar never moved
