"""SPOT thresholds against analytic tail quantiles, and its streaming rule (alarms are not learnt); DSPOT,
SPOT over a moving baseline: what the platform serves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from detect.thresholds import SPOT, _profile, _profile_at, fit_gpd


@pytest.mark.parametrize("gamma", [-0.3, 0.0, 0.3])
def test_gpd_fit_recovers_shape_and_scale(gamma):
    peaks = stats.genpareto.rvs(gamma, scale=2.0, size=5000, random_state=1)
    fitted_gamma, sigma = fit_gpd(peaks)
    assert fitted_gamma == pytest.approx(gamma, abs=0.06)
    assert sigma == pytest.approx(2.0, rel=0.08)
    # it is the maximum of the likelihood: scipy's own fit is no better
    ref = stats.genpareto.fit(peaks, floc=0)
    ours = stats.genpareto.logpdf(peaks, fitted_gamma, scale=sigma).sum()
    assert ours >= stats.genpareto.logpdf(peaks, ref[0], scale=ref[2]).sum() - 1e-3


def test_the_refinement_profile_is_the_grid_profile_at_one_point():
    y = stats.genpareto.rvs(0.2, scale=1.5, size=700, random_state=3)
    for theta in (-0.9 / y.max(), -1e-3, -1e-8, 1e-8, 0.4, 30.0):
        assert _profile_at(theta, y) == _profile(np.array([theta]), y)[0]


@pytest.mark.parametrize(
    ("sample", "risk", "quantile"),
    [
        (lambda rng: rng.exponential(1.0, 50_000), 1e-4, -math.log(1e-4)),  # light tail, gamma = 0
        (lambda rng: rng.pareto(3.0, 50_000), 1e-4, (1e-4) ** (-1 / 3) - 1),  # heavy tail, gamma = 1/3
        (lambda rng: rng.standard_t(5, 50_000), 1e-3, stats.t.ppf(1 - 1e-3, 5)),
    ],
)
def test_threshold_is_near_the_analytic_quantile(sample, risk, quantile):
    scores = sample(np.random.default_rng(0))
    spot = SPOT(risk=risk).fit(scores)
    assert spot.threshold_ == pytest.approx(quantile, rel=0.15)
    # extrapolated beyond what the sample's empirical quantile at that risk can resolve reliably,
    # and well above the 98% quantile it starts from
    assert spot.threshold_ > spot.initial_threshold_ * 1.2


def test_streaming_learns_from_normal_scores_but_not_from_alarms():
    rng = np.random.default_rng(3)
    spot = SPOT(risk=1e-3).fit(rng.exponential(1.0, 20_000))
    start, peaks = spot.threshold_, len(spot.peaks_)
    judged = spot.run(np.full(50, 1e6))  # a burst of alarms
    assert np.all(judged == start) and spot.threshold_ == start and len(spot.peaks_) == peaks
    spot.update(spot.initial_threshold_ + 0.5, learn=False)  # a row of a firing alert
    assert len(spot.peaks_) == peaks
    judged = spot.run(rng.exponential(1.0, 20_000))  # more normal data keeps it near -log(1e-3)
    assert judged[0] == start
    assert len(spot.peaks_) > peaks
    assert spot.threshold_ == pytest.approx(-math.log(1e-3), rel=0.15)


def test_a_degenerate_tail_falls_back_to_the_empirical_quantile():
    scores = np.r_[np.zeros(995), np.ones(5)]  # e.g. a probability pinned at 0, rarely 1: 5 peaks
    spot = SPOT(risk=1e-3).fit(scores)
    assert spot.threshold_ == pytest.approx(np.quantile(scores, 1 - 1e-3))


def test_rejects_a_risk_outside_the_tail_and_too_few_scores():
    with pytest.raises(ValueError, match="risk must be in"):
        SPOT(risk=0.05).fit(np.arange(1000.0))
    with pytest.raises(ValueError, match="too few"):
        SPOT().fit(np.arange(100.0))
    with pytest.raises(RuntimeError, match="fit"):
        SPOT().update(1.0)


def test_a_spot_continues_from_its_saved_state_exactly():
    """What a bundle stores and the serving ingress continues from: the same thresholds as the original."""
    rng = np.random.default_rng(5)
    original = SPOT().fit(rng.gamma(2.0, 1.0, 3000))
    restored = SPOT.from_state(json.loads(json.dumps(original.state())))
    later = rng.gamma(2.0, 1.1, 2000)
    np.testing.assert_array_equal(original.run(later), restored.run(later))


def test_a_spot_keeps_a_bounded_tail_that_stays_at_the_true_quantile():
    """Past max_peaks the oldest peaks are forgotten with their share of rows: memory and refit cost stay
    bounded, and on a steady stream the threshold stays at the true quantile (exp(1) exceeds -log(q) with
    probability q), because a lone spike that opens no alert is learnt. Leaving such spikes out (the
    default `update`) truncates the tail, and the bounded threshold sinks."""
    from detect.alerting import online_alerts

    rng = np.random.default_rng(6)
    calibration, stream = rng.exponential(1.0, 5000), rng.exponential(1.0, 100_000)
    spot = SPOT(max_peaks=200).fit(calibration)
    online_alerts(stream, spot)  # learns every row but an alert's
    assert len(spot.peaks_) == 200
    assert spot.threshold_ == pytest.approx(-math.log(spot.risk), rel=0.15)
    truncated = SPOT(max_peaks=200).fit(calibration)
    truncated.run(stream)
    assert truncated.threshold_ < 0.8 * -math.log(spot.risk)


# -- DSPOT: SPOT over a moving baseline (what the platform serves and `raywatch evaluate` judges) ------------


def _autocorrelated(rng: np.random.Generator, rows: int, level: float) -> np.ndarray:
    """Scores as a detector's are: each the mean of 10 exponential draws with the next (exceedances come in
    runs, so k of n rows above the bar happen in a normal stream too), over `level`."""
    return level + np.convolve(rng.exponential(1.0, rows + 9), np.ones(10) / 10, mode="valid")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dspot_follows_a_machine_whose_normal_level_moved(seed):
    """A machine whose normal scores sit higher than on its validation days (here by about 3 of their
    standard deviations): plain SPOT, fitted on the old level, pages over and over, and what it pages on is
    never learnt (alert rows are not); DSPOT's baseline moves with the rows it learns, and it raises about
    as few alerts as on the old level."""
    from detect.alerting import online_alerts
    from detect.thresholds import DSPOT

    rng = np.random.default_rng(seed)
    calibration = _autocorrelated(rng, 5000, 0.0)
    moved = _autocorrelated(rng, 20_000, 1.0)
    _, spot_alerts = online_alerts(moved, SPOT().fit(calibration))
    _, dspot_alerts = online_alerts(moved, DSPOT().fit(calibration))
    assert len(spot_alerts) >= 20 and 3 * len(dspot_alerts) <= len(spot_alerts), (len(spot_alerts), len(dspot_alerts))


def test_dspot_still_alerts_on_a_spike_over_the_recent_level_and_does_not_learn_it():
    """An incident well above the recent level opens an alert; its rows move neither the baseline nor the
    tail (an incident must not raise the bar that detects it), so the bar after it is the bar before it."""
    from detect.alerting import online_alerts
    from detect.thresholds import DSPOT

    rng = np.random.default_rng(8)
    dspot = DSPOT().fit(rng.exponential(1.0, 5000))
    normal = rng.exponential(1.0, 3000)
    incident = np.full(200, 40.0)
    thresholds, alerts = online_alerts(np.r_[normal, incident], dspot)
    assert len(alerts) >= 1 and alerts[-1].start >= len(normal) and alerts[-1].closed is None
    bar_before = thresholds[len(normal)]
    assert dspot.threshold_ == pytest.approx(bar_before)  # nothing of the incident was learnt
    assert bar_before < 40.0


def test_dspot_continues_from_its_saved_state_exactly():
    """A bundle stores the operational threshold's state and the serving ingress continues from it: the
    same thresholds as the original, over a stream longer than the baseline's ring (its re-summing too)."""
    from detect.thresholds import DSPOT, operational_threshold, threshold_from_state

    rng = np.random.default_rng(9)
    original = operational_threshold(rng.gamma(2.0, 1.0, 3000))
    assert isinstance(original, DSPOT)
    for value in rng.gamma(2.0, 1.0, 137):  # the ring's start is not its first slot
        original.update(float(value), learn=True)
    restored = threshold_from_state(json.loads(json.dumps(original.state())))
    assert isinstance(restored, DSPOT)
    later = rng.gamma(2.0, 1.1, 2000)
    np.testing.assert_array_equal(
        [original.update(float(s)) for s in later], [restored.update(float(s)) for s in later]
    )
    assert restored.baseline_ == pytest.approx(float(np.mean(original.window_)))


