"""Fleet models: one sequence model per metric schema, trained across many entities, that scores an entity
it has never seen from its first rows (cold start).

A fleet model cannot learn one entity's units, so every window it reads is put in the entity's own units
first: centred on the entity's median and divided by its robust spread, per metric (`EntityStats`).
They come from its first rows at a few checkpoints (1, 4, 16, 64 and 192 rows; every third row for the
last) and are then frozen: a window uses those of the last checkpoint before it starts, so an incident
cannot hide itself by moving them, and an entity's state is a few numbers per metric. While an entity
has few rows, its spread is shrunk toward the fleet's typical spread of the metric (`prior_scale`,
`prior_rows` pseudo-rows), so its first windows are neither blown up nor silent. Freezing beat
statistics that keep following the entity (a step per 64-row block): on the six shipped entities, a fleet
model trained on the other entities of its schema scored each one's test split from its first row with a
mean PR-AUC of 0.39 frozen at 192 rows (0.41 from all 192 rather than every third), 0.36 at 64 rows,
0.34 at 576 and 0.27 following (one training seed each: differences of a few hundredths are noise).

`WindowNormaliser.series_windows` (training, evaluation: every row of a series) and `tail_windows`
(serving: the last rows, with the entity's `EntityStats` and the position of the rows in its life)
compute the same windows. The ingress keeps each entity's row count, checkpoint statistics and, while
it is young, its sample rows (`Sampler`, in `serve.history.ColdStarts`), so a request carries only the
rows the model reads. A fleet model lives in a
detector kind's bundle beside the per-entity ones, under `fleet_key(metrics)`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from detect.features import FeatureSpec, entity_windows, tail_windows

FLEET_PREFIX = "fleet:"
CHECKPOINTS = (1, 4, 16, 64, 192)  # an entity's statistics come from its first rows at these counts, then freeze
SAMPLE_ROWS = 64  # rows behind a checkpoint's statistics at most (every stride-th row of a long one)
# a new entity's threshold: from this many of its own first scores on, the larger of the fleet model's and
# their OWN_QUANTILE (the rule every detector's threshold follows on its validation scores), learnt from
# unlabelled scores only
OWN_THRESHOLD_ROWS = 720
OWN_QUANTILE = 0.99
MAX_WINDOW = 64  # the longest window a fleet model reads (a request needs the boundaries of its windows only)
IQR_TO_SIGMA = 1.349  # the interquartile range of a normal distribution, in standard deviations


def fleet_key(metrics: Iterable[str]) -> str:
    """The bundle key of the fleet model for a metric schema: the same names in any order give the same key."""
    return _schema_key(tuple(metrics))


@functools.lru_cache(maxsize=1024)  # asked for every row of a snapshot: a few schemas, many rows
def _schema_key(metrics: tuple[str, ...]) -> str:
    names = sorted(metrics)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return f"{FLEET_PREFIX}{len(names)}m-{digest}"


def is_fleet_key(key: str | None) -> bool:
    return bool(key) and key.startswith(FLEET_PREFIX)


def named(entities: Sequence[str], shown: int = 5) -> str:
    """Entities for a log line or a decision's reason: the first `shown` by name, then how many more (a
    fleet's list can be thousands long)."""
    more = len(entities) - shown
    return ", ".join(entities[:shown]) + (f" and {more} more" if more > 0 else "")


def robust_stats(rows: np.ndarray) -> np.ndarray:
    """(2, M): the median and robust spread (interquartile range / 1.349) of each metric of `rows`."""
    q25, q50, q75 = np.percentile(np.asarray(rows, dtype=np.float64), [25, 50, 75], axis=0)
    return np.stack([q50, (q75 - q25) / IQR_TO_SIGMA])


