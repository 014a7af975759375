"""Telemetry loaders: the shipped SMD/ASD benchmark layout and generic CSV/Parquet telemetry.

Every loader returns plain pandas frames with metric columns of float64 and fails with a
`TelemetryError` that names the file and the column at fault.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

NanPolicy = Literal["raise", "ffill"]
DATA_ENV = "RAYWATCH_DATA"


class TelemetryError(ValueError):
    """Telemetry that cannot be used: a missing file, a missing column, NaN or inf values."""


@dataclass
class Series:
    """One entity's labelled benchmark series: train (unlabelled) and test (labelled)."""

    dataset: str
    entity: str
    train: pd.DataFrame
    test: pd.DataFrame
    labels: np.ndarray
    metrics: list[str]
    # (start_row, end_row_inclusive, [0-based metric indices]) per interpreted anomaly segment
    interpretation: list[tuple[int, int, list[int]]] = field(default_factory=list)
    # samples in one day of this series: the source's step (a Prometheus source), or the step of its `t`
    # column where that is a time (`sampled_rows_per_day`), else the dataset's (`rows_per_day`); training
    # records it with the entity's drift reference
    rows_per_day: int = 0

    def __post_init__(self) -> None:
        self.rows_per_day = int(self.rows_per_day or rows_per_day(self.dataset))

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.entity}"


# the six entities that ship with raywatch (data/README.md): its own `data/` folder, beside the packages
SHIPPED_DATA = Path(__file__).resolve().parent.parent / "data"


def default_data_dir() -> Path:
    """`RAYWATCH_DATA` if set, else the telemetry that ships with raywatch (`data/` in the project)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    if (SHIPPED_DATA / "smd").is_dir() or (SHIPPED_DATA / "asd").is_dir():
        return SHIPPED_DATA
    raise TelemetryError(
        f"no telemetry directory found: set {DATA_ENV} or pass --data (the shipped sets belong in {SHIPPED_DATA})"
    )


# samples per day of the shipped datasets (this file's README): SMD is sampled every minute, ASD every 5
# minutes; a day is the seasonal period that drift windows span and replays count in
ROWS_PER_DAY = {"smd": 1440, "asd": 288}
DEFAULT_ROWS_PER_DAY = 1440


def rows_per_day(dataset: str) -> int:
    """Samples in one day of a dataset's series (1-minute samples where the dataset is not known)."""
    return ROWS_PER_DAY.get(dataset, DEFAULT_ROWS_PER_DAY)


SECONDS_PER_DAY = 86_400
# a numeric `t` column at least this large is a time in epoch seconds (2001-09-09 on), not a row index;
# from the second bound on, in epoch milliseconds
EPOCH_SECONDS_FROM, EPOCH_MILLISECONDS_FROM = 1e9, 1e12


def rows_per_day_at(step_s: float) -> int:
    """Samples in one day of a series sampled every `step_s` seconds (at least 1)."""
    return max(1, round(SECONDS_PER_DAY / step_s))