def test_a_plain_spot_state_still_loads_as_spot():
    """Bundles saved before DSPOT carry plain SPOT's state: they keep being judged as they were."""
    from detect.thresholds import threshold_from_state

    state = SPOT().fit(np.random.default_rng(10).exponential(1.0, 3000)).state()
    restored = threshold_from_state(state)
    assert type(restored) is SPOT and restored.threshold_ == SPOT.from_state(state).threshold_


def test_a_decision_threshold_continues_from_its_state_and_learns_nothing():
    from detect.thresholds import DecisionThreshold, threshold_from_state

    restored = threshold_from_state(json.loads(json.dumps(DecisionThreshold(0.37).state())))
    assert isinstance(restored, DecisionThreshold)
    for score in (0.0, 0.99, 5.0, float("nan")):
        assert restored.update(score, learn=True) == 0.37
    assert restored.threshold_ == 0.37


def test_dspot_refuses_calibration_that_cannot_cover_its_baseline_and_a_tail():
    from detect.thresholds import DSPOT, spot_state

    with pytest.raises(ValueError, match="do not cover a baseline of 60"):
        DSPOT().fit(np.arange(60.0))
    with pytest.raises(ValueError, match="baseline of 60 scores.*too few"):
        DSPOT().fit(np.arange(300.0))
    with pytest.raises(ValueError, match="depth must be at least 1"):
        DSPOT(depth=0)
    assert spot_state(np.arange(300.0)) is None  # serving then judges against the stored threshold


