"""The replay benchmark's pure parts: the injected shift, dating drift events to days, the records."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import replay  # noqa: E402

from detect.drift import drift_window_rows
from detect.synthetic import inject_mean_shift, shifted_metrics


def test_shift_moves_ten_percent_of_metrics_by_two_sigma_from_the_start_row_on():
    rng = np.random.default_rng(1)
    metrics = [f"m{i:02d}" for i in range(20)]
    values = rng.normal(size=(400, 20))
    shifted, moved = inject_mean_shift(values, metrics, start=200)
    assert len(moved) == 2 and moved == shifted_metrics(metrics)  # the same metrics every time
    cols = [metrics.index(m) for m in moved]
    np.testing.assert_array_equal(shifted[:200], values[:200])
    still = [j for j in range(20) if j not in cols]
    np.testing.assert_array_equal(shifted[:, still], values[:, still])
    gain = (shifted[200:, cols] - values[200:, cols]).mean(axis=0)
    np.testing.assert_allclose(gain, 2.0 * values[:200, cols].std(axis=0))


def test_at_least_one_metric_moves():
    assert len(shifted_metrics(["a", "b", "c"])) == 1


def test_events_are_dated_to_the_last_chunk_sent_before_them():
    sent = [(10.0, 71), (20.0, 143), (30.0, 215)]
    assert replay.event_rows([10.5, 25.0, 31.0, 9.0], sent) == [71, 143, 215, 71]


def test_drift_events_are_counted_on_days_without_an_incident():
    labels = np.zeros(4 * 10, dtype=int)
    labels[15] = 1  # day 1
    labels[38] = 1  # day 3
    assert replay.normal_days(labels, 10).tolist() == [True, False, True, False]
    assert replay.drift_events_on_normal_days([0, 9, 12, 25, 39], labels, 10) == 3
    assert replay.normal_days(labels[:35], 10).tolist() == [True, False, True, True]  # a partial last day


def test_served_figures_group_flags_into_alerts():
    labels = np.zeros(100, dtype=int)
    labels[40:50] = 1
    flags = np.zeros(100, dtype=bool)
    flags[42:48] = True  # one alert on the incident
    flags[80:84] = True  # one false alert
    scores = flags.astype(float)
    out = replay.served_figures(labels, scores, flags, shift_row=None)
    assert out["alerts"] == 2 and out["event_precision"] == 0.5 and out["event_recall"] == 1.0
    assert out["served_f1_operational_after_shift"] is None
    after = replay.served_figures(labels, scores, flags, shift_row=30)
    assert after["served_f1_operational_after_shift"] == pytest.approx(2 * 6 / (2 * 6 + 4 + 4))


def test_records_carry_every_key_and_refuse_unknown_ones():
    record = replay.make_record("asd/omi-1", "as_is", "loop", jobs=1, days=15.0)
    for key in ("entity", "variant", "mode", "days", "served_pr_auc", "served_f1_operational_after_shift"):
        assert key in record
    for key in ("event_precision", "event_recall", "drift_events", "drift_events_normal_days", "jobs", "promotions"):
        assert key in record
    with pytest.raises(ValueError, match="jobz"):
        replay.make_record("asd/omi-1", "as_is", "loop", jobz=1)


def test_targets_compare_loop_with_static():
    def rec(entity, variant, mode, **kw):
        return replay.make_record(entity, variant, mode, **{"days": 14.0, "jobs": 0, **kw})

    records = [
        rec("a", "as_is", "loop", served_pr_auc=0.50, jobs=3),
        rec("a", "as_is", "static", served_pr_auc=0.51),
        rec("a", "shift", "loop", served_f1_operational_after_shift=0.40),
        rec("a", "shift", "static", served_f1_operational_after_shift=0.30),
    ]
    met = {name.split(":")[1].strip()[:12]: ok for name, ok, _ in replay.targets(records)}
    assert met == {"served PR-AU": False, "at most 1 re": False, "served F1 af": True}
    table = replay.markdown(records, {"machine": "m", "date": "d", "command": "c", "minutes": 1})
    assert "## as_is" in table and "## shift" in table and "**mean** | loop" in table


def test_a_drift_window_is_whole_days_with_enough_rows_to_retrain_on():
    assert drift_window_rows(1440) == 1440
    assert drift_window_rows(288) == 576
