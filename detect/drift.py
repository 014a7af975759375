"""Drift statistics for the drift monitors: per-entity alibi-detect tests on served inputs and anomaly
scores, concept drift from feedback labels, and the reference sample a model version keeps for them.
(The durable log of drift events and monitor state is `monitoring/events.py`.)

Telemetry is autocorrelated and seasonal, and a two-sample test assumes independent rows from one
distribution on each side. Tested naively (200 consecutive rows against a reference), a window that
sees only the afternoon peak differs from a reference that holds the whole day, and 200 neighbouring
rows carry far less information than 200 independent ones: the test "finds" drift in most windows.
The choices that keep false drift rare (measured in benchmarks/drift.py):

- The reference must span the seasonal cycle and the training period: `reference_sample` takes rows
  evenly spaced across the whole training series (not its last rows), and the MMD subsample of it is
  evenly spaced too, so every time of day is represented.
- A test window spans one seasonal period and is thinned: the monitor hands in `config.span`
  (= window x thin) consecutive served rows and every `thin`-th is kept (default 240 rows kept of
  1,440, one day of 1-minute samples; `entity_drift_config` sets it from an entity's sampling rate).
  Covering the whole period makes the window's marginal distribution comparable with the reference's;
  thinning removes most short-range autocorrelation and keeps each test cheap. The price is latency:
  one test per period, so "within 2 windows" means within two days at the default.
- Bonferroni correction across features (or BH FDR) for the per-feature KS tests, and a per-test
  level of 0.005 rather than 0.05: a monitor tests every window forever, and at 0.05 one window in 20
  would raise a false alarm even on independent data. MMD uses 200 permutations so that its smallest
  attainable p-value (0) occurs with probability 1/201 under no drift.
- MMD runs on features standardised with the reference's mean and std (constant metrics get scale 1),
  so no metric dominates the kernel by its units; the RBF bandwidth is the median heuristic on the
  reference.

- Even so, two normal days of a real machine differ by more than independent rows allow, so the
  iid p-values alone flag most real days. Each model version therefore stores a per-entity
  calibration with its reference (`drift_reference` -> `DriftReference`): the tests' null distribution
  is measured on the entity's own training windows (leave one window out) and the decision uses it
  (`detect/drift_calibration.py` says how). Without one (too little training history, a reference
  reset through the admin API, a bundle from before calibration) the iid decision applies.

What this does not fix: slow trends and level changes beyond those seen in the training data (a disk
that fills further, a service that was re-deployed) are real distribution change, and the tests report
them.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from detect.config import config_from_dict
from detect.data import entity_rows_per_day
from detect.drift_calibration import DriftCalibration, critical_distance, fit_scale

log = logging.getLogger(__name__)

# what alibi-detect 0.13 takes from HuggingFace transformers when it is imported (text embeddings, saving
# tokenizers); raywatch uses neither
_TRANSFORMERS_NAMES = ("AutoConfig", "AutoModel", "AutoTokenizer", "PreTrainedTokenizerBase", "TFAutoModel")


def alibi(module: str) -> types.ModuleType:
    """`alibi_detect.<module>`, imported without loading HuggingFace transformers.

    alibi-detect imports transformers with its package, for text embeddings and for saving tokenizers,
    which raywatch never uses; that import is most of alibi-detect's import time (7.7 s against 1.3 s on
    the 2-core CI machine once torch is loaded), paid by every process that builds a drift detector: each
    drift monitor, training and retraining job. While alibi-detect's package loads, `transformers` is a
    stand-in whose classes refuse to be used; it is removed afterwards, so the real package stays
    importable. Where transformers is already loaded, alibi-detect gets it."""
    if "alibi_detect" in sys.modules or "transformers" in sys.modules:
        return importlib.import_module(f"alibi_detect.{module}")
    stand_in = types.ModuleType("transformers", "a stand-in while alibi-detect imports (detect.drift.alibi)")
    for name in _TRANSFORMERS_NAMES:
        setattr(stand_in, name, type(name, (_NotLoaded,), {}))
    sys.modules["transformers"] = stand_in
    try:
        return importlib.import_module(f"alibi_detect.{module}")
    finally:
        if sys.modules.get("transformers") is stand_in:
            del sys.modules["transformers"]


class _NotLoaded:
    REFUSAL = "raywatch imports alibi-detect without transformers (detect.drift.alibi)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError(self.REFUSAL)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(cls.REFUSAL)


DetectorName = Literal["ks", "mmd", "prediction_ks", "concept"]
DETECTORS: tuple[str, ...] = ("ks", "mmd", "prediction_ks", "concept")


@dataclass
class DriftConfig:
    """Parameters of every drift test of one monitor; `span` served rows make one test window."""

    window: int = 240  # rows per input/score test, after thinning
    thin: int = 6  # keep every thin-th served row: one test spans window x thin rows (one day at 1 minute)
    p_value: float = 0.005  # per-test level (KS: family-wise after the correction)
    correction: Literal["bonferroni", "fdr"] = "bonferroni"
    use_mmd: bool = True
    mmd_permutations: int = 200
    mmd_max_reference: int = 300
    mmd_attribution_sigma: float = 0.5  # MMD names features whose mean moved at least this many reference stds
    score_bins: int = 20  # shared histogram bins for the Jensen-Shannon divergence of scores
    min_rows: int = 50  # fewest rows a reference or a (thinned) window may have
    concept_margin: float = 0.05  # precision/recall drop (absolute) that counts as concept drift
    min_labels: int = 50  # fewest labelled rows for a concept-drift test
    seed: int = 0  # seeds the MMD permutations, so a window always gets the same p-value
    calibration_min_windows: int = 3  # fewest whole training windows (days) a calibration is fitted from
    calibration_confidence: float = 0.99  # the fitted null scales are upper confidence bounds at this level
    # calibrated KS: a feature counts only if it also moved at least this far (Wasserstein-1, in reference stds)
    ks_min_shift_sigma: float = 0.5

    def __post_init__(self) -> None:
        positive = ("window", "thin", "mmd_permutations", "mmd_max_reference", "score_bins", "min_rows")
        for name in (*positive, "calibration_min_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DriftConfig.{name} must be a positive integer, got {value!r}")
        if self.calibration_min_windows < 2:
            raise ValueError(
                f"DriftConfig.calibration_min_windows must be at least 2, got {self.calibration_min_windows}"
            )
        if not 0.0 < self.calibration_confidence < 1.0:
            raise ValueError(f"DriftConfig.calibration_confidence must be in (0, 1), got {self.calibration_confidence}")
        if self.min_rows < 2:
            raise ValueError(f"DriftConfig.min_rows must be at least 2, got {self.min_rows}")
        if self.window < self.min_rows:
            raise ValueError(f"DriftConfig.window ({self.window}) is below min_rows ({self.min_rows})")
        if not 0.0 < self.p_value < 1.0:
            raise ValueError(f"DriftConfig.p_value must be in (0, 1), got {self.p_value}")
        if self.correction not in ("bonferroni", "fdr"):
            raise ValueError(f"DriftConfig.correction must be 'bonferroni' or 'fdr', got {self.correction!r}")
        if not 0.0 <= self.concept_margin < 1.0:
            raise ValueError(f"DriftConfig.concept_margin must be in [0, 1), got {self.concept_margin}")
        if self.min_labels < 1:
            raise ValueError(f"DriftConfig.min_labels must be at least 1, got {self.min_labels}")
        if self.ks_min_shift_sigma < 0:
            raise ValueError(f"DriftConfig.ks_min_shift_sigma must be >= 0, got {self.ks_min_shift_sigma}")
        if self.mmd_attribution_sigma < 0:
            raise ValueError(f"DriftConfig.mmd_attribution_sigma must be >= 0, got {self.mmd_attribution_sigma}")

    @property
    def span(self) -> int:
        """Consecutive served rows that one test window covers."""
        return self.window * self.thin

    @classmethod
    def for_period(cls, period_rows: int, window: int = 240, **overrides: Any) -> DriftConfig:
        """A config whose test window spans one seasonal period of `period_rows` rows (e.g. 288 for a
        day of 5-minute samples), keeping about `window` rows of it."""
        if period_rows < 2:
            raise ValueError(f"period_rows must be at least 2, got {period_rows}")
        thin = max(1, round(period_rows / window))
        return cls(window=period_rows // thin, thin=thin, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftConfig:
        return config_from_dict(cls, data)


RETRAIN_MIN_ROWS = 300  # fewest recent rows of an entity worth retraining on (train/retrain.py refuses fewer)
WINDOW_FIELDS = ("window", "thin")  # the DriftConfig fields that set a test window's rows


def drift_window_rows(day_rows: int) -> int:
    """Served rows per drift-test window for an entity sampled `day_rows` times a day: whole days (a day
    is the seasonal period), and at least RETRAIN_MIN_ROWS, because a drift-triggered job learns from the
    drifted window on (a day of 5-minute samples, 288 rows, is too few: its windows span two days)."""
    return day_rows * -(-RETRAIN_MIN_ROWS // day_rows)


def entity_drift_config(
    entity: str, fields: dict[str, Any] | None = None, rows_per_day: int | None = None
) -> DriftConfig:
    """The drift config of one entity, the same where its model is trained (the calibration is fitted for
    these windows) and where its monitor tests it: `fields` (DriftConfig fields, e.g. a monitor's
    `MonitorConfig.drift`) with test windows of whole days at the entity's sampling rate: `rows_per_day`
    (what its training series had, recorded with its drift reference, `DriftReference.rows_per_day`), or
    where not known, from its name (`detect.data.entity_rows_per_day`). Fields that set the window
    themselves (`window`, `thin`) are kept as given."""
    config = DriftConfig.from_dict(dict(fields or {}))  # validates the fields, naming a bad one
    if any(name in (fields or {}) for name in WINDOW_FIELDS):
        return config
    others = {k: v for k, v in config.to_dict().items() if k not in WINDOW_FIELDS}
    day_rows = rows_per_day or entity_rows_per_day(entity)
    return DriftConfig.for_period(drift_window_rows(day_rows), **others)


@dataclass
class DriftResult:
    """The outcome of one drift test on one window of one (model, entity)."""

    time: float  # epoch seconds
    model: str
    entity: str
    detector: str  # one of DETECTORS
    is_drift: bool
    statistic: float  # ks: largest KS distance; mmd: MMD^2; prediction_ks: KS distance; concept: largest drop
    # the p-value decided on (calibrated where the detectors are; the iid one is in extra); ks: the smallest
    # per-feature one (uncorrected); concept: None
    p_value: float | None
    threshold: float  # the level p_value is compared with (ks: after the correction); concept: the margin
    drifted_features: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    window_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


REFERENCE_ROWS = 512  # rows of training input a model version keeps for its drift monitors


def reference_rows(n: int, rows: int = REFERENCE_ROWS) -> np.ndarray:
    """Indices of `rows` rows evenly spaced across a whole (time-ordered) series of `n` rows, so the
    reference covers every time of day and the whole training period; all rows when there are fewer."""
    return evenly_spaced(n, min(rows, n))


def reference_sample(values: np.ndarray, rows: int = REFERENCE_ROWS) -> np.ndarray:
    """The reference rows of a training series (see `reference_rows`)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"reference_sample: values must be 2-D (rows x metrics), got shape {values.shape}")
    return values[reference_rows(len(values), rows)].copy()


