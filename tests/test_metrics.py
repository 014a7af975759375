"""Quality metrics against hand-computed and brute-force answers."""

from __future__ import annotations

import numpy as np
import pytest

from detect import metrics as M


def test_segments_and_event_scores():
    y = np.array([0, 1, 1, 0, 0, 1, 0, 0, 1, 1])
    assert M.segments(y) == [(1, 3), (5, 6), (8, 10)]
    s = np.array([0, 0, 5, 0, 0, 0, 5, 0, 0, 5])
    recall, precision = M.event_scores(y, s, 1)
    assert recall == pytest.approx(2 / 3) and precision == pytest.approx(2 / 3)


def test_best_f1_and_f1_at():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.3])
    f1, thr = M.best_f1(y, s)
    # thresholds 0.9, 0.8, 0.7, 0.3 give F1 1/2, 4/5, 2/3, 6/7
    assert f1 == pytest.approx(6 / 7) and thr == pytest.approx(0.3)
    assert M.f1_at(y, s, 0.8) == pytest.approx(0.8)


def test_best_f1_brute_force():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.2).astype(int)
    s = rng.random(300) + y * 0.5
    brute = max(M.f1_at(y, s, t) for t in np.unique(s))
    assert M.best_f1(y, s)[0] == pytest.approx(brute)


def test_point_adjusted_f1_brute_force():
    rng = np.random.default_rng(2)
    y = np.zeros(400, dtype=int)
    for a in (20, 90, 200, 310):
        y[a : a + rng.integers(5, 30)] = 1
    s = rng.random(400) + y * rng.random(400)

    def pa(t):
        pred = s >= t
        for a, b in M.segments(y):
            if pred[a:b].any():
                pred[a:b] = True
        tp, fp, fn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum()
        return 2 * tp / (2 * tp + fp + fn)

    assert M.point_adjusted_f1(y, s) == pytest.approx(max(pa(t) for t in np.unique(s)))
    assert M.point_adjusted_f1(y, s) >= M.best_f1(y, s)[0]


def test_hitrate():
    contrib = np.array([[0.9, 0.1, 0.5, 0.0], [0.0, 0.8, 0.9, 0.1]])
    interp = [(0, 1, [0, 2])]
    y = np.array([1, 1])
    # row 0: top2 = {0,2} -> 1.0 ; row 1: top2 = {2,1} -> 0.5
    assert M.hitrate(contrib, interp, y, 100) == pytest.approx(0.75)
    # 150%: top3 -> row 0 {0,2,1} -> 1.0; row 1 {2,1,3} -> 0.5
    assert M.hitrate(contrib, interp, y, 150) == pytest.approx(0.75)
    assert np.isnan(M.hitrate(contrib, interp, np.array([0, 0]), 100))  # only labelled rows count


def test_pr_auc_and_threshold():
    y = np.array([0, 1, 0, 1])
    assert M.pr_auc(y, np.array([0.1, 0.9, 0.2, 0.8])) == pytest.approx(1.0)
    assert M.operational_threshold(np.arange(101.0), 0.99) == pytest.approx(99.0)
    with pytest.raises(ValueError):
        M.operational_threshold(np.arange(3.0), 1.0)