def test_a_score_that_is_not_a_number_does_not_disarm_dspot():
    """A model answer that overflowed is judged, and not learnt: the baseline stays a number."""
    from detect.thresholds import operational_threshold

    dspot = operational_threshold(np.random.default_rng(11).exponential(1.0, 3000))
    before = dspot.threshold_
    for bad in (float("nan"), float("inf")):
        assert dspot.update(bad, learn=True) == before
    assert dspot.threshold_ == before and math.isfinite(dspot.baseline_)


def test_a_decision_threshold_that_flags_nearly_every_validation_row_falls_back_to_the_normal_tail():
    from detect.metrics import best_f1
    from detect.thresholds import decision_threshold

    rng = np.random.default_rng(0)
    # validation days a third of whose rows are incidents, scored no better than chance: the best F1
    # is that of flagging (nearly) everything
    y = rng.random(3000) < 1 / 3
    s = rng.random(3000)
    assert np.mean(s >= best_f1(y, s)[1]) > 0.9
    threshold, rule, f1 = decision_threshold(y, s)
    assert rule == "normal_p99" and threshold == pytest.approx(np.quantile(s[~y], 0.99))
    assert np.mean(s >= threshold) < 0.05 and f1 == best_f1(y, s)[0]


def test_a_decision_threshold_lies_halfway_in_log_odds_between_the_best_f1_and_the_normal_tail():
    """One validation incident separated from every normal row puts the best-F1 threshold at the top of
    that incident's scores; the next incident scoring a little lower would be missed. The rule pulls the
    threshold towards the normal rows' 99th percentile, halfway in log-odds."""
    from detect.metrics import best_f1
    from detect.thresholds import decision_threshold, log_odds

    rng = np.random.default_rng(0)
    y = np.zeros(3000, dtype=bool)
    y[2000:2060] = True
    s = np.where(y, rng.uniform(0.95, 0.99, 3000), rng.uniform(0.0, 0.5, 3000))
    f1, at = best_f1(y, s)
    tail = np.quantile(s[~y], 0.99)
    assert f1 == 1.0 and at > 0.95 and tail < 0.5
    threshold, rule, chosen_f1 = decision_threshold(y, s)
    assert rule == "f1_tail_midpoint" and chosen_f1 == f1
    assert tail < threshold < at
    assert log_odds(threshold) == pytest.approx((log_odds(at) + log_odds(tail)) / 2)
    # what it buys: an incident scoring 0.85, below every validation incident row, still alerts
    assert threshold < 0.85

    # no normal validation row: nothing to pull towards; the best F1's threshold stands
    y_all = np.ones(50, dtype=bool)
    s_all = rng.random(50)
    assert decision_threshold(y_all, s_all) == (best_f1(y_all, s_all)[1], "best_f1", best_f1(y_all, s_all)[0])
