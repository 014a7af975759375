"""Root-cause attribution held over the episode (detect/attribution.py)."""

from __future__ import annotations

import numpy as np
import pytest

from detect.attribution import CAP, HALF_LIFE_ROWS, hold_peak_row, hold_peaks, hold_peaks_across


def test_a_peak_fades_by_half_each_half_life_and_a_higher_one_takes_over():
    rows = np.zeros((200, 2))
    rows[10, 0], rows[150, 1] = 8.0, 3.0
    held, last = hold_peaks(rows, half_life_rows=60)
    assert held[10, 0] == pytest.approx(8.0) and held[70, 0] == pytest.approx(4.0)
    assert held[130, 0] == pytest.approx(2.0) and held[9].max() == 0.0
    assert held[149].argmax() == 0 and held[150].argmax() == 1  # 8 * 0.5 ** (140 / 60) = 1.58 < 3
    np.testing.assert_allclose(last, held[-1], atol=1e-5)


def test_an_absurd_old_value_does_not_outrank_a_metric_far_out_now():
    """A counter reset (1e9) an hour ago must not hide the metric that is 500x its usual error now; two
    metrics at the cap in one row keep their order."""
    rows = np.ones((120, 3))
    rows[0, 0] = 1e9
    rows[60, 1], rows[60, 2] = 500.0, 300.0
    held, _ = hold_peaks(rows, half_life_rows=60)
    assert held[59].argmax() == 0 and held[59, 0] == pytest.approx(CAP / 2 * 0.5 ** (-1 / 60), rel=1e-3)
    assert list(np.argsort(-held[60])) == [1, 2, 0]  # both capped; the one further out first


def test_holding_over_parts_equals_one_pass_and_no_half_life_means_no_hold():
    rows = np.random.default_rng(0).exponential(1.0, (500, 4))
    whole = hold_peaks(rows)[0]
    first, held = hold_peaks(rows[:123])
    np.testing.assert_allclose(np.vstack([first, hold_peaks(rows[123:], held=held)[0]]), whole)
    np.testing.assert_array_equal(hold_peaks(rows, half_life_rows=0)[0], rows)
    assert np.all(whole >= rows)
    with pytest.raises(ValueError, match="half-life must be >= 0"):
        hold_peaks(rows, half_life_rows=-1)


def test_a_non_finite_contribution_neither_poisons_the_hold_nor_hides_its_metric():
    rows = np.ones((5, 3))
    rows[1, 0], rows[2, 1] = np.nan, np.inf
    held, last = hold_peaks(rows)
    assert np.isfinite(held).all() and np.isfinite(last).all()
    assert held[2].argmax() == 1 and held[4, 0] == pytest.approx(1.0, abs=1e-5)  # inf: at the cap, first


def test_one_row_in_python_floats_holds_exactly_what_hold_peaks_holds():
    """`hold_peak_row` (the ingress's path for a snapshot's one row per entity) gives `hold_peaks`' values bit
    for bit, row after row, with NaN, infinities and values past the cap among them."""
    rows = np.random.default_rng(3).exponential(1.0, (400, 5))
    rows[10, 0], rows[50, 1], rows[51, 2], rows[200, 3] = np.nan, np.inf, 1e9, -np.inf
    expected, expected_last = hold_peaks(rows)
    held = None
    for t, row in enumerate(rows):
        out, held = hold_peak_row(row.tolist(), HALF_LIFE_ROWS, held)
        np.testing.assert_array_equal(out, expected[t])
    np.testing.assert_array_equal(held, expected_last)
    assert hold_peak_row([1.0, 2.0], half_life_rows=0) == ([1.0, 2.0], [1.0, 2.0])


def test_one_row_of_many_series_at_once_holds_exactly_what_each_series_holds_alone():
    """`hold_peaks_across` (the ingress's one pass over a snapshot's entities) gives each series the values
    `hold_peak_row` gives it row by row, bit for bit, whatever the others hold (NaN, infinities, values past
    the cap among them), from nothing held as from something."""
    rng = np.random.default_rng(4)
    series = rng.exponential(1.0, (50, 7, 6))  # rows x series x metrics
    series[3, 0, 1], series[8, 2, 0], series[9, 4, 5], series[20, 6, 2] = np.nan, np.inf, 1e9, -np.inf
    alone: list[list[float] | None] = [None] * series.shape[1]
    held = None
    for row in series:
        out, held = hold_peaks_across(row, HALF_LIFE_ROWS, held)
        for i, contribution in enumerate(row):
            expected, alone[i] = hold_peak_row(contribution.tolist(), HALF_LIFE_ROWS, alone[i])
            np.testing.assert_array_equal(out[i], expected)
    np.testing.assert_array_equal(held, np.array(alone))
    out, held = hold_peaks_across(series[0], half_life_rows=0)
    np.testing.assert_array_equal(out, series[0])
    np.testing.assert_array_equal(held, series[0])
