"""Loaders: shipped SMD/ASD layout, generic CSV/Parquet, and the errors bad input gets."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pandas as pd
import pytest

from detect.data import TelemetryError, list_entities, load_benchmark, load_series, load_telemetry, rows_per_day


def test_shipped_entities_load(data_dir):
    pairs = list_entities(data_dir)
    assert ("smd", "machine-1-6") in pairs and ("asd", "omi-1") in pairs and len(pairs) == 6
    series = load_series("asd", "omi-1", data_dir)
    assert len(series.metrics) == 19 and series.metrics[0] == "m00"
    assert len(series.test) == len(series.labels) == 4320
    assert 0 < series.labels.mean() < 0.5
    assert series.interpretation and all(0 <= d < 19 for _, _, dims in series.interpretation for d in dims)


def test_entity_filter_and_unknown_entity(data_dir):
    assert [s.entity for s in load_benchmark(data_dir, ["omi-2"])] == ["omi-2"]
    with pytest.raises(TelemetryError, match="unknown entities.*nope"):
        load_benchmark(data_dir, ["nope"])


def _copy_entity(data_dir, tmp_path, dataset="asd", entity="omi-1"):
    dest = tmp_path / dataset / entity
    shutil.copytree(data_dir / dataset / entity, dest)
    return dest


def _rewrite(path, frame):
    with gzip.open(path, "wt") as fh:
        frame.to_csv(fh, index=False)


@pytest.mark.parametrize(
    "t, expected",
    [
        (None, 1440),  # the shipped layout's row index, in a dataset raywatch does not know: 1-minute samples
        (pd.date_range("2026-03-01", periods=8640, freq="5min").strftime("%Y-%m-%dT%H:%M:%SZ"), 288),
        (1.7e9 + 900.0 * np.arange(8640), 96),  # epoch seconds, every 15 minutes
        (1.7e12 + 60_000 * np.arange(8640), 1440),  # epoch milliseconds, every minute
    ],
    ids=["row index", "ISO 8601, 5 minutes", "epoch seconds, 15 minutes", "epoch milliseconds, 1 minute"],
)
def test_a_series_samples_per_day_come_from_its_time_column(data_dir, tmp_path, t, expected):
    """What training records with the entity's drift reference (its monitor's windows are whole days at
    this rate): from `t` where it is a time, else the dataset's (the shipped sets' `t` is a row index)."""
    assert load_series("asd", "omi-1", data_dir).rows_per_day == rows_per_day("asd") == 288
    dest = _copy_entity(data_dir, tmp_path, entity="omi-1")
    (tmp_path / "mydc").mkdir()
    dest = dest.rename(tmp_path / "mydc" / "web-01")
    if t is not None:
        train = pd.read_csv(dest / "train.csv.gz")
        _rewrite(dest / "train.csv.gz", train.assign(t=t))
    assert load_series("mydc", "web-01", tmp_path).rows_per_day == expected


def test_missing_file_names_the_file(data_dir, tmp_path):
    dest = _copy_entity(data_dir, tmp_path)
    (dest / "train.csv.gz").unlink()
    with pytest.raises(TelemetryError, match=r"omi-1/train\.csv\.gz: file not found"):
        load_series("asd", "omi-1", tmp_path)


def test_missing_column_names_file_and_column(data_dir, tmp_path):
    dest = _copy_entity(data_dir, tmp_path)
    test = pd.read_csv(dest / "test.csv.gz").drop(columns=["m07"])
    _rewrite(dest / "test.csv.gz", test)
    with pytest.raises(TelemetryError, match=r"test\.csv\.gz: missing metric column\(s\) \['m07'\]"):
        load_series("asd", "omi-1", tmp_path)


def test_missing_label_column(data_dir, tmp_path):
    dest = _copy_entity(data_dir, tmp_path)
    _rewrite(dest / "test.csv.gz", pd.read_csv(dest / "test.csv.gz").drop(columns=["label"]))
    with pytest.raises(TelemetryError, match=r"test\.csv\.gz: missing column 'label'"):
        load_series("asd", "omi-1", tmp_path)


def test_nan_is_rejected_with_file_column_and_row_or_imputed_on_request(data_dir, tmp_path):
    dest = _copy_entity(data_dir, tmp_path)
    train = pd.read_csv(dest / "train.csv.gz")
    train.loc[10, "m03"] = np.nan
    _rewrite(dest / "train.csv.gz", train)
    with pytest.raises(TelemetryError, match=r"train\.csv\.gz: column 'm03' row 10: NaN"):
        load_series("asd", "omi-1", tmp_path)
    series = load_series("asd", "omi-1", tmp_path, nan_policy="ffill")
    assert series.train.loc[10, "m03"] == train.loc[9, "m03"]


def test_inf_and_text_are_rejected(tmp_path):
    path = tmp_path / "tele.csv"
    pd.DataFrame({"timestamp": [1, 2], "cpu": [0.1, np.inf]}).to_csv(path, index=False)
    with pytest.raises(TelemetryError, match=r"tele\.csv: column 'cpu' row 1: infinite"):
        load_telemetry(path)
    pd.DataFrame({"timestamp": [1, 2], "cpu": [0.1, 0.2], "mem": ["1", "x"]}).to_csv(path, index=False)
    with pytest.raises(TelemetryError, match=r"column 'mem' row 1: non-numeric value 'x'"):
        load_telemetry(path, metrics=["cpu", "mem"])


def test_generic_csv_and_parquet(tmp_path):
    frame = pd.DataFrame(
        {
            "ts": pd.date_range("2026-01-01", periods=6, freq="min").astype(str).tolist(),
            "host": ["b", "a", "b", "a", "b", "a"],
            "cpu": [1.0, 2.0, 3.0, 4.0, np.nan, 6.0],
            "mem": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        }
    )
    csv = tmp_path / "fleet.csv"
    frame.to_csv(csv, index=False)
    out = load_telemetry(csv, timestamp="ts", entity="host", nan_policy="ffill")
    assert list(out.columns) == ["timestamp", "entity", "cpu", "mem"]
    assert out["entity"].tolist() == ["a", "a", "a", "b", "b", "b"]
    assert out["cpu"].tolist() == [2.0, 4.0, 6.0, 1.0, 3.0, 3.0]  # b's NaN takes b's last value
    parquet = tmp_path / "fleet.parquet"
    frame.to_parquet(parquet)
    with pytest.raises(TelemetryError, match=r"fleet\.parquet: column 'cpu' row 4: NaN"):
        load_telemetry(parquet, timestamp="ts", entity="host")
    with pytest.raises(TelemetryError, match=r"fleet\.csv: missing timestamp column 'time'"):
        load_telemetry(csv, timestamp="time")
    single = load_telemetry(csv, timestamp="ts", entity=None, metrics=["mem"])
    assert set(single["entity"]) == {"fleet"}