def stride(checkpoint: int) -> int:
    """Every stride-th row of an entity's first `checkpoint` rows gives its statistics there: at most
    SAMPLE_ROWS rows each, so the ingress keeps a few dozen rows per young entity, not a day of them."""
    return max(1, checkpoint // SAMPLE_ROWS)


@dataclass
class EntityStats:
    """An entity's statistics at the checkpoints it has reached: after `rows[k]` rows from its first one,
    the median and robust spread of (every `stride`-th of) those rows were `values[k]` ((2, M)). A window
    starting at row s (0: the first row) uses the last checkpoint at or before max(s, 1): every row
    behind its statistics precedes it (the first row itself for the first windows); after the last
    checkpoint they are frozen."""

    rows: np.ndarray  # (K,) int, ascending, a prefix of CHECKPOINTS
    values: np.ndarray  # (K, 2, M)

    @classmethod
    def of_series(cls, values: np.ndarray) -> EntityStats:
        """The checkpoints a series from its first row reaches."""
        values = np.asarray(values, dtype=np.float64)
        reached = [c for c in CHECKPOINTS if c <= len(values)]
        stats = [robust_stats(values[: c : stride(c)]) for c in reached]
        return cls(np.array(reached, dtype=np.int64), np.stack(stats) if stats else np.zeros((0, 2, values.shape[1])))

    def for_windows_from(self, start: int) -> EntityStats:
        """The checkpoints that windows starting at row `start` or later can use (what a request sends)."""
        first = max(int(np.searchsorted(self.rows, max(start, 1), side="right")) - 1, 0)
        return EntityStats(self.rows[first:], self.values[first:])


def own_thresholds(scores: np.ndarray, fleet_threshold: float) -> np.ndarray:
    """Per row of an entity's scores from its first: the threshold in force (the batch path of
    `OwnThreshold`): the fleet model's for the first OWN_THRESHOLD_ROWS rows, then the larger of it and the
    OWN_QUANTILE of those rows' scores. A fleet threshold learnt on other machines floods some new ones
    (on two of the six shipped entities it flagged 89% and 100% of the rows); this one does not learn from
    labels, only from the entity's own first scores."""
    out = np.full(len(scores), float(fleet_threshold))
    if len(scores) > OWN_THRESHOLD_ROWS:
        first = np.asarray(scores[:OWN_THRESHOLD_ROWS], dtype=np.float64)
        out[OWN_THRESHOLD_ROWS:] = max(float(fleet_threshold), float(np.quantile(first, OWN_QUANTILE)))
    return out


class OwnThreshold:
    """`own_thresholds` as serving keeps it for one new entity, with the same thresholds: of its first
    OWN_THRESHOLD_ROWS scores only the largest TAIL_ROWS, all that their OWN_QUANTILE reads, in one small
    array updated in place (a few hundred bytes a young entity, not 720 scores; nothing allocated per
    request outlives it), then one number. The threshold changes between requests: a request's rows share
    the one in force when it came."""

    __slots__ = ("_largest", "_seen", "value")

    #: the quantile interpolates between the sorted scores at positions floor(h) and floor(h) + 1,
    #: h = (OWN_THRESHOLD_ROWS - 1) x OWN_QUANTILE: the largest this many scores hold both
    TAIL_ROWS = OWN_THRESHOLD_ROWS - int((OWN_THRESHOLD_ROWS - 1) * OWN_QUANTILE)

    def __init__(self) -> None:
        self._largest: np.ndarray | None = np.full(self.TAIL_ROWS, -np.inf)  # -inf: not a score yet
        self._seen, self.value = 0, None

    @property
    def kept(self) -> int:
        """Scores held while it learns (TAIL_ROWS; 0 once learnt)."""
        return 0 if self._largest is None else len(self._largest)

    def observe(self, scores: np.ndarray, fleet_threshold: float) -> float:
        """The threshold for a request's rows with these `scores`; counts them toward learning it."""
        threshold = float(fleet_threshold) if self.value is None else max(self.value, float(fleet_threshold))
        if self._largest is not None:
            take = np.asarray(scores, dtype=np.float64)[: OWN_THRESHOLD_ROWS - self._seen]
            if len(take) == 1:  # a snapshot's one row: it replaces the smallest held if larger (no new array)
                smallest = int(self._largest.argmin())
                if not take[0] <= self._largest[smallest]:  # NaN too, as `np.partition` sorts it last
                    self._largest[smallest] = take[0]
            else:
                held = np.concatenate([self._largest, take])
                self._largest[:] = np.partition(held, len(take))[len(take) :]  # the largest TAIL_ROWS of both
            self._seen += len(take)
            if self._seen == OWN_THRESHOLD_ROWS:
                self.value, self._largest = self._quantile(), None
        return threshold

    def _quantile(self) -> float:
        return self.learnt_from(self._largest)

    @classmethod
    def learnt_from(cls, largest: np.ndarray) -> float:
        """OWN_QUANTILE of the first OWN_THRESHOLD_ROWS scores, from their largest TAIL_ROWS: the smaller ones
        stand in as copies of the smallest kept, which leaves the sorted positions the quantile reads as
        they were."""
        below = np.full(OWN_THRESHOLD_ROWS - cls.TAIL_ROWS, largest.min())
        return float(np.quantile(np.concatenate([below, largest]), OWN_QUANTILE))

    def state(self) -> tuple[np.ndarray | None, int, float | None]:
        """(the largest scores held while it learns, or None; scores seen; the learnt value, or None)."""
        return self._largest, self._seen, self.value

    @classmethod
    def of_state(cls, largest: np.ndarray | None, seen: int, value: float | None) -> OwnThreshold:
        """The threshold `state` describes (its arrays copied)."""
        out = cls()
        out._largest = None if largest is None else np.array(largest, dtype=np.float64)
        out._seen, out.value = int(seen), value
        return out


class Sampler:
    """What the ingress keeps of a young entity for its coming checkpoints: each checkpoint's sample rows
    (every `stride(c)`-th row before it) as they arrive, in one array allocated at its first row and
    dropped at its last checkpoint (no small object per row to outlive a request). `add` returns the
    statistics with the checkpoints the new rows complete; a grown entity's sampler holds nothing."""

    __slots__ = ("rows", "_samples", "_reached", "_stats_values")

    #: where each checkpoint's sample rows start in the array, and how many it takes
    _SIZES = tuple(len(range(0, c, stride(c))) for c in CHECKPOINTS)
    _STARTS = tuple(int(x) for x in np.cumsum((0,) + _SIZES[:-1]))
    #: the checkpoints as an array, shared by every sampler's statistics (read-only)
    _CHECKPOINT_ROWS = np.array(CHECKPOINTS, dtype=np.int64)
    _CHECKPOINT_ROWS.flags.writeable = False

    def __init__(self, metrics: int) -> None:
        self.rows, self._reached = 0, 0
        self._samples: np.ndarray | None = np.empty((sum(self._SIZES), metrics))
        # every checkpoint's statistics, allocated at the first row: nothing of the entity's is allocated later,
        # while some later request's short-lived objects are about
        self._stats_values = np.zeros((len(CHECKPOINTS), 2, metrics))

    @property
    def stats(self) -> EntityStats:
        """The statistics at the checkpoints reached (views: made per call, kept by nothing)."""
        return EntityStats(self._CHECKPOINT_ROWS[: self._reached], self._stats_values[: self._reached])

    @classmethod
    def grown(cls, rows: int, stats_values: np.ndarray) -> Sampler:
        """A grown entity's sampler: `rows` seen, every checkpoint's statistics `stats_values` ((K, 2, M))."""
        out = cls(stats_values.shape[2])
        out.rows, out._reached, out._samples = int(rows), len(CHECKPOINTS), None
        out._stats_values[:] = stats_values
        return out

    @property
    def held_bytes(self) -> int:
        """Bytes of sample rows it holds: one array of each checkpoint's rows while young, 0 once grown."""
        return 0 if self._samples is None else self._samples.nbytes

    def add(self, new: np.ndarray) -> EntityStats:
        if self._samples is not None:
            index = np.arange(self.rows, self.rows + len(new))
            for k, c in enumerate(CHECKPOINTS):
                if c <= self.rows:
                    continue  # reached before these rows
                take = np.flatnonzero((index < c) & (index % stride(c) == 0))
                at = self._STARTS[k] + -(-self.rows // stride(c))  # rows 0, stride, ... before self.rows: taken
                self._samples[at : at + len(take)] = new[take]
                if self.rows + len(new) >= c:
                    sample = self._samples[self._STARTS[k] : self._STARTS[k] + self._SIZES[k]]
                    self._stats_values[k] = robust_stats(sample)
                    self._reached = k + 1
            if self.rows + len(new) >= CHECKPOINTS[-1]:
                self._samples = None
        self.rows += len(new)
        return self.stats


def as_deviations(rows: np.ndarray, stats_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grown entities' rows as a fleet model reads them, for a call: their deviations from their centre in
    float32, and their statistics with a centre of 0. `rows` (k, R, M) are each entity's context and new
    row, `stats_values` (k, 1, 2, M) its one (frozen) checkpoint. A fleet model reads rows only as
    (row - centre) / scale, so it scores both alike, to float32's rounding of each deviation (a relative
    6e-8 of the move, not of the level: a metric at 5e11 that moves by 10 keeps its moves, which float32
    levels would round away), in half the bytes through Ray's object store."""
    if stats_values.ndim != 4 or stats_values.shape[1] != 1:
        raise ValueError(f"deviations take (k, 1, 2, M) statistics (one checkpoint each), not {stats_values.shape}")
    deviations = (rows - stats_values[:, 0, 0][:, None, :]).astype(np.float32)
    centred = stats_values.copy()
    centred[:, :, 0] = 0.0
    return deviations, centred


@dataclass
class WindowNormaliser:
    """Puts each window of an entity's series in that entity's units (see the module docstring)."""

    prior_scale: np.ndarray  # (M,) the fleet's typical robust spread of each metric
    prior_rows: int = 16  # weight of the prior spread, in rows
    floor: float = 1e-3  # smallest scale: a metric constant everywhere must not blow up

    @classmethod
    def fit(cls, series: Sequence[np.ndarray], prior_rows: int = 16) -> WindowNormaliser:
        """The prior from training series of many entities: each metric's median, across them, of its spread
        at the end of their series (a grown entity's: what a new one's is shrunk toward)."""
        if not series:
            raise ValueError("a fleet normaliser needs at least one entity's series")
        spreads = np.stack([EntityStats.of_series(X).values[-1, 1] for X in series])
        return cls(np.maximum(np.median(spreads, axis=0), 1e-3), prior_rows)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"fleet_prior_scale": self.prior_scale, "fleet_params": np.array([self.prior_rows, self.floor])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> WindowNormaliser | None:
        if "fleet_prior_scale" not in arrays:
            return None
        prior_rows, floor = arrays["fleet_params"].tolist()
        return cls(np.asarray(arrays["fleet_prior_scale"], dtype=np.float64), int(prior_rows), floor)

    def _normalised(self, windows: np.ndarray, starts: np.ndarray, stats: EntityStats) -> np.ndarray:
        """Windows (k, W, M) starting at rows `starts` (of the entity's life), each in the units of its checkpoint."""
        pick = np.searchsorted(stats.rows, np.maximum(starts, 1), side="right") - 1
        if pick.min() < 0:
            raise ValueError(f"no statistics for windows starting at row {int(starts.min())}: checkpoints {stats.rows}")
        centre, scale = stats.values[pick, 0], self.scale(stats.values[pick, 1], stats.rows[pick])
        return ((windows - centre[:, None, :]) / scale[:, None, :]).astype(np.float32)

    def scale(self, spread: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(k, M) scales from spreads measured on `rows` rows each, shrunk toward the prior."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 1)
        weight = self.prior_rows
        return np.maximum(np.sqrt((rows * spread**2 + weight * self.prior_scale**2) / (rows + weight)), self.floor)

    def series_windows(self, values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
        """Every row's window of one entity's (T, M) series from its first row, normalised: (T, W, M)."""
        values = np.asarray(values, dtype=np.float64)
        windows = entity_windows(values, spec, dtype=np.float64)
        starts = np.arange(len(values)) - spec.window + 1
        return self._normalised(windows, starts, EntityStats.of_series(values))

    def tail_windows(
        self, values: np.ndarray, spec: FeatureSpec, n: int, stats: EntityStats | None = None, offset: int = 0
    ) -> np.ndarray:
        """The windows of the last `n` rows, normalised: equal to `series_windows(series)[-n:]` when `values`
        are rows `offset`.. of the series and `stats` its statistics (at least the checkpoints these windows
        use); without `stats`, `values` is the series from its first row."""
        values = np.asarray(values, dtype=np.float64)
        if spec.window > MAX_WINDOW:
            raise ValueError(f"a fleet model reads windows of at most {MAX_WINDOW} rows, not {spec.window}")
        windows = tail_windows(values, spec, n, spec.window)
        starts = offset + np.arange(len(values) - n, len(values)) - spec.window + 1
        return self._normalised(windows, starts, stats if stats is not None else EntityStats.of_series(values))