@dataclass(frozen=True)
class DriftReference:
    """A model version's reference sample for one entity, with the calibration fitted on the training
    series it was drawn from (None when there was too little history). It reads as the rows array
    (`np.asarray`, `shape`, `len`), so code that only needs the rows is unchanged."""

    rows: np.ndarray
    calibration: DriftCalibration | None = None
    # samples per day of the series it was drawn from (`detect.data.Series.rows_per_day`): the monitor
    # tests windows of whole days at this rate; None in bundles from before 2026-12-08 (then the name's)
    rows_per_day: int | None = None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.rows if dtype is None else self.rows.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows.shape

    def __len__(self) -> int:
        return len(self.rows)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The NPZ arrays of a bundle's reference file: `reference` plus the calibration's and the
        sampling rate, where known."""
        return {
            "reference": self.rows,
            **(self.calibration.to_arrays() if self.calibration else {}),
            **({} if self.rows_per_day is None else {"reference_rows_per_day": np.asarray(self.rows_per_day)}),
        }

    @classmethod
    def from_arrays(cls, arrays: Any) -> DriftReference:
        rate = (
            int(arrays["reference_rows_per_day"])
            if "reference_rows_per_day" in getattr(arrays, "files", arrays)
            else None
        )
        return cls(np.asarray(arrays["reference"]), DriftCalibration.from_arrays(arrays), rate)


def as_drift_reference(reference: DriftReference | np.ndarray) -> DriftReference:
    """A reference as a `DriftReference`: a plain rows array (an older bundle, a reference reset through
    the admin API) is one without calibration."""
    if isinstance(reference, DriftReference):
        return reference
    return DriftReference(np.asarray(reference), None)


def drift_reference(
    det: Any,
    rows: np.ndarray,
    n: int = REFERENCE_ROWS,
    config: DriftConfig | None = None,
    rows_per_day: int | None = None,
) -> tuple[DriftReference, np.ndarray]:
    """What a model version keeps for its drift monitors: the reference rows of the series it learned
    from (with the entity's calibration, fitted on that whole series for windows of `config`, and the
    series' samples per day) and the model's own scores on them (scored over the whole series, so
    windows have context)."""
    rows = np.asarray(rows, dtype=np.float64)
    scores = np.asarray(det.score(rows), dtype=np.float64)
    idx = reference_rows(len(rows), n)
    calibration = calibrate_drift(rows, scores, config or DriftConfig(), n)
    return DriftReference(rows[idx], calibration, rows_per_day), scores[idx]


def calibrate_drift(
    rows: np.ndarray, scores: np.ndarray | None, config: DriftConfig, reference_size: int = REFERENCE_ROWS
) -> DriftCalibration | None:
    """Fit an entity's calibration (`detect/drift_calibration.py`) on its time-ordered training `rows`
    (and the model's `scores` on them, for prediction drift): each whole window of `config.span` rows
    is tested against a reference drawn from the other windows, the way the monitor tests a served
    window, and each test's null scale is fitted to those distances. None when the series holds fewer
    than `config.calibration_min_windows` whole windows."""
    rows = np.asarray(rows, dtype=np.float64)
    n_windows = len(rows) // config.span
    if n_windows < config.calibration_min_windows:
        log.info("drift tests left uncalibrated", extra={"windows": n_windows, "span": config.span})
        return None
    names = [f"f{i}" for i in range(rows.shape[1])]
    null = _null_config(config)
    with_scores = scores is not None and bool(np.isfinite(scores[: n_windows * config.span]).all())
    confidence = config.calibration_confidence
    pairs = [
        (np.arange(tested * config.span, (tested + 1) * config.span), _rows_of(others, config.span, reference_size))
        for tested, others in null_pairs(n_windows)
    ]
    # pass 1: KS distances, how far each feature moved, the score distances
    ks, moves, score = [], [], []
    for window, others in pairs:
        det = EntityDriftDetectors(
            "calibration", "calibration", rows[others], names, scores[others] if with_scores else None, null
        )
        x = det.select(rows[window])
        ks.append(det.ks_statistics(x)[1])
        moves.append(det.shift_sigma(x))
        if with_scores:
            score.append(det.score_statistics(det.select(scores[window]))[1])
    calibration = DriftCalibration(
        window=config.window,
        thin=config.thin,
        windows=n_windows,
        ks_scales=tuple(fit_scale(column, "kolmogorov", confidence) for column in np.asarray(ks).T),
        score_scale=fit_scale(score, "kolmogorov", confidence) if score else None,
        move_scales=tuple(float(v) for v in np.maximum(np.asarray(moves).max(axis=0), 1.0)),
    )
    if not config.use_mmd:
        return calibration
    # pass 2: MMD on the features scaled by those moves, as the monitor computes it
    mmd = []
    for window, others in pairs:
        det = EntityDriftDetectors("calibration", "calibration", rows[others], names, None, null, calibration)
        mmd.append(float(np.sqrt(max(det.mmd_statistics(det.select(rows[window]))[1], 0.0))))
    return replace(calibration, mmd_scale=fit_scale(mmd, "halfnormal", confidence))


def _rows_of(windows: list[int], span: int, reference_size: int) -> np.ndarray:
    """The reference rows drawn from these windows, as `reference_sample` draws them from a series."""
    rows = np.concatenate([np.arange(w * span, (w + 1) * span) for w in windows])
    return rows[reference_rows(len(rows), reference_size)]


def null_pairs(n_windows: int) -> list[tuple[int, list[int]]]:
    """(tested window, reference windows) pairs of the calibration's null sample: each window against
    all the others (leave one window out)."""
    return [(w, [v for v in range(n_windows) if v != w]) for w in range(n_windows)]


def _null_config(config: DriftConfig) -> DriftConfig:
    """The config of the calibration's own (uncalibrated) tests: only their distances are used, so the
    MMD permutation test is cut to one permutation."""
    return DriftConfig.from_dict({**config.to_dict(), "mmd_permutations": 1})


def evenly_spaced(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def _check_matrix(x: Any, name: str, features: Sequence[str], min_rows: int) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not a numeric array ({exc})") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x {len(features)} features), got shape {arr.shape}")
    if arr.shape[1] != len(features):
        raise ValueError(f"{name} has {arr.shape[1]} feature columns, expected {len(features)} ({', '.join(features)})")
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        what = "NaN" if np.isnan(arr[row, col]) else "infinite value"
        raise ValueError(f"{name}: {what} in feature {features[col]!r} (row {row})")
    if len(arr) < min_rows:
        raise ValueError(f"{name} has {len(arr)} rows; at least {min_rows} are needed")
    return arr


def _check_vector(x: Any, name: str, min_rows: int) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not a numeric array ({exc})") from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per row), got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: {'NaN' if np.isnan(arr[row]) else 'infinite value'} at row {row}")
    if len(arr) < min_rows:
        raise ValueError(f"{name} has {len(arr)} rows; at least {min_rows} are needed")
    return arr


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


class EntityDriftDetectors:
    """The drift detectors of one served (model, entity) pair, built once from its reference sample.

    `test_inputs` and `test_scores` take consecutive served rows (oldest first), keep every
    `config.thin`-th and test the newest `config.window` of those; hand in `config.span` rows per call.
    With a `calibration` that fits the config (`DriftCalibration.fits`), decisions use the entity's
    calibrated null (`detect/drift_calibration.py`); the iid decision is kept in each result's
    `extra["iid_is_drift"]` beside it.
    """

    def __init__(
        self,
        model: str,
        entity: str,
        reference: np.ndarray,
        feature_names: Sequence[str],
        reference_scores: np.ndarray | None = None,
        config: DriftConfig | None = None,
        calibration: DriftCalibration | None = None,
    ) -> None:
        cd = alibi("cd")
        KSDrift, MMDDrift = cd.KSDrift, cd.MMDDrift

        self.model, self.entity = model, entity
        self.config = config or DriftConfig()
        self.feature_names = [str(f) for f in feature_names]
        if not self.feature_names:
            raise ValueError("feature_names is empty: a drift monitor needs at least one feature")
        dupes = sorted({f for f in self.feature_names if self.feature_names.count(f) > 1})
        if dupes:
            raise ValueError(f"feature_names has duplicates: {dupes}")
        cfg = self.config
        if calibration is not None:
            unfit = calibration.fits(cfg.window, cfg.thin, len(self.feature_names))
            if unfit:
                raise ValueError(f"drift calibration does not fit this monitor: {unfit}")
        self.calibration = calibration
        ref = _check_matrix(reference, "reference", self.feature_names, cfg.min_rows)
        self.reference_rows_ = len(ref)
        self.reference_ = ref
        self.mean_ = ref.mean(axis=0)
        std = ref.std(axis=0)
        self.scale_ = np.where(std > 1e-12, std, 1.0)  # a constant reference metric: any change is drift
        self.ks_ = KSDrift(ref, p_val=cfg.p_value, correction=cfg.correction, x_ref_preprocessed=True)
        self.mmd_ = None
        if cfg.use_mmd:
            mmd_ref = ref[evenly_spaced(len(ref), min(len(ref), cfg.mmd_max_reference))]
            self.mmd_ = MMDDrift(
                self._mmd_features(mmd_ref),
                backend="pytorch",
                p_val=cfg.p_value,
                n_permutations=cfg.mmd_permutations,
                x_ref_preprocessed=True,
                device="cpu",
            )
            self.mmd_reference_rows_ = len(mmd_ref)
        self.scores_ks_ = None
        if reference_scores is not None:
            scores = _check_vector(reference_scores, "reference_scores", cfg.min_rows)
            self.reference_scores_ = scores
            self.scores_ks_ = KSDrift(scores.reshape(-1, 1), p_val=cfg.p_value, x_ref_preprocessed=True)
        # (precision, recall) the concept test compares with when none is given; set by the first
        # labelled window otherwise. The monitor persists it (DriftEventStore.set_state) across restarts.
        self.concept_baseline: tuple[float | None, float | None] | None = None

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean_) / self.scale_).astype(np.float32)

    def _mmd_features(self, x: np.ndarray) -> np.ndarray:
        """MMD's inputs: standardised features, each further divided by its calibrated day-to-day move
        (`DriftCalibration.move_scales`, at least 1), so that a metric whose normal days already move by
        several stds does not drown the kernel for the others."""
        z = self._standardise(x)
        if self.calibration is None or self.calibration.move_scales is None:
            return z
        return (z / np.asarray(self.calibration.move_scales, dtype=np.float32)).astype(np.float32)

    def select(self, rows: np.ndarray) -> np.ndarray:
        """The rows a test uses: every `thin`-th served row, counted back from the newest, newest `window`."""
        thin, window = self.config.thin, self.config.window
        return rows[::-1][::thin][::-1][-window:]

    def _base(self, detector: str, now: float | None, rows: int) -> dict[str, Any]:
        return {
            "time": time.time() if now is None else float(now),
            "model": self.model,
            "entity": self.entity,
            "detector": detector,
            "window_rows": int(rows),
        }

    def _thinned(self, x: np.ndarray, name: str) -> np.ndarray:
        out = self.select(x)
        if len(out) < self.config.min_rows:
            raise ValueError(
                f"{name} has {len(x)} rows, {len(out)} after keeping every {self.config.thin}th; "
                f"at least {self.config.min_rows} are needed (hand in config.span={self.config.span} rows)"
            )
        return out

    # -- the statistics, shared by the tests and by the calibration -------------------------------------
    def ks_statistics(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature iid p-values and KS distances of thinned rows `x` against the reference."""
        data = self.ks_.predict(x, drift_type="batch", return_p_val=True, return_distance=True)["data"]
        return np.asarray(data["p_val"], dtype=np.float64), np.asarray(data["distance"], dtype=np.float64)

    def shift_sigma(self, x: np.ndarray) -> np.ndarray:
        """Per feature, how far thinned rows `x` moved from the reference: the Wasserstein-1 (transport)
        distance in reference stds. KS is a rank test: a quantised metric whose mass steps to the
        adjacent value, or a sine whose phase wobbles, gets a large KS distance for a change of a few
        hundredths of a std. The calibrated KS decision ignores features that moved less than
        `ks_min_shift_sigma`; a mean shift of d stds moves a feature by d."""
        from scipy.stats import wasserstein_distance

        ref = self.reference_
        return np.array([wasserstein_distance(ref[:, j], x[:, j]) for j in range(ref.shape[1])]) / self.scale_

    def mmd_statistics(self, x: np.ndarray) -> tuple[float, float, float]:
        """(permutation p-value, MMD^2, permutation threshold on MMD^2) of thinned rows `x`."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # the permutations; forked so the caller's torch RNG is untouched
            return self.mmd_.score(self._mmd_features(x))

    def score_statistics(self, s: np.ndarray) -> tuple[float, float]:
        """(iid p-value, KS distance) of thinned scores `s` against the reference scores."""
        data = self.scores_ks_.predict(s.reshape(-1, 1), return_p_val=True, return_distance=True)["data"]
        return float(np.asarray(data["p_val"]).ravel()[0]), float(np.asarray(data["distance"]).ravel()[0])

    def test_inputs(self, window: np.ndarray, now: float | None = None) -> list[DriftResult]:
        """KS per feature (corrected for the number of features) and, if enabled, MMD on all features."""
        x = _check_matrix(window, "window", self.feature_names, 1)
        x = self._thinned(x, "window")
        results = [self._test_ks(x, now)]
        if self.mmd_ is not None:
            results.append(self._test_mmd(x, now))
        return results

    def _decide_ks(self, p: np.ndarray) -> tuple[bool, float, np.ndarray]:
        """(drift?, the level p-values are compared with, which features) under the configured correction."""
        cfg = self.config
        if cfg.correction == "bonferroni":
            threshold = cfg.p_value / len(p)
        else:  # BH: alibi gives the rejection threshold when something is rejected, the candidates otherwise
            fdr = alibi("utils.statstest").fdr
            t = np.asarray(fdr(p, q_val=cfg.p_value)[1], dtype=np.float64)
            threshold = float(t) if t.ndim == 0 else float(t.min())
        drifted = p < threshold
        return bool(drifted.any()), float(threshold), drifted

    def _test_ks(self, x: np.ndarray, now: float | None) -> DriftResult:
        cfg, cal = self.config, self.calibration
        p_iid, dist = self.ks_statistics(x)
        iid_drift, iid_threshold, _ = self._decide_ks(p_iid)
        # calibrated: the fitted null's tail, never below the iid p-value (n_eff never above the real n)
        p = p_iid if cal is None else np.maximum(cal.ks_p_values(dist), p_iid)
        is_drift, threshold, drifted_mask = self._decide_ks(p)
        if cal is not None:
            drifted_mask &= self.shift_sigma(x) >= cfg.ks_min_shift_sigma
            is_drift = bool(drifted_mask.any())
        order = np.argsort(-dist)[:5]
        extra: dict[str, Any] = {
            "correction": cfg.correction,
            "top_distances": {self.feature_names[i]: round(float(dist[i]), 4) for i in order},
            **self._calibration_extra(iid_drift, float(p_iid.min()), iid_threshold),
        }
        if cal is not None:
            critical = critical_distance(np.asarray(cal.ks_scales), threshold, "kolmogorov")
            extra["critical_distances"] = {self.feature_names[i]: round(float(critical[i]), 4) for i in order}
        result = DriftResult(
            **self._base("ks", now, len(x)),
            is_drift=is_drift,
            statistic=float(dist.max()),
            p_value=float(p.min()),
            threshold=threshold,
            drifted_features=[f for f, hit in zip(self.feature_names, drifted_mask) if hit] if is_drift else [],
            extra=extra,
        )
        self._log(result)
        return result

    def _calibration_extra(self, iid_drift: bool, iid_p: float, iid_threshold: float) -> dict[str, Any]:
        return {
            "calibrated": self.calibration is not None,
            "iid_is_drift": iid_drift,
            "iid_p_value": iid_p,
            "iid_threshold": iid_threshold,
        }

    def _test_mmd(self, x: np.ndarray, now: float | None) -> DriftResult:
        cfg, cal = self.config, self.calibration
        p_perm, mmd2, mmd2_threshold = self.mmd_statistics(x)
        p_cal = None if cal is None else cal.mmd_p_value(mmd2)
        p = p_perm if p_cal is None else max(p_cal, p_perm)
        is_drift = p < cfg.p_value
        # MMD has no per-feature answer; name the features whose mean moved most (a heuristic attribution)
        shift = np.abs(self._standardise(x).mean(axis=0))  # in reference stds
        order = np.argsort(-shift)
        drifted = [self.feature_names[i] for i in order if shift[i] >= cfg.mmd_attribution_sigma] if is_drift else []
        extra = {
            "distance_threshold": float(mmd2_threshold),
            "permutations": cfg.mmd_permutations,
            "reference_rows": self.mmd_reference_rows_,
            "mean_shift_sigma": {self.feature_names[i]: round(float(shift[i]), 3) for i in order[:5]},
            **self._calibration_extra(p_perm < cfg.p_value, float(p_perm), cfg.p_value),
        }
        if p_cal is not None:
            extra["critical_distance"] = float(critical_distance(cal.mmd_scale, cfg.p_value, "halfnormal")) ** 2
        result = DriftResult(
            **self._base("mmd", now, len(x)),
            is_drift=is_drift,
            statistic=float(mmd2),
            p_value=float(p),
            threshold=cfg.p_value,
            drifted_features=drifted,
            extra=extra,
        )
        self._log(result)
        return result

    def test_scores(self, scores: np.ndarray, now: float | None = None) -> DriftResult | None:
        """Prediction drift: KS on the anomaly-score distribution, plus its Jensen-Shannon divergence
        from the reference scores (shared histogram bins) as a figure. None without reference scores."""
        if self.scores_ks_ is None:
            return None
        from scipy.spatial.distance import jensenshannon

        cfg, cal = self.config, self.calibration
        s = self._thinned(_check_vector(scores, "scores", 1), "scores")
        p_iid, distance = self.score_statistics(s)
        p_cal = None if cal is None else cal.score_p_value(distance)
        p = p_iid if p_cal is None else max(p_cal, p_iid)
        ref = self.reference_scores_
        lo, hi = float(min(ref.min(), s.min())), float(max(ref.max(), s.max()))
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, cfg.score_bins + 1)
        h_ref = np.histogram(ref, edges)[0].astype(np.float64)
        h_cur = np.histogram(s, edges)[0].astype(np.float64)
        js_distance = float(jensenshannon(h_ref / h_ref.sum(), h_cur / h_cur.sum(), base=2))
        extra = {
            "js_divergence": js_distance**2,  # scipy returns the distance, its square root
            "js_distance": js_distance,
            "score_mean": float(s.mean()),
            "reference_score_mean": float(ref.mean()),
            **self._calibration_extra(p_iid < cfg.p_value, p_iid, cfg.p_value),
        }
        if p_cal is not None:
            extra["critical_distance"] = float(critical_distance(cal.score_scale, cfg.p_value, "kolmogorov"))
        result = DriftResult(
            **self._base("prediction_ks", now, len(s)),
            is_drift=bool(p < cfg.p_value),
            statistic=distance,
            p_value=float(p),
            threshold=cfg.p_value,
            extra=extra,
        )
        self._log(result)
        return result

    def test_concept(
        self,
        predicted: np.ndarray,
        labels: np.ndarray,
        baseline_precision: float | None = None,
        baseline_recall: float | None = None,
        now: float | None = None,
    ) -> DriftResult | None:
        """Concept drift: precision or recall of the served `is_anomaly` against feedback labels falls
        more than `config.concept_margin` below the baseline. Without a baseline (given, or held in
        `concept_baseline`), this window's figures become the baseline. None when there are fewer than
        `min_labels` labels, or neither figure is defined (no positives at all)."""
        cfg = self.config
        pred = _check_vector(predicted, "predicted", 0)
        true = _check_vector(labels, "labels", 0)
        if len(pred) != len(true):
            raise ValueError(f"predicted has {len(pred)} rows but labels has {len(true)}")
        for name, arr in (("predicted", pred), ("labels", true)):
            if not np.isin(arr, (0, 1)).all():
                raise ValueError(f"{name} must hold only 0 and 1")
        for name, value in (("baseline_precision", baseline_precision), ("baseline_recall", baseline_recall)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if len(true) < cfg.min_labels:
            log.debug("concept test skipped", extra={"model": self.model, "entity": self.entity, "labels": len(true)})
            return None
        tp = int(((pred == 1) & (true == 1)).sum())
        precision = _rate(tp, int(pred.sum()))
        recall = _rate(tp, int(true.sum()))
        if precision is None and recall is None:
            return None
        baseline_set = False
        if baseline_precision is None and baseline_recall is None:
            if self.concept_baseline is None:
                self.concept_baseline = (precision, recall)
                baseline_set = True
            baseline_precision, baseline_recall = self.concept_baseline
        drops = {}
        if precision is not None and baseline_precision is not None:
            drops["precision"] = baseline_precision - precision
        if recall is not None and baseline_recall is not None:
            drops["recall"] = baseline_recall - recall
        statistic = max(drops.values()) if drops else 0.0
        result = DriftResult(
            **self._base("concept", now, len(true)),
            is_drift=statistic > cfg.concept_margin,
            statistic=float(statistic),
            p_value=None,
            threshold=cfg.concept_margin,
            extra={
                "precision": precision,
                "recall": recall,
                "baseline_precision": baseline_precision,
                "baseline_recall": baseline_recall,
                "dropped": sorted(k for k, v in drops.items() if v > cfg.concept_margin),
                "positives": int(true.sum()),
                "predicted_positives": int(pred.sum()),
                "baseline_set": baseline_set,
            },
        )
        self._log(result)
        return result

    def _log(self, result: DriftResult) -> None:
        fields_ = {
            "model": result.model,
            "entity": result.entity,
            "detector": result.detector,
            "statistic": result.statistic,
            "p_value": result.p_value,
            "drifted_features": result.drifted_features,
        }
        if result.is_drift:
            log.warning("drift detected", extra=fields_)
        else:
            log.debug("no drift", extra=fields_)