def sampled_rows_per_day(t: pd.Series) -> int:
    """Samples per day of a series whose `t` column is a time (ISO 8601 text, epoch seconds or epoch
    milliseconds), from its median step; 0 when `t` is a row index (as in the shipped sets) or its step
    is not positive."""
    if len(t) < 2:
        return 0
    if pd.api.types.is_numeric_dtype(t):
        if not t.min() >= EPOCH_SECONDS_FROM:  # also NaN
            return 0
        seconds = t.to_numpy(dtype=np.float64) / (1000.0 if t.min() >= EPOCH_MILLISECONDS_FROM else 1.0)
    else:
        times = pd.to_datetime(t, errors="coerce", utc=True)
        if times.isna().any():
            return 0
        seconds = (times - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    step = float(np.median(np.diff(seconds)))
    return rows_per_day_at(step) if step > 0 else 0


def entity_rows_per_day(entity: str) -> int:
    """Samples in one day of an entity's series, from its dataset: the part of its name before "/"
    ("asd/omi-1"); 1-minute samples for any other name."""
    return rows_per_day(entity.partition("/")[0] if "/" in entity else "")


def list_entities(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """All (dataset, entity) pairs under a benchmark directory, sorted."""
    root = Path(data_dir) if data_dir else default_data_dir()
    if not root.is_dir():
        raise TelemetryError(f"{root}: telemetry directory does not exist")
    pairs = [
        (d.parent.name, d.name)
        for d in sorted(root.glob("*/*"))
        if d.is_dir() and any((d / f"test{x}").exists() for x in (".csv.gz", ".csv", ".parquet"))
    ]
    if not pairs:
        raise TelemetryError(f"{root}: no <dataset>/<entity>/test.csv.gz found")
    return pairs


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise TelemetryError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:  # pandas raises many types; the caller needs the file name
        raise TelemetryError(f"{path}: cannot be read as telemetry ({exc})") from exc


def validate_values(
    frame: pd.DataFrame,
    metrics: list[str],
    source: str,
    nan_policy: NanPolicy = "raise",
    group: str | None = None,
) -> pd.DataFrame:
    """Check metric columns exist and are finite; apply the NaN rule. Errors name rows by index label.

    Rule: inf is always rejected. NaN is rejected with `nan_policy="raise"`; with `"ffill"` it is
    replaced by the entity's last finite value (leading NaNs by the first finite one), and a metric
    with no finite value at all is rejected.
    """
    missing = [m for m in metrics if m not in frame.columns]
    if missing:
        raise TelemetryError(f"{source}: missing metric column(s) {missing}")
    out = frame.copy()
    for m in metrics:
        col = pd.to_numeric(out[m], errors="coerce")
        bad_text = col.isna() & out[m].notna()
        if bad_text.any():
            pos = int(np.flatnonzero(bad_text.to_numpy())[0])
            raise TelemetryError(f"{source}: column {m!r} row {out.index[pos]}: non-numeric value {out[m].iloc[pos]!r}")
        values = col.to_numpy(dtype=np.float64)
        if np.isinf(values).any():
            pos = int(np.flatnonzero(np.isinf(values))[0])
            raise TelemetryError(f"{source}: column {m!r} row {out.index[pos]}: infinite value")
        out[m] = values
    nan_mask = out[metrics].isna()
    if nan_mask.to_numpy().any():
        if nan_policy == "raise":
            col = nan_mask.any().idxmax()
            row = out.index[int(np.flatnonzero(nan_mask[col].to_numpy())[0])]
            raise TelemetryError(f"{source}: column {col!r} row {row}: NaN value (use nan_policy='ffill' to impute)")
        filled = out.groupby(group)[metrics] if group else out[metrics]
        out[metrics] = filled.ffill()
        filled = out.groupby(group)[metrics] if group else out[metrics]
        out[metrics] = filled.bfill()
        still = out[metrics].isna().any()
        if still.any():
            raise TelemetryError(f"{source}: column {still.idxmax()!r} has no finite value to impute from")
    return out


def _metric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if re.fullmatch(r"m\d+", c)]


def _parse_interpretation(path: Path, n_metrics: int) -> list[tuple[int, int, list[int]]]:
    segments = []
    if not path.exists():
        return segments
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        match = re.fullmatch(r"(\d+)-(\d+):([\d,]+)", line)
        if not match:
            raise TelemetryError(f"{path}: line {lineno}: expected 'start-end:d1,d2,...', got {line!r}")
        dims = [int(d) - 1 for d in match.group(3).split(",") if d]
        if any(d < 0 or d >= n_metrics for d in dims):
            raise TelemetryError(f"{path}: line {lineno}: metric number outside 1..{n_metrics}")
        segments.append((int(match.group(1)), int(match.group(2)), dims))
    return segments


def load_series(
    dataset: str, entity: str, data_dir: str | Path | None = None, nan_policy: NanPolicy = "raise"
) -> Series:
    """Load one entity of the SMD/ASD layout: `<dataset>/<entity>/{train,test}.csv.gz`."""
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root / dataset / entity

    def find(stem: str) -> Path:
        for suffix in (".csv.gz", ".csv", ".parquet"):
            if (folder / f"{stem}{suffix}").exists():
                return folder / f"{stem}{suffix}"
        return folder / f"{stem}.csv.gz"

    train_path, test_path = find("train"), find("test")
    train = _read_table(train_path)
    test = _read_table(test_path)
    metrics = _metric_columns(train)
    if not metrics:
        raise TelemetryError(f"{train_path}: no metric columns named m00, m01, ... found")
    if "label" not in test.columns:
        raise TelemetryError(f"{test_path}: missing column 'label'")
    train = validate_values(train, metrics, str(train_path), nan_policy)
    test = validate_values(test, metrics, str(test_path), nan_policy)
    labels = pd.to_numeric(test["label"], errors="coerce").to_numpy()
    if np.isnan(labels).any() or not np.isin(labels, (0, 1)).all():
        raise TelemetryError(f"{test_path}: column 'label' must hold only 0 and 1")
    return Series(
        dataset=dataset,
        entity=entity,
        train=train[["t", *metrics]] if "t" in train.columns else train[metrics],
        test=test[["t", *metrics]] if "t" in test.columns else test[metrics],
        labels=labels.astype(np.int8),
        metrics=metrics,
        interpretation=_parse_interpretation(folder / "interpretation.txt", len(metrics)),
        rows_per_day=sampled_rows_per_day(train["t"]) if "t" in train.columns else 0,  # 0: the dataset's
    )


def load_benchmark(
    data_dir: str | Path | None = None, entities: list[str] | None = None, nan_policy: NanPolicy = "raise"
) -> list[Series]:
    """Every entity under `data_dir` (or those named as `dataset/entity` or `entity`)."""
    pairs = list_entities(data_dir)
    if entities:
        wanted = set(entities)
        unknown = wanted - {f"{d}/{e}" for d, e in pairs} - {e for _, e in pairs}
        if unknown:
            raise TelemetryError(f"unknown entities {sorted(unknown)}; available: {[f'{d}/{e}' for d, e in pairs]}")
        pairs = [(d, e) for d, e in pairs if e in wanted or f"{d}/{e}" in wanted]
    return [load_series(d, e, data_dir, nan_policy) for d, e in pairs]


def load_telemetry(
    path: str | Path,
    timestamp: str = "timestamp",
    entity: str | None = "entity",
    metrics: list[str] | None = None,
    nan_policy: NanPolicy = "raise",
) -> pd.DataFrame:
    """Generic telemetry from CSV or Parquet: a timestamp column, metric columns, an optional entity.

    Returns a frame with columns `timestamp`, `entity`, then the metrics, sorted by entity and time.
    A file without the entity column is treated as one entity named after the file.
    """
    path = Path(path)
    frame = _read_table(path)
    source = str(path)
    if timestamp not in frame.columns:
        raise TelemetryError(f"{source}: missing timestamp column {timestamp!r}; columns are {list(frame.columns)}")
    ts = frame[timestamp]
    if not pd.api.types.is_numeric_dtype(ts):
        ts = pd.to_datetime(ts, errors="coerce", utc=True)
        if ts.isna().any():
            row = int(np.flatnonzero(ts.isna().to_numpy())[0])
            raise TelemetryError(f"{source}: column {timestamp!r} row {row}: not a timestamp")
    frame = frame.assign(**{timestamp: ts})
    if entity and entity in frame.columns:
        frame[entity] = frame[entity].astype(str)
        ent_col = entity
    else:
        ent_col = "entity"
        frame[ent_col] = path.name.split(".")[0]
    if metrics is None:
        metrics = [
            c for c in frame.columns if c not in (timestamp, ent_col) and pd.api.types.is_numeric_dtype(frame[c])
        ]
        if not metrics:
            raise TelemetryError(f"{source}: no numeric metric columns besides {timestamp!r}")
    # sorted but not re-indexed before validation, so errors name the row of the file
    frame = frame.sort_values([ent_col, timestamp], kind="stable")
    frame = validate_values(frame, metrics, source, nan_policy, group=ent_col).reset_index(drop=True)
    out = frame[[timestamp, ent_col, *metrics]].rename(columns={timestamp: "timestamp", ent_col: "entity"})
    log.info("loaded telemetry", extra={"path": source, "rows": len(out), "metrics": len(metrics)})
    return out
