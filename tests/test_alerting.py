"""Alert grouping: a known score sequence becomes the expected episodes, streaming and batch alike."""

from __future__ import annotations

import numpy as np
import pytest

from detect import metrics as M
from detect.alerting import Alert, AlertGrouper, group_alerts, online_alerts
from detect.thresholds import SPOT


def rows_to_scores(above: str) -> np.ndarray:
    """'#' = a row at 2.0 (above a threshold of 1.0), '.' = a row at 0.0."""
    return np.array([2.0 if c == "#" else 0.0 for c in above])


def test_k_of_n_opens_and_quiet_rows_close():
    #                     0         1         2         3
    #                     0123456789012345678901234567890123456
    scores = rows_to_scores("#....##.#.##......#...........##.#..")
    alerts = group_alerts(scores, 1.0, grouper=AlertGrouper(k=3, n=5, clear=10))
    # row 0 alone pages no one; rows 5..11 are one flapping episode raised at row 8 (3 of rows 4..8
    # above); row 18 keeps it alive (fewer than 10 quiet rows since row 11) and it resolves at row 28;
    # rows 30..33 raise a second alert at row 33 that still fires at the end
    assert [(a.start, a.opened, a.end, a.closed) for a in alerts] == [(5, 8, 18, 28), (30, 33, 33, None)]


def test_flapping_score_stays_one_alert_and_spikes_never_page():
    flapping = rows_to_scores("###" + ".#" * 20 + "." * 12)
    assert len(group_alerts(flapping, 1.0)) == 1
    spikes = rows_to_scores("#...." * 20)
    assert group_alerts(spikes, 1.0) == []


def test_alert_carries_peak_and_top_metrics():
    scores = np.array([0.0, 3.0, 5.0, 4.0, 0.0] + [0.0] * 10)
    contributions = np.zeros((15, 4))
    contributions[1:4, 2] = 3.0  # metric 2 explains the episode, then metric 0
    contributions[1:4, 0] = 1.0
    contributions[0, 3] = 100.0  # a row before the episode must not count
    (alert,) = group_alerts(scores, 1.0, contributions, AlertGrouper(k=3, n=5, clear=10, top=2))
    assert alert == Alert(start=1, opened=3, end=3, closed=13, peak_score=5.0, peak_row=2, top_metrics=(2, 0))


def test_streaming_transitions_match_the_batch_result():
    rng = np.random.default_rng(0)
    scores = (rng.random(2000) < 0.3).astype(float) * 2
    grouper = AlertGrouper()
    events = [grouper.update(s, 1.0) for s in scores]
    opened = [a for e in events if e and e[0] == "opened" for a in [e[1]]]
    closed = [a for e in events if e and e[0] == "closed" for a in [e[1]]]
    batch = group_alerts(scores, 1.0)
    assert [a.start for a in batch] == [a.start for a in opened]
    assert [a.closed for a in batch if a.closed is not None] == [a.closed for a in closed]


def test_rejects_impossible_rules():
    with pytest.raises(ValueError, match="k <= n"):
        AlertGrouper(k=6, n=5)
    with pytest.raises(ValueError, match="clear"):
        AlertGrouper(clear=0)


def test_alert_scores_count_alerts_not_rows():
    labels = np.zeros(100, dtype=int)
    labels[20:30] = 1  # incident A, found late
    labels[60:70] = 1  # incident B, missed
    alerts = [
        Alert(start=25, opened=27, end=40, closed=50, peak_score=9.0, peak_row=26),
        Alert(start=80, opened=82, end=85, closed=95, peak_score=3.0, peak_row=81),  # false alarm
        Alert(start=10, opened=12, end=15, closed=25, peak_score=3.0, peak_row=11),  # false alarm, before A
    ]
    recall, precision, mttd = M.alert_scores(labels, alerts)
    assert recall == pytest.approx(0.5) and precision == pytest.approx(1 / 3) and mttd == pytest.approx(7.0)
    assert M.alert_scores(labels, [])[2] is None


def test_online_alerts_do_not_learn_from_a_firing_alert():
    """Not the rows that opened it (learnt from, the first two would raise the bar), not the falling edge."""
    rng = np.random.default_rng(1)
    calibration = rng.exponential(1.0, 10_000)
    normal = rng.exponential(1.0, 3000)
    incident = np.r_[normal[:1000], np.full(200, 20.0), np.linspace(20, 3, 100), normal[1000:]]
    thresholds, alerts = online_alerts(incident, SPOT(risk=1e-3).fit(calibration))
    assert len(thresholds) == len(incident)
    (found,) = [a for a in alerts if a.start <= 1000 + 5 and a.end >= 1000]
    assert found.opened <= 1002
    # while the alert fires, nothing is learnt: the falling edge (below the bar, above SPOT's initial
    # threshold) would otherwise count as peaks and raise the bar
    edge = slice(1200, 1300)
    assert np.all(thresholds[1000:1285] == thresholds[1000])  # it resolves 10 quiet rows after ~1277
    assert (incident[edge] < thresholds[1000]).sum() > 10
    before, plain = SPOT(risk=1e-3).fit(calibration), SPOT(risk=1e-3).fit(calibration)
    before.run(incident[:1000])
    plain.run(incident[:1300])  # learns the edge's rows below the bar
    assert plain.threshold_ > before.threshold_
