"""Synthetic fleet: deterministic, incidents move exactly their labelled metrics; drift injector works."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from detect.synthetic import INCIDENT_KINDS, METRICS, generate_fleet, inject_drift


@pytest.fixture(scope="module")
def fleets():
    kw = dict(n_machines=6, n_steps=2880, incidents_per_machine=4, seed=7)
    return generate_fleet(**kw), generate_fleet(**kw, incidents=False)


def test_deterministic_by_seed(fleets):
    again = generate_fleet(n_machines=6, n_steps=2880, incidents_per_machine=4, seed=7)
    pd.testing.assert_frame_equal(again.frame, fleets[0].frame)
    other = generate_fleet(n_machines=6, n_steps=2880, incidents_per_machine=4, seed=8)
    assert not np.allclose(other.frame["cpu"], fleets[0].frame["cpu"])


def test_every_kind_occurs_and_is_labelled(fleets):
    fleet, _ = fleets
    assert {i.kind for i in fleet.incidents} == set(INCIDENT_KINDS)
    frame = fleet.frame
    for inc in fleet.incidents:
        rows = frame[frame.entity == inc.entity].iloc[inc.start : inc.stop]
        assert (rows.label == 1).all() and (rows.incident_kind == inc.kind).all()
    assert frame.label.sum() == sum(i.stop - i.start for i in fleet.incidents)


def test_incidents_move_their_root_cause_metrics_and_only_those(fleets):
    fleet, counterfactual = fleets
    for inc in fleet.incidents:
        mask = (fleet.frame.entity == inc.entity).to_numpy()
        for metric in METRICS:
            actual = fleet.frame.loc[mask, metric].to_numpy()[inc.start : inc.stop]
            normal = counterfactual.frame.loc[mask, metric].to_numpy()[inc.start : inc.stop]
            shift = np.abs(actual - normal).mean()
            if metric in inc.metrics:
                # a real move: at least 2 noise standard deviations on average over the incident
                assert shift > 2 * METRICS[metric][2], (inc, metric, shift)
            else:
                assert shift == 0, (inc, metric)
    # outside incidents the two fleets are identical
    np.testing.assert_array_equal(
        fleet.frame.loc[fleet.frame.label == 0, list(METRICS)],
        counterfactual.frame.loc[fleet.frame.label == 0, list(METRICS)],
    )


def test_drift_injector_mean_variance_seasonality(fleets):
    _, normal = fleets
    frame = normal.frame
    start = 1440

    def stats(f, metric):
        before = f.groupby("entity")[metric].apply(lambda s: s.iloc[:start].to_numpy())
        after = f.groupby("entity")[metric].apply(lambda s: s.iloc[start:].to_numpy())
        return before, after

    shifted = inject_drift(frame, "mean_shift", ["memory"], start, magnitude=1.0)
    b0, a0 = stats(frame, "memory")
    b1, a1 = stats(shifted, "memory")
    for e in b0.index:
        np.testing.assert_array_equal(b0[e], b1[e])  # nothing changes before the start
        assert (a1[e] - a0[e]).mean() == pytest.approx(b0[e].std(), rel=1e-9)
    pd.testing.assert_series_equal(shifted["cpu"], frame["cpu"])  # other metrics untouched

    varied = inject_drift(frame, "variance", ["latency_p99"], start, magnitude=2.0)
    _, a0 = stats(frame, "latency_p99")
    _, a2 = stats(varied, "latency_p99")
    for e in a0.index:
        assert a2[e].var() / a0[e].var() == pytest.approx(2.0, rel=1e-6)

    seasonal = inject_drift(frame, "seasonality", ["cpu"], start, magnitude=2.0, period=60)
    added = (seasonal["cpu"] - frame["cpu"]).to_numpy().reshape(6, -1)[:, start:]
    spectrum = np.abs(np.fft.rfft(added[0]))
    assert np.argmax(spectrum) == round(added.shape[1] / 60)  # a new 60-step cycle
    assert (seasonal["cpu"] - frame["cpu"]).to_numpy().reshape(6, -1)[:, :start].max() == 0

    with pytest.raises(ValueError, match="unknown drift kind"):
        inject_drift(frame, "tilt", ["cpu"], start)
    with pytest.raises(ValueError, match=r"\['gpu'\] are not columns"):
        inject_drift(frame, "mean_shift", ["gpu"], start)


def test_inject_incidents_moves_columns_by_their_own_spread_and_labels_them():
    from detect.metrics import segments
    from detect.synthetic import inject_incidents

    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (5000, 6)) * np.array([1, 2, 3, 4, 5, 6])
    moved, labels = inject_incidents(X, count=5, seed=1)
    incidents = segments(labels)
    assert len(incidents) == 5 and all(30 <= b - a <= 120 for a, b in incidents)
    assert np.array_equal(moved[labels == 0], X[labels == 0])  # normal rows are untouched
    for a, b in incidents:
        shift = np.abs(moved[a:b] - X[a:b]).max(axis=0) / X.std(axis=0)
        assert 2 <= (shift > 0).sum() <= 3  # each kind moves 2 or 3 metrics
        assert shift.max() >= 4  # by at least 4 of that metric's standard deviations
    again, labels_again = inject_incidents(X, count=5, seed=1)
    assert np.array_equal(again, moved) and np.array_equal(labels_again, labels)  # deterministic
    with pytest.raises(ValueError, match="too few"):
        inject_incidents(X[:50], count=4)
