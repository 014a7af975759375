"""SPOT's refit: `detect.thresholds.fit_gpd` against the fit it replaced (a 100-point grid on each side and a
refinement through arrays, as of 4d06c81), on the same tails in the same run.

    python benchmarks/spot_refit.py          # or: make bench-spot   (a few seconds)

SPOT refits its tail on every new peak: most of `raywatch evaluate`'s time on the peers, and a serving
ingress refits per (detector, entity). For each tail size (the peaks a fit sees; MAX_PEAKS = 1,000 at most):
milliseconds a fit, old and new, their ratio, and how far the threshold SPOT derives at its default risk
moved (largest relative difference over the tails). Tails: exponential, Pareto (heavy) and bounded, 60 of
each size at random scales. Writes benchmarks/results/spot_refit.{json,md}.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.optimize import minimize_scalar
from serving import save_tables

from detect.thresholds import DEFAULT_LEVEL, DEFAULT_RISK, _profile, fit_gpd, tail_quantile

SIZES = (20, 100, 500, 1000)
TAILS_PER_SIZE = 60
SEED = 7


def reference_fit_gpd(peaks: np.ndarray) -> tuple[float, float]:
    """The control: `fit_gpd` as it was before the change (100 grid points a side, `_profile` on a 1-array)."""
    y = np.asarray(peaks, dtype=np.float64)
    mean, ymax, ymin = float(y.mean()), float(y.max()), max(float(y.min()), 1e-12)
    lower, upper = -1.0 / ymax * (1 - 1e-6), 2.0 * (mean - ymin) / (ymin * ymin)
    thetas = np.concatenate([np.linspace(lower, -1e-8, 100), np.geomspace(1e-8, max(upper, 1e-6), 100)])
    profile = _profile(thetas, y)
    best = int(np.argmax(profile))
    if np.isfinite(profile[best]):
        lo, hi = thetas[max(best - 1, 0)], thetas[min(best + 1, len(thetas) - 1)]
        res = minimize_scalar(lambda th: -_profile(np.array([th]), y)[0], bounds=(lo, hi), method="bounded")
        theta = float(res.x) if -res.fun > profile[best] else float(thetas[best])
        loglik = max(-float(res.fun), float(profile[best]))
    else:
        theta, loglik = float("nan"), -math.inf
    if len(y) * (-math.log(mean) - 1) >= loglik:
        return 0.0, mean
    gamma = float(np.log1p(theta * y).mean())
    return gamma, gamma / theta


def tails(size: int, rng: np.random.Generator) -> list[np.ndarray]:
    shapes = (lambda: rng.exponential(1.0, size), lambda: rng.pareto(3.0, size), lambda: rng.uniform(0, 1, size) ** 2)
    return [shapes[i % 3]() * rng.uniform(0.01, 10.0) for i in range(TAILS_PER_SIZE)]


def threshold(gpd: tuple[float, float], peaks: np.ndarray) -> float:
    """SPOT's threshold over t = 0 for these peaks, with the peaks (1 - level) of the scores seen."""
    return tail_quantile(0.0, gpd[0], gpd[1], DEFAULT_RISK, round(len(peaks) / (1 - DEFAULT_LEVEL)), len(peaks))


def timed(fit, cases: list[np.ndarray]) -> tuple[float, list[tuple[float, float]]]:
    started = time.perf_counter()
    fits = [fit(y) for y in cases]
    return (time.perf_counter() - started) / len(cases) * 1e3, fits


def main() -> None:
    rng = np.random.default_rng(SEED)
    records = []
    for size in SIZES:
        cases = tails(size, rng)
        old_ms, old = timed(reference_fit_gpd, cases)
        new_ms, new = timed(fit_gpd, cases)
        moved = max(abs(threshold(b, y) - threshold(a, y)) / abs(threshold(a, y)) for a, b, y in zip(old, new, cases))
        records.append(
            {"peaks": size, "old_ms": old_ms, "new_ms": new_ms, "speedup": old_ms / new_ms, "max_rel_threshold": moved}
        )
        print(f"{size} peaks: {old_ms:.3f} -> {new_ms:.3f} ms a fit, threshold moved {moved:.1e}", flush=True)
    md = [
        "# SPOT refit: `fit_gpd` against the fit it replaced, same tails, same run",
        "",
        f"{TAILS_PER_SIZE} tails a size (exponential, Pareto, bounded), risk {DEFAULT_RISK:g}.",
        "",
        "| peaks | old ms a fit | new ms a fit | speed-up | largest relative move of the threshold |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['peaks']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['speedup']:.2f}x | {r['max_rel_threshold']:.1e} |"
        for r in records
    ]
    save_tables("spot_refit", {"records": records, "tails_per_size": TAILS_PER_SIZE}, md, show=True)


if __name__ == "__main__":
    main()
