"""Operational thresholds from the tail of the score distribution: SPOT (Siffer et al., KDD 2017).

Peaks over threshold: the scores above an initial threshold t (a high quantile of calibration
scores) follow a generalised Pareto distribution (GPD). With its fitted shape gamma and scale sigma,
the threshold that a normal score exceeds with probability q (the stated risk) is

    z_q = t + sigma / gamma * ((q * n / N_t) ** -gamma - 1)      (gamma != 0)
    z_q = t - sigma * log(q * n / N_t)                            (gamma == 0)

with n scores seen and N_t of them above t. The streaming update learns from unlabelled scores only:
a score above z_q is an alarm and is not learnt from (an incident must not raise its own bar), unless
the caller groups alarms into alerts and says the score is no alert's (`update`); a score in
(t, z_q] is a new peak and refits the GPD; any other score only counts in n.

DSPOT (the same paper, section 4.3) is what the platform serves and `raywatch evaluate` judges
(`operational_threshold`): SPOT on the residuals of the scores over a moving baseline, the mean of the last
`depth` scores learnt from. A machine whose scores sit higher or lower than on its validation days moves the
baseline, not the tail; a score far above the recent level still raises an alarm. The residuals' tail is
fitted on the calibration scores, each over the mean of the `depth` before it.

A supervised detector (the incident predictor) is the exception: its score is a probability, and where an
incident begins was learnt from labelled rows, not from the tail of normal ones. It serves the decision
threshold chosen on its labelled validation rows (`decision_threshold`: between the best validation F1's and
the normal rows' tail, served as `DecisionThreshold`), which no served score moves.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar

#: probability that a normal score exceeds the threshold (one false-alarm row in 1,000)
DEFAULT_RISK = 1e-3
#: scores in DSPOT's moving baseline: an hour of one-minute rows (the attribution's hold fades on the same
#: scale); chosen by that, not by a sweep (docs/experiments/dspot.md has 10 to 250)
DEFAULT_DEPTH = 60
#: quantile of the calibration scores that starts the peaks (as in SPOT's and OmniAnomaly's set-up)
DEFAULT_LEVEL = 0.98
#: fewer peaks than this give no usable tail fit: the threshold falls back to an empirical quantile
MIN_PEAKS = 10
#: peaks kept for the tail fit (about 50,000 rows at the 98% level); older ones are forgotten
MAX_PEAKS = 1000
#: points of the profile's grid on each side of theta = 0 (`fit_gpd`). 50 rather than 100 about halves a
#: refit (SPOT refits on every peak: most of `raywatch evaluate`'s time, and a serving ingress refits per
#: entity); the refinement between the best point's neighbours finds the same maximum, and the 1e-3
#: threshold moves by at most 7e-6 of itself on 240 random tails of 20 to 1,000 peaks (`make bench-spot`)
GRID_POINTS = 50


def fit_gpd(peaks: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood (gamma, sigma) of a GPD on excesses `peaks` > 0 (Grimshaw's reduction).

    For theta = gamma / sigma the likelihood is maximised in closed form at
    gamma(theta) = mean(log(1 + theta * y)), which leaves a one-dimensional profile in theta; it is
    searched on a grid over Grimshaw's bounds and refined between the best point's neighbours, then
    the exponential case (gamma = 0) is compared.
    """
    y = np.asarray(peaks, dtype=np.float64)
    mean, ymax, ymin = float(y.mean()), float(y.max()), max(float(y.min()), 1e-12)
    n = len(y)
    # theta must keep 1 + theta * y > 0; Grimshaw bounds the root search by these ends
    lower = -1.0 / ymax * (1 - 1e-6)
    upper = 2.0 * (mean - ymin) / (ymin * ymin)
    thetas = np.concatenate([np.linspace(lower, -1e-8, GRID_POINTS), np.geomspace(1e-8, max(upper, 1e-6), GRID_POINTS)])
    profile = _profile(thetas, y)
    best = int(np.argmax(profile))
    if np.isfinite(profile[best]):
        lo, hi = thetas[max(best - 1, 0)], thetas[min(best + 1, len(thetas) - 1)]
        res = minimize_scalar(lambda th: -_profile_at(th, y), bounds=(lo, hi), method="bounded")
        theta = float(res.x) if -res.fun > profile[best] else float(thetas[best])
        loglik = max(-float(res.fun), float(profile[best]))
    else:
        theta, loglik = float("nan"), -math.inf
    exponential = n * (-math.log(mean) - 1)  # gamma -> 0: sigma = mean excess
    if exponential >= loglik:
        return 0.0, mean
    gamma = float(np.log1p(theta * y).mean())
    return gamma, gamma / theta


