"""Synthetic fleet telemetry with labelled incidents (and their root-cause metrics), plus a drift injector.

Deterministic by seed. The normal behaviour and the incidents draw from separate random streams,
so `generate_fleet(seed=s, incidents=False)` is exactly the incident-free counterfactual of
`generate_fleet(seed=s)`: the difference between the two is the incidents' effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

# metric: (typical level, daily amplitude as a share of the level, noise std, lower, upper bound)
METRICS: dict[str, tuple[float, float, float, float, float]] = {
    "cpu": (35.0, 0.45, 3.0, 0.0, 100.0),  # percent
    "memory": (55.0, 0.08, 1.5, 0.0, 100.0),  # percent
    "disk_io": (40.0, 0.40, 4.0, 0.0, np.inf),  # MB/s
    "disk_usage": (50.0, 0.0, 0.3, 0.0, 100.0),  # percent
    "network_in": (120.0, 0.50, 8.0, 0.0, np.inf),  # Mbit/s
    "network_out": (90.0, 0.50, 6.0, 0.0, np.inf),  # Mbit/s
    "latency_p99": (180.0, 0.20, 10.0, 0.0, np.inf),  # ms
    "error_rate": (0.5, 0.10, 0.1, 0.0, 100.0),  # percent
    "request_rate": (800.0, 0.50, 30.0, 0.0, np.inf),  # requests/s
    "db_query_time": (25.0, 0.25, 2.0, 0.0, np.inf),  # ms
}

# incident kind -> the metrics it moves: (shape, change in multiples of that metric's noise std)
INCIDENT_KINDS: dict[str, dict[str, tuple[str, float]]] = {
    "memory_leak": {"memory": ("ramp", 18.0), "latency_p99": ("ramp", 4.0)},
    "cpu_saturation": {"cpu": ("step", 15.0), "latency_p99": ("step", 6.0), "request_rate": ("step", -4.0)},
    "disk_full": {"disk_usage": ("ramp", 120.0), "disk_io": ("step", 6.0), "error_rate": ("ramp", 8.0)},
    "network_latency": {"latency_p99": ("step", 12.0), "network_in": ("step", -5.0), "network_out": ("step", -5.0)},
    "deployment_failure": {"error_rate": ("step", 40.0), "request_rate": ("step", -8.0), "cpu": ("step", -4.0)},
    "db_slow": {"db_query_time": ("step", 15.0), "latency_p99": ("step", 8.0)},
}


@dataclass(frozen=True)
class Incident:
    entity: str
    kind: str
    start: int  # row index within the entity
    stop: int  # exclusive
    metrics: tuple[str, ...]  # its root cause: the metrics it moves


@dataclass
class Fleet:
    frame: pd.DataFrame  # timestamp, entity, <metrics>, label, incident_kind
    incidents: list[Incident]
    metrics: list[str]


def _shape(kind: str, length: int) -> np.ndarray:
    if kind == "ramp":
        return np.linspace(1.0 / length, 1.0, length)
    return np.ones(length)


def generate_fleet(
    n_machines: int = 4,
    n_steps: int = 4320,
    step_seconds: int = 60,
    metrics: list[str] | None = None,
    incidents_per_machine: int = 4,
    incident_length: tuple[int, int] = (30, 120),
    kinds: list[str] | None = None,
    incidents: bool = True,
    seed: int = 0,
    start: str = "2026-01-01",
) -> Fleet:
    """N machines x M named metrics with daily seasonality, noise, and labelled incidents."""
    metrics = list(metrics or METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown synthetic metrics {unknown}; choose from {list(METRICS)}")
    kinds = list(kinds or INCIDENT_KINDS)
    bad = [k for k in kinds if k not in INCIDENT_KINDS]
    if bad:
        raise ValueError(f"unknown incident kinds {bad}; choose from {list(INCIDENT_KINDS)}")
    kinds = [k for k in kinds if set(INCIDENT_KINDS[k]) & set(metrics)]
    base_rng, incident_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    steps_per_day = 86_400 / step_seconds
    t = np.arange(n_steps)
    timestamps = pd.date_range(start, periods=n_steps, freq=pd.Timedelta(seconds=step_seconds), tz="UTC")
    frames, all_incidents = [], []
    for i in range(n_machines):
        entity = f"machine-{i:02d}"
        phase = base_rng.uniform(0, 2 * np.pi)
        load = np.sin(2 * np.pi * t / steps_per_day + phase)  # shared daily cycle of this machine
        values: dict[str, np.ndarray] = {}
        for m in metrics:
            level, amp, noise, *_ = METRICS[m]
            level = level * base_rng.uniform(0.8, 1.2)
            values[m] = level * (1 + amp * load) + base_rng.normal(0, noise, n_steps)
        if "disk_usage" in values:  # disks fill slowly
            values["disk_usage"] += np.linspace(0, base_rng.uniform(2, 6), n_steps)
        label = np.zeros(n_steps, dtype=np.int8)
        kind_col = np.array([""] * n_steps, dtype=object)
        if incidents and kinds:
            for inc in _place_incidents(
                entity, n_steps, incidents_per_machine, incident_length, kinds, metrics, incident_rng
            ):
                for m in inc.metrics:
                    shape, size = INCIDENT_KINDS[inc.kind][m]
                    values[m][inc.start : inc.stop] += size * METRICS[m][2] * _shape(shape, inc.stop - inc.start)
                label[inc.start : inc.stop] = 1
                kind_col[inc.start : inc.stop] = inc.kind
                all_incidents.append(inc)
        for m in metrics:
            lower, upper = METRICS[m][3], METRICS[m][4]
            values[m] = np.clip(values[m], lower, upper)
        frames.append(
            pd.DataFrame(
                {"timestamp": timestamps, "entity": entity, **values, "label": label, "incident_kind": kind_col}
            )
        )
    return Fleet(frame=pd.concat(frames, ignore_index=True), incidents=all_incidents, metrics=metrics)


def _place_incidents(
    entity: str,
    n_steps: int,
    count: int,
    length: tuple[int, int],
    kinds: list[str],
    metrics: list[str],
    rng: np.random.Generator,
) -> list[Incident]:
    """Non-overlapping incidents after the first 10% of the series, with a gap between them."""
    placed: list[Incident] = []
    earliest = n_steps // 10
    for _ in range(count * 20):
        if len(placed) == count:
            break
        size = int(rng.integers(length[0], length[1] + 1))
        begin = int(rng.integers(earliest, max(earliest + 1, n_steps - size)))
        if any(begin < p.stop + length[1] and p.start < begin + size + length[1] for p in placed):
            continue
        kind = kinds[int(rng.integers(len(kinds)))]
        moved = tuple(m for m in INCIDENT_KINDS[kind] if m in metrics)
        placed.append(Incident(entity, kind, begin, begin + size, moved))
    return sorted(placed, key=lambda p: p.start)


def inject_incidents(
    X: np.ndarray,
    count: int,
    length: tuple[int, int] = (30, 120),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of one entity's (rows, metrics) telemetry with `count` incidents in the generator's shapes.

    Each incident takes a kind of INCIDENT_KINDS and moves as many randomly chosen columns as that kind
    moves metrics, with the kind's shapes (step or ramp) and sizes in multiples of each column's own
    standard deviation. For telemetry whose metric names are unknown (e.g. anonymised m00, m01, ...).
    Returns (telemetry, labels).
    """
    X = np.array(X, dtype=np.float64)
    # room for every incident and the gaps between them: shorten incidents on a short series
    longest = min(length[1], len(X) // (4 * max(count, 1)))
    if longest < 5:
        raise ValueError(f"{len(X)} rows are too few to inject {count} incidents into")
    length = (min(length[0], longest), longest)
    rng = np.random.default_rng(seed)
    spread = np.maximum(X.std(axis=0), 1e-3)  # a column constant here still moves
    labels = np.zeros(len(X), dtype=np.int8)
    placed = _place_incidents("entity", len(X), count, length, list(INCIDENT_KINDS), list(METRICS), rng)
    for inc in placed:
        columns = rng.choice(X.shape[1], size=min(len(inc.metrics), X.shape[1]), replace=False)
        for column, metric in zip(columns, inc.metrics):
            shape, size = INCIDENT_KINDS[inc.kind][metric]
            X[inc.start : inc.stop, column] += size * spread[column] * _shape(shape, inc.stop - inc.start)
        labels[inc.start : inc.stop] = 1
    return X, labels


DriftKind = Literal["mean_shift", "variance", "seasonality"]


def inject_drift(
    frame: pd.DataFrame,
    kind: DriftKind,
    metrics: list[str],
    start: int | pd.Timestamp,
    magnitude: float = 1.0,
    period: int = 60,
    entity_col: str | None = "entity",
    seed: int = 0,
) -> pd.DataFrame:
    """A copy of `frame` with drift on `metrics` from `start` on (a row position within each entity,
    or a timestamp compared with the `timestamp` column).

    mean_shift: + magnitude x the metric's pre-drift std. variance: deviations from the pre-drift
    mean scaled so the variance is multiplied by `magnitude`. seasonality: + a sine of `period` rows
    with amplitude magnitude x the pre-drift std. Labels are left as they are.
    """
    if kind not in ("mean_shift", "variance", "seasonality"):
        raise ValueError(f"unknown drift kind {kind!r}; choose mean_shift, variance or seasonality")
    missing = [m for m in metrics if m not in frame.columns]
    if missing:
        raise ValueError(f"inject_drift: metrics {missing} are not columns of the frame")
    if kind == "variance" and magnitude <= 0:
        raise ValueError("inject_drift: a variance factor must be > 0")
    rng = np.random.default_rng(seed)
    out = frame.copy()
    groups = (
        out.groupby(entity_col, sort=False).indices.values()
        if entity_col and entity_col in out
        else [np.arange(len(out))]
    )
    for idx in groups:
        if isinstance(start, (int, np.integer)):
            after = idx[start:]
            before = idx[:start]
        else:
            ts = pd.to_datetime(out["timestamp"].to_numpy()[idx], utc=True)
            mask = ts >= pd.Timestamp(start).tz_localize("UTC") if pd.Timestamp(start).tzinfo is None else ts >= start
            after, before = idx[mask], idx[~mask]
        if len(after) == 0 or len(before) < 2:
            continue
        for m in metrics:
            col = out.columns.get_loc(m)
            ref = out.iloc[before, col].to_numpy(dtype=np.float64)
            x = out.iloc[after, col].to_numpy(dtype=np.float64)
            std = ref.std() or 1e-6
            if kind == "mean_shift":
                x = x + magnitude * std
            elif kind == "variance":
                x = ref.mean() + (x - ref.mean()) * np.sqrt(magnitude)
            else:
                phase = rng.uniform(0, 2 * np.pi)
                x = x + magnitude * std * np.sin(2 * np.pi * np.arange(len(x)) / period + phase)
            out.iloc[after, col] = x
    return out


def shifted_metrics(metrics: list[str], share: float = 0.1, seed: int = 0) -> list[str]:
    """The metrics a mean shift moves: `share` of them (at least one), by a seeded draw, so that every
    replay of the same series (a loop and its static control, a rerun) moves the same ones."""
    count = max(1, round(share * len(metrics)))
    picked = np.random.default_rng(seed).choice(len(metrics), size=count, replace=False)
    return [metrics[i] for i in sorted(picked)]


def inject_mean_shift(
    values: np.ndarray, metrics: list[str], start: int, sigma: float = 2.0, share: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """One entity's (rows, metrics) telemetry with a persistent mean shift from row `start` on: +`sigma`
    pre-shift standard deviations on `share` of the metrics (`inject_drift`'s mean_shift), the change
    after which a static model floods its operators. Returns (a copy of the rows, the moved metrics)."""
    moved = shifted_metrics(metrics, share, seed)
    frame = pd.DataFrame(np.asarray(values, dtype=np.float64), columns=metrics)
    out = inject_drift(frame, "mean_shift", moved, start, magnitude=sigma, entity_col=None, seed=seed)
    return out.to_numpy(dtype=np.float64), moved


def machine_days(
    days: int, seed: int = 7, exclude: tuple[str, ...] = ("disk_usage",), steps_per_day: int = 1440
) -> tuple[str, list[str], np.ndarray]:
    """One synthetic machine without incidents, `days` days of 1-minute samples: (entity, metrics, rows).
    `disk_usage` is left out by default: its fill trend is a distribution change by construction."""
    metrics = [m for m in METRICS if m not in exclude]
    fleet = generate_fleet(n_machines=1, n_steps=days * steps_per_day, metrics=metrics, incidents=False, seed=seed)
    return str(fleet.frame["entity"].iloc[0]), metrics, fleet.frame[metrics].to_numpy()
