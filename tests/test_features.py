"""The one feature pipeline: served (one row at a time) == batch, FeatureSpec JSON round trip, input checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from detect.data import TelemetryError, load_series
from detect.features import FeatureSpec, entity_features, entity_windows, frame_features, tail_features, tail_windows
from serve.history import EntityHistory


@pytest.fixture(scope="module")
def smd(data_dir):
    series = load_series("smd", "machine-2-1", data_dir)
    return series.test[series.metrics].to_numpy()[:600], series.metrics


def test_served_rows_one_at_a_time_equal_batch_exactly(smd):
    """A stream of single samples, as the ingress sees it: its history (serve.history.EntityHistory)
    and the detector replicas' tail functions give each new row the batch path's features and window."""
    values, metrics = smd
    spec = FeatureSpec(metrics=tuple(metrics), window=20, lags=(1, 3, 7), rolling=(5, 25), diffs=(1, 2), rates=(4,))
    history = EntityHistory(rows=spec.history)
    online, last_window = [], None
    for row in values:
        rows = history.context_and_new("machine-2-1", row[None], spec.history - 1)
        online.append(tail_features(rows, spec, 1)[0])
        last_window = tail_windows(rows, spec, 1, spec.window)[0]
    batch = entity_features(values, spec)
    assert batch.shape == (len(values), spec.n_features) == np.shape(online)
    np.testing.assert_array_equal(np.asarray(online), batch)
    # the sequence models read float32 windows
    np.testing.assert_array_equal(last_window.astype(np.float32), entity_windows(values, spec)[-1])


def test_served_interleaved_entities_match_frame_batch(smd):
    values, metrics = smd
    spec = FeatureSpec(metrics=tuple(metrics[:5]))
    rng = np.random.default_rng(0)
    entities = rng.choice(["a", "b", "c"], size=len(values))
    frame = pd.DataFrame(values[:, :5], columns=metrics[:5]).assign(entity=entities)
    batch = frame_features(frame, spec)
    history = EntityHistory(rows=spec.history)
    online = [
        tail_features(history.context_and_new(e, row[None], spec.history - 1), spec, 1)[0]
        for e, row in zip(entities, values[:, :5])
    ]
    np.testing.assert_array_equal(np.asarray(online), batch)


def test_features_mean_what_they_say():
    spec = FeatureSpec(metrics=("x",), window=3, lags=(2,), rolling=(3,), diffs=(1,), rates=(2,))
    feats = entity_features(np.array([[1.0], [2.0], [4.0], [8.0]]), spec)
    names = spec.feature_names()
    row = dict(zip(names, feats[-1]))
    assert row == {
        "x": 8.0,
        "x__lag2": 2.0,
        "x__mean3": 14 / 3,
        "x__std3": pytest.approx(np.std([2, 4, 8])),
        "x__min3": 2.0,
        "x__max3": 8.0,
        "x__diff1": 4.0,
        "x__rate2": 3.0,
    }
    first = dict(zip(names, feats[0]))  # warm-up rule: history padded with the first sample
    assert first["x__lag2"] == 1.0 and first["x__std3"] == 0.0


def test_feature_spec_json_round_trip(tmp_path):
    spec = FeatureSpec(metrics=("cpu", "memory"), window=12, lags=(1, 2), rolling=(4,), diffs=(1,), rates=(3,))
    again = FeatureSpec.from_json(spec.to_json())
    assert again == spec and again.feature_names() == spec.feature_names()
    spec.save(tmp_path / "spec.json")
    assert FeatureSpec.load(tmp_path / "spec.json") == spec
    with pytest.raises(ValueError, match="unknown fields"):
        FeatureSpec.from_json('{"metrics": ["a"], "colour": 1}')
    with pytest.raises(ValueError, match="lags"):
        FeatureSpec(metrics=("a",), lags=(0,))


def test_batch_rejects_non_finite_and_missing_columns():
    spec = FeatureSpec(metrics=("cpu", "memory"))
    with pytest.raises(TelemetryError, match="metric 'memory' row 1: non-finite"):
        entity_features(np.array([[1.0, 2.0], [1.0, np.nan]]), spec)
    with pytest.raises(TelemetryError, match=r"missing metric column\(s\) \['memory'\]"):
        frame_features(pd.DataFrame({"cpu": [1.0]}), spec)


def test_serving_windows_equal_batch_windows(smd):
    """What serving computes for the last n rows (tail_windows, tail_features) is what the batch path
    computes, bit for bit, on either side of the row count where tail_features stops building windows."""
    from detect.features import tail_features, tail_windows, window_features

    values, metrics = smd
    spec = FeatureSpec(metrics=tuple(metrics), window=12)
    for rows in (values[:1], values[:5], values[:200]):  # shorter than a window, too: padded alike
        for n in sorted({1, 31, 32, len(rows)} & set(range(1, len(rows) + 1))):
            built = window_features(tail_windows(rows, spec, n, spec.history), spec)
            np.testing.assert_array_equal(built, entity_features(rows, spec)[-n:])
            np.testing.assert_array_equal(tail_features(rows, spec, n), built)
            np.testing.assert_array_equal(
                tail_windows(rows, spec, n, spec.window).astype(np.float32), entity_windows(rows, spec)[-n:]
            )
    with pytest.raises(TelemetryError, match="new rows"):
        tail_windows(values[:3], spec, 4, spec.window)