def _profile(thetas: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Profile log-likelihood of the GPD at each theta (-inf where theta is not admissible)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        gammas = np.log1p(np.outer(thetas, y)).mean(axis=1)
        profile = len(y) * (-np.log(gammas / thetas) - gammas - 1)
    return np.where(np.isfinite(profile) & (gammas / thetas > 0), profile, -np.inf)


def _profile_at(theta: float, y: np.ndarray) -> float:
    """`_profile` at one theta, in Python floats: the same value, without the arrays and the error state
    that cost more than the arithmetic on a refinement's two dozen calls. Between two admissible grid
    points 1 + theta * y stays positive, so log1p never warns."""
    gamma = float(np.log1p(theta * y).mean())
    ratio = gamma / theta if theta else math.nan
    if not ratio > 0 or math.isinf(ratio):
        return -math.inf
    profile = len(y) * (-math.log(ratio) - gamma - 1)
    return profile if math.isfinite(profile) else -math.inf


def tail_quantile(t: float, gamma: float, sigma: float, risk: float, n: int, n_peaks: int) -> float:
    """The score exceeded with probability `risk`, from the GPD over t."""
    r = risk * n / n_peaks
    if abs(gamma) < 1e-9:
        return t - sigma * math.log(r)
    return t + sigma / gamma * (r ** (-gamma) - 1)


@dataclass
class SPOT:
    """Streaming peaks-over-threshold: `fit(calibration_scores)`, then `update(score)` or `run(scores)`."""

    risk: float = DEFAULT_RISK
    level: float = DEFAULT_LEVEL
    max_peaks: int = MAX_PEAKS
    initial_threshold_: float = field(init=False, default=math.nan)
    threshold_: float = field(init=False, default=math.nan)
    n_: float = field(init=False, default=0)
    # excesses over t, oldest first: a compact float64 buffer (8 bytes each), since the serving ingress keeps
    # one SPOT per (detector, entity) with up to `max_peaks` of them
    peaks_: array = field(init=False, default_factory=lambda: array("d"))
    gpd_: tuple[float, float] = field(init=False, default=(0.0, 0.0))
    # the empirical (1 - risk) quantile of the calibration scores: the threshold while the tail is degenerate
    fallback_: float = field(init=False, default=math.nan)

    def fit(self, initial_scores: np.ndarray) -> SPOT:
        """Initial threshold t and GPD from calibration scores (training/validation, never test labels)."""
        if not 0 < self.risk < 1 - self.level:
            raise ValueError(f"SPOT: risk must be in (0, 1 - level) = (0, {1 - self.level:g}), got {self.risk}")
        scores = np.asarray(initial_scores, dtype=np.float64)
        scores = scores[np.isfinite(scores)]
        if len(scores) < MIN_PEAKS / (1 - self.level):
            raise ValueError(f"SPOT: {len(scores)} calibration scores are too few for level {self.level}")
        self.initial_threshold_ = float(np.quantile(scores, self.level))
        self.peaks_ = array("d", scores[scores > self.initial_threshold_] - self.initial_threshold_)
        self.n_ = len(scores)
        self.fallback_ = float(np.quantile(scores, 1 - self.risk))
        self._forget()
        self._refit()
        return self

    def state(self) -> dict[str, Any]:
        """Everything `from_state` needs to continue exactly where this one is (JSON-safe)."""
        return {
            "risk": self.risk,
            "level": self.level,
            "max_peaks": self.max_peaks,
            "initial_threshold": self.initial_threshold_,
            "threshold": self.threshold_,
            "n": self.n_,
            "peaks": self.peaks_.tolist(),
            "gpd": list(self.gpd_),
            "fallback": self.fallback_,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SPOT:
        spot = cls(risk=float(state["risk"]), level=float(state["level"]), max_peaks=int(state["max_peaks"]))
        spot.initial_threshold_, spot.threshold_ = float(state["initial_threshold"]), float(state["threshold"])
        spot.n_, spot.peaks_ = float(state["n"]), array("d", state["peaks"])
        spot.gpd_, spot.fallback_ = (float(state["gpd"][0]), float(state["gpd"][1])), float(state["fallback"])
        return spot

    def _forget(self) -> None:
        """Keep the newest `max_peaks` peaks; each forgotten one takes its share of n with it."""
        extra = len(self.peaks_) - self.max_peaks
        if extra > 0:
            self.n_ -= self.n_ * extra / len(self.peaks_)
            del self.peaks_[:extra]

    def _refit(self) -> None:
        peaks = np.frombuffer(self.peaks_, dtype=np.float64) if self.peaks_ else np.zeros(0)
        if len(peaks) < MIN_PEAKS or float(peaks.max()) <= 0:
            # a near-constant tail (e.g. a bounded probability) has no GPD: use the empirical quantile
            self.gpd_ = (0.0, 0.0)
            self.threshold_ = self.fallback_
            return
        self.gpd_ = fit_gpd(peaks)
        gamma, sigma = self.gpd_
        self.threshold_ = tail_quantile(self.initial_threshold_, gamma, sigma, self.risk, self.n_, len(peaks))

    def update(self, score: float, learn: bool | None = None) -> float:
        """Judge one unlabelled score and learn from it; returns the threshold it was judged against.

        By default (`learn=None`) a score above the threshold is an alarm and is not learnt from, as in
        SPOT. A caller that groups alarms into alerts knows better: `learn=False` while an alert fires (an
        incident must not raise the bar that detects it) and `learn=True` otherwise, so that a lone
        normal spike above the bar, which a steady stream has once in 1 / risk rows, is learnt too.
        Leaving every such spike out truncates the tail the GPD is fitted on, and the threshold then sinks
        over a long stream (about 15% in 200,000 rows of a steady exponential).
        """
        if math.isnan(self.threshold_):
            raise RuntimeError("SPOT: call fit() first")
        judged_against = self.threshold_
        if not learn and (learn is not None or score > judged_against):
            return judged_against
        self.n_ += 1
        if score > self.initial_threshold_:
            self.peaks_.append(float(score - self.initial_threshold_))
            self._forget()
            self._refit()
        return judged_against

    def run(self, scores: np.ndarray) -> np.ndarray:
        """The threshold each score of a time-ordered series is judged against, updating as it goes."""
        return np.array([self.update(float(s)) for s in np.asarray(scores, dtype=np.float64)])


@dataclass
class DSPOT:
    """SPOT with drift: `SPOT` on the residuals over the mean of the last `depth` scores learnt from. It
    offers what `SPOT` offers a caller that streams (`fit`, `threshold_`, `update`, `state`, `from_state`),
    so `detect.alerting.AlertAwareSpot` and the serving ingress use either."""

    depth: int = DEFAULT_DEPTH
    risk: float = DEFAULT_RISK
    spot_: SPOT = field(init=False)
    # the baseline's scores, a ring (the newest at `next_ - 1`), and their sum (summed afresh once per ring)
    window_: array = field(init=False, default_factory=lambda: array("d"))
    next_: int = field(init=False, default=0)
    sum_: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"DSPOT: depth must be at least 1 score, got {self.depth}")
        self.spot_ = SPOT(risk=self.risk)

    def fit(self, initial_scores: np.ndarray) -> DSPOT:
        """The residuals' tail from calibration scores (each over the mean of the `depth` before it); the
        baseline starts as their last `depth`."""
        scores = np.asarray(initial_scores, dtype=np.float64)
        scores = scores[np.isfinite(scores)]
        if len(scores) <= self.depth:
            raise ValueError(f"DSPOT: {len(scores)} calibration scores do not cover a baseline of {self.depth}")
        sums = np.concatenate([[0.0], np.cumsum(scores)])
        baselines = (sums[self.depth : -1] - sums[: -self.depth - 1]) / self.depth
        try:
            self.spot_.fit(scores[self.depth :] - baselines)
        except ValueError as exc:
            raise ValueError(f"DSPOT (baseline of {self.depth} scores): {exc}") from None
        self.window_, self.next_ = array("d", scores[-self.depth :]), 0
        self.sum_ = math.fsum(self.window_)
        return self

    @property
    def baseline_(self) -> float:
        return self.sum_ / self.depth

    @property
    def threshold_(self) -> float:
        return self.baseline_ + self.spot_.threshold_

    def update(self, score: float, learn: bool | None = None) -> float:
        """As `SPOT.update`: judge one score, learn from it unless it is an alarm (or `learn` says); a
        score learnt from joins the baseline too. Returns the threshold it was judged against."""
        judged_against = self.threshold_
        if not learn and (learn is not None or score > judged_against):
            return judged_against
        if not math.isfinite(score):  # one NaN in the baseline's sum would disarm the threshold for good
            return judged_against
        self.spot_.update(score - self.baseline_, learn=True)
        self.sum_ += score - self.window_[self.next_]
        self.window_[self.next_] = score
        self.next_ = (self.next_ + 1) % self.depth
        if self.next_ == 0:  # once per ring: no rounding error builds up over a months-long stream
            self.sum_ = math.fsum(self.window_)
        return judged_against

    def state(self) -> dict[str, Any]:
        """Everything `from_state` needs to continue exactly where this one is (JSON-safe)."""
        return {
            "kind": "dspot",
            "depth": self.depth,
            "window": self.window_.tolist(),
            "next": self.next_,
            "sum": self.sum_,
            "spot": self.spot_.state(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DSPOT:
        spot = SPOT.from_state(state["spot"])
        out = cls(depth=int(state["depth"]), risk=spot.risk)
        out.spot_, out.window_ = spot, array("d", state["window"])
        out.next_, out.sum_ = int(state["next"]), float(state["sum"])
        return out


MOST_ROWS = 0.5  # a decision threshold flagging more of its validation rows than this is no decision
NORMAL_QUANTILE = 0.99  # the quantile of normal validation scores a supervised model falls back to


class ChosenThreshold(NamedTuple):
    threshold: float
    rule: str  # 'f1_tail_midpoint', 'normal_p99' or 'best_f1'
    best_f1: float  # the best validation F1, whichever rule chose


def log_odds(p: float) -> float:
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def decision_threshold(labels: np.ndarray, scores: np.ndarray) -> ChosenThreshold:
    """A supervised model's decision threshold from its labelled validation rows (`scores`: incident
    probabilities), the rule that chose it, and the best validation F1.

    'f1_tail_midpoint': halfway, in log-odds, between the threshold of the best validation F1 and the 99th
    percentile of the normal validation rows' scores. The validation rows hold a handful of incidents (often
    one), so the best-F1 threshold alone is a noisy estimate: where an incident happens to be separated
    from every normal row it lands at the top of the incident's scores, and later incidents that score a
    little lower are missed; where the incidents overlap the normal rows it lands low and pages on noise.
    The normal tail reads no label and says what the model calls unusual on this entity. Their midpoint
    pulls each towards the other (docs/experiments/ensemble-threshold.md: better than either alone on the
    shipped entities, the held-out fleets, and on fleets looked at once, after the rule was chosen).

    'normal_p99' alone where the best validation F1 is no decision: an F1 no better than flagging every row
    (2p / (1 + p) at a positive share p), or a threshold above which most validation rows lie. Validation
    days rich in incidents make the best F1 flag nearly everything (on one shipped machine, a third of the
    validation rows positive, it flagged 99.9% of the rows it was then judged on); a pager that fires on
    every row is a pager turned off. So too where the validation rows hold no incident (F1 0, no better
    than flagging all). 'best_f1' alone where no validation row is normal (0.5 if it has no threshold)."""
    from detect.metrics import best_f1  # here, not at the top: serving imports this module, sklearn it need not

    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    f1, threshold = best_f1(y, s)
    if not (~y).any():
        return ChosenThreshold(float(threshold) if np.isfinite(threshold) else 0.5, "best_f1", f1)
    tail = float(np.quantile(s[~y], NORMAL_QUANTILE))
    share = float(y.mean())
    no_decision = not np.isfinite(threshold) or f1 <= 2 * share / (1 + share) + 1e-9
    if no_decision or float(np.mean(s >= threshold)) > MOST_ROWS:
        return ChosenThreshold(tail, "normal_p99", f1)
    midpoint = (log_odds(threshold) + log_odds(tail)) / 2
    return ChosenThreshold(1 / (1 + math.exp(-midpoint)), "f1_tail_midpoint", f1)


@dataclass(frozen=True)
class DecisionThreshold:
    """A supervised model's decision threshold, chosen with labels on its own validation rows (never on
    the rows it is judged on), served as is: the online-threshold interface of `SPOT` / `DSPOT` for
    `detect.alerting.AlertAwareSpot`, with nothing to learn from the stream."""

    threshold_: float

    def update(self, score: float, learn: bool | None = None) -> float:
        return self.threshold_

    def state(self) -> dict[str, Any]:
        return {"kind": "decision", "threshold": self.threshold_}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DecisionThreshold:
        return cls(float(state["threshold"]))


def operational_threshold(calibration_scores: np.ndarray) -> DSPOT:
    """The threshold raywatch serves and `raywatch evaluate` judges, fitted on a model's calibration scores
    (never test labels). ValueError where they are too few for a tail over a baseline."""
    return DSPOT().fit(calibration_scores)


def threshold_from_state(state: dict[str, Any]) -> SPOT | DSPOT | DecisionThreshold:
    """A saved threshold, continued: DSPOT's, a supervised model's decision threshold, or plain SPOT's
    (bundles saved before DSPOT)."""
    kinds = {"dspot": DSPOT, "decision": DecisionThreshold}
    return kinds.get(state.get("kind"), SPOT).from_state(state)


def spot_state(calibration_scores: np.ndarray | None) -> dict[str, Any] | None:
    """The operational threshold's state for a model's calibration scores, or None where they cannot seed
    one (none kept, or too few for a tail): serving then judges against the model's stored threshold."""
    if calibration_scores is None:
        return None
    try:
        return operational_threshold(calibration_scores).state()
    except ValueError:
        return None
