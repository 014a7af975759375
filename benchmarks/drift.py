"""Drift-detection benchmark: false-drift rate on held-out normal windows and detection of injected
2-sigma (and 1-sigma) mean shifts, for the KS, MMD and prediction-KS tests of detect/drift.py, each
with the entity's calibration (detect/drift_calibration.py) and, as the `uncalibrated` rows, with the
iid decision of the same tests on the same windows.

Per entity: the calibration period is the first part of the series (smd/asd: the first half of
`train`); the reference is `reference_sample` (512 rows evenly spaced) of it and the calibration is
fitted on it alone (`calibrate_drift`), exactly as training fits it on a model's training series.
No-drift windows are the later, disjoint part (the last half of `train`, days the calibration never
saw) cut into non-overlapping test windows of `config.span` rows (one day). Drift episodes start at a
random row of that later part; on 10% of the metrics (at least 1, chosen among metrics that vary in the
reference) the mean moves by 2 (and, separately, 1) x the metric's std in the reference (`inject_drift`,
kind mean_shift). Window 1 is the window in which the drift starts (partly drifted), window 2 the next
one; delay = the first flagged window (up to 4). The `smd test` / `asd test` rows test the days of the
`test` split that hold no labelled incident, calibrated on the whole `train` split (as a served model
is). The "anomaly score" for prediction drift is a stand-in needing no trained model: the mean absolute
z-score of a row against the reference's mean and std.

    python benchmarks/drift.py [--out benchmarks/results] [--data DIR]

writes <out>/drift.json (rows: dataset, detector, windows, false_drift_rate, detection_rate_2_windows,
detection_rate_2_windows_1sigma, mean_delay_windows, seconds_per_test, ...) and <out>/drift.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from detect.drift import (  # noqa: E402
    DriftConfig,
    EntityDriftDetectors,
    calibrate_drift,
    entity_drift_config,
    reference_sample,
)
from detect.synthetic import METRICS, generate_fleet, inject_drift  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_ROWS = 512  # what a model version stores per entity
MAX_WINDOWS = 4  # windows after the drift start that an episode is followed for
SHIFT_SHARE = 0.10
MAGNITUDES = (2.0, 1.0)  # injected mean shifts, in reference stds: the target's, then the one reported beside it
DECISIONS = ("calibrated", "iid")  # the decision each result carries: is_drift, extra["iid_is_drift"]
SYNTHETIC = dict(n_machines=16, days=30, reference_days=7, episodes=4, seed=11)
REAL = dict(episodes=15, seed=12)
PERIOD_ROWS = {"synthetic": 1440, "smd": 1440, "asd": 288}  # one day: 1-minute and 5-minute samples


@dataclass
class Case:
    dataset: str
    entity: str
    values: np.ndarray  # time-ordered rows x metrics
    names: list[str]
    reference_end: int  # rows before this are the reference (and calibration) period; the rest is held out
    window_starts: list[int] | None = None  # no-drift windows; default: consecutive ones after reference_end
    calibrate: bool = True


def machine() -> str:
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def synthetic_cases(n_machines: int, days: int, reference_days: int, seed: int, **_: object) -> list[Case]:
    # disk_usage is left out: the generator gives it a monotone fill trend, i.e. real drift by construction
    metrics = [m for m in METRICS if m != "disk_usage"]
    steps = PERIOD_ROWS["synthetic"]
    fleet = generate_fleet(n_machines=n_machines, n_steps=days * steps, metrics=metrics, incidents=False, seed=seed)
    return [
        Case("synthetic", entity, group[metrics].to_numpy(np.float64), metrics, reference_days * steps)
        for entity, group in fleet.frame.groupby("entity", sort=True)
    ]


def real_cases(dataset: str, data_dir: str | None) -> list[Case]:
    """Each entity's `train` split: calibration on its first half, no-drift windows in its second half."""
    from detect.data import list_entities, load_series

    cases = []
    for ds, entity in list_entities(data_dir):
        if ds != dataset:
            continue
        series = load_series(ds, entity, data_dir)
        train = series.train[series.metrics].to_numpy(np.float64)  # test has anomalies: train only
        cases.append(Case(dataset, entity, train, series.metrics, len(train) // 2))
    return cases


def test_day_cases(dataset: str, data_dir: str | None, span: int) -> list[Case]:
    """Each entity calibrated on its whole `train` split (as a served model is), its no-drift windows
    the whole windows of `test` that hold no labelled incident (none for an entity without such a day)."""
    from detect.data import list_entities, load_series

    cases = []
    for ds, entity in list_entities(data_dir):
        if ds != dataset:
            continue
        series = load_series(ds, entity, data_dir)
        train = series.train[series.metrics].to_numpy(np.float64)
        test = series.test[series.metrics].to_numpy(np.float64)
        quiet = [d * span for d in range(len(test) // span) if not series.labels[d * span : (d + 1) * span].any()]
        starts = [len(train) + start for start in quiet]
        cases.append(Case(dataset, entity, np.concatenate([train, test]), series.metrics, len(train), starts))
    return cases


def zscore_scorer(reference: np.ndarray):
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    scale = np.where(std > 1e-12, std, 1.0)
    return lambda rows: np.abs((rows - mean) / scale).mean(axis=1)


class Tally:
    """Per decision (calibrated, iid) and test: the no-drift windows' flags and, per shift magnitude,
    each episode's delay; per test the seconds one test took."""

    def __init__(self) -> None:
        self.flags: dict[str, dict[str, list[bool]]] = {d: defaultdict(list) for d in DECISIONS}
        self.delays: dict[str, dict[float, dict[str, list[int | None]]]] = {
            d: {m: defaultdict(list) for m in MAGNITUDES} for d in DECISIONS
        }
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.calibration_seconds: list[float] = []


def run_tests(
    det: EntityDriftDetectors, rows: np.ndarray, score, seconds, want: set[str]
) -> dict[str, dict[str, bool]]:
    """{decision: {test: drift?}} for one window of consecutive rows; each test's time into `seconds`."""
    results = []
    if want & {"ks", "mmd"}:
        t0 = time.perf_counter()
        results += det.test_inputs(rows)
        both = time.perf_counter() - t0
        t1 = time.perf_counter()  # time KS alone again: it is cheap, so the rest of the call is MMD's
        det.ks_statistics(det.select(rows))
        ks_s = time.perf_counter() - t1
        seconds["ks"].append(min(ks_s, both))
        if len(results) == 2:
            seconds["mmd"].append(max(both - ks_s, 0.0))
    if "prediction_ks" in want:
        t0 = time.perf_counter()
        results.append(det.test_scores(score(rows)))
        seconds["prediction_ks"].append(time.perf_counter() - t0)
    out: dict[str, dict[str, bool]] = {d: {} for d in DECISIONS}
    for r in results:
        if r.detector in want:
            out["calibrated"][r.detector] = r.is_drift
            out["iid"][r.detector] = bool(r.extra["iid_is_drift"])
    return out


def shifted_copy(case: Case, ref: np.ndarray, cols: np.ndarray, start: int, stop: int, magnitude: float) -> np.ndarray:
    """Rows [0, stop) with a `magnitude` x (reference std) mean shift on `cols` from row `start` on."""
    frame = pd.DataFrame(case.values[:stop], columns=case.names)
    for j in cols:
        name = case.names[j]
        sigma_ref = ref[:, j].std()
        pre_std = case.values[:start, j].std()  # inject_drift scales by the pre-drift std
        frame = inject_drift(
            frame, "mean_shift", [name], start, magnitude=magnitude * sigma_ref / pre_std, entity_col=None
        )
    return frame.to_numpy(np.float64)


def entity_detectors(case: Case, cfg: DriftConfig, tally: Tally):
    """The entity's detectors as a served model would have them: reference and calibration from the
    reference period only. Returns (detectors, reference, stand-in scorer)."""
    period = case.values[: case.reference_end]
    ref = reference_sample(period, REFERENCE_ROWS)
    score = zscore_scorer(ref)
    calibration = None
    if case.calibrate:
        t0 = time.perf_counter()
        calibration = calibrate_drift(period, score(period), cfg, REFERENCE_ROWS)
        tally.calibration_seconds.append(time.perf_counter() - t0)
    det = EntityDriftDetectors(
        "bench", case.entity, ref, case.names, reference_scores=score(ref), config=cfg, calibration=calibration
    )
    return det, ref, score


def run_case(case: Case, cfg: DriftConfig, tally: Tally, episodes: int, rng: np.random.Generator, detectors) -> None:
    span = cfg.span
    det, ref, score = entity_detectors(case, cfg, tally)
    starts = case.window_starts
    if starts is None:
        starts = list(range(case.reference_end, len(case.values) - span + 1, span))
    for start in starts:
        for decision, flags in run_tests(
            det, case.values[start : start + span], score, tally.seconds, set(detectors)
        ).items():
            for name, flag in flags.items():
                tally.flags[decision][name].append(flag)
    varying = np.flatnonzero(ref.std(axis=0) > 1e-12)
    k = max(1, math.ceil(SHIFT_SHARE * len(case.names)))
    last_w0 = len(case.values) - MAX_WINDOWS * span
    for _ in range(episodes if last_w0 >= case.reference_end else 0):
        w0 = int(rng.integers(case.reference_end, last_w0 + 1))
        start = w0 + int(rng.integers(0, span))
        cols = rng.choice(varying, size=min(k, len(varying)), replace=False)
        for magnitude in MAGNITUDES:
            values = shifted_copy(case, ref, cols, start, w0 + MAX_WINDOWS * span, magnitude)
            for decision, delays in follow_episode(det, values, w0, span, score, detectors).items():
                for name, d in delays.items():
                    tally.delays[decision][magnitude][name].append(d)


def follow_episode(det, values: np.ndarray, w0: int, span: int, score, detectors) -> dict[str, dict[str, int | None]]:
    """{decision: {test: first flagged window (1 = the one the drift starts in), None if none of 4}}."""
    delay = {d: dict.fromkeys(detectors) for d in DECISIONS}
    for w in range(1, MAX_WINDOWS + 1):
        pending = {name for d in DECISIONS for name in detectors if delay[d][name] is None}
        if not pending:
            break
        rows = values[w0 + (w - 1) * span : w0 + w * span]
        for decision, flags in run_tests(det, rows, score, defaultdict(list), pending).items():
            for name, flag in flags.items():
                if flag and delay[decision][name] is None:
                    delay[decision][name] = w
    return delay


def rate_within(delays: list[int | None], windows: int) -> float | None:
    return round(sum(d is not None and d <= windows for d in delays) / len(delays), 4) if delays else None


def with_any(tally: Tally, decision: str) -> tuple[dict, dict, dict, dict]:
    """The tests' flags and delays per window and episode and their mean seconds per test, plus `any`: the
    monitor's own decision (a window drifts when any of its tests flags it; an episode is found at the
    first window any test flags; it costs the tests' seconds together). The tally is left as measured."""
    flags = dict(tally.flags[decision])
    main, beside = (dict(tally.delays[decision][m]) for m in MAGNITUDES)
    seconds = {name: float(np.mean(times)) for name, times in tally.seconds.items() if times}
    names = [n for n in ("ks", "mmd", "prediction_ks") if n in flags]
    if len(names) < 2:
        return flags, main, beside, seconds
    flags["any"] = [any(window) for window in zip(*(flags[n] for n in names), strict=True)]
    for delays in (main, beside):
        episodes = zip(*(delays.get(n, []) for n in names), strict=True)
        delays["any"] = [min((d for d in episode if d is not None), default=None) for episode in episodes]
    seconds["any"] = sum(seconds.get(n, 0.0) for n in names)
    return flags, main, beside, seconds


def summarise(dataset: str, cfg: DriftConfig, tally: Tally, decision: str, note: str = "") -> list[dict]:
    rows = []
    flags_by_test, main, beside, seconds = with_any(tally, decision)
    for name in ("ks", "mmd", "prediction_ks", "any"):
        if name not in flags_by_test:
            continue
        flags, delays = flags_by_test[name], main.get(name, [])
        detected = [d for d in delays if d is not None]
        rows.append(
            {
                "dataset": dataset,
                "detector": name,
                "decision": decision,
                "windows": len(flags),
                "false_drifts": int(sum(flags)),
                "false_drift_rate": round(float(np.mean(flags)), 4) if flags else None,
                "episodes": len(delays),
                "shift_sigma": MAGNITUDES[0],
                "detection_rate_2_windows": rate_within(delays, 2),
                "detection_rate_4_windows": rate_within(delays, MAX_WINDOWS),
                "mean_delay_windows": round(float(np.mean(detected)), 3) if detected else None,
                "detection_rate_2_windows_1sigma": rate_within(beside.get(name, []), 2),
                "seconds_per_test": round(seconds[name], 4) if name in seconds else None,
                "calibration_seconds_per_entity": (
                    round(float(np.mean(tally.calibration_seconds)), 2)
                    if decision == "calibrated" and tally.calibration_seconds
                    else None
                ),
                "window_rows": cfg.window,
                "thin": cfg.thin,
                "span_rows": cfg.span,
                "p_value": cfg.p_value,
                "note": note,
            }
        )
    return rows


def bench(
    dataset: str, cases: list[Case], cfg: DriftConfig, episodes: int, seed: int, detectors, note=""
) -> list[dict]:
    """The calibrated rows under `dataset`, then the same windows' iid decisions as `<dataset> uncalibrated`
    (only the latter where the cases are not calibrated)."""
    tally, rng = Tally(), np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i, case in enumerate(cases, 1):
        run_case(case, cfg, tally, episodes, rng, detectors)
        flags = {k: f"{sum(v)}/{len(v)}" for k, v in tally.flags["calibrated"].items()}
        print(f"[{dataset}] {i}/{len(cases)} {case.entity}: false drifts so far {flags}", file=sys.stderr, flush=True)
    calibrated = all(c.calibrate for c in cases)
    rows = summarise(dataset, cfg, tally, "calibrated", note) if calibrated else []
    rows += summarise(f"{dataset} uncalibrated" if calibrated else dataset, cfg, tally, "iid", note)
    print(f"[{dataset}] done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return rows


def naive_cases(cases: list[Case]) -> list[Case]:
    """The same series, but the reference is the last 512 consecutive rows of the reference period and
    the decision is the iid one."""
    return [
        Case(
            c.dataset,
            c.entity,
            np.concatenate([c.values[c.reference_end - REFERENCE_ROWS : c.reference_end], c.values[c.reference_end :]]),
            c.names,
            REFERENCE_ROWS,
            calibrate=False,
        )
        for c in cases
    ]


def alternate_day_cases(cases: list[Case], span: int) -> list[Case]:
    """Whole days, reference (and calibration) from the even ones, no-drift windows from the odd ones:
    no trend between reference and held-out periods, only day-to-day variation."""
    out = []
    for c in cases:
        days = [c.values[i * span : (i + 1) * span] for i in range(len(c.values) // span)]
        reference, held_out = np.concatenate(days[0::2]), np.concatenate(days[1::2])
        out.append(Case(c.dataset, c.entity, np.concatenate([reference, held_out]), c.names, len(reference)))
    return out


def write(rows: list[dict], out: Path, seconds: float, cpu_seconds: float, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(rows, indent=2) + "\n")

    def fmt(v, pct=False):
        if v is None:
            return "–"
        return f"{100 * v:.1f}%" if pct else str(v)

    lines = [
        f"Drift detection, measured on {machine()} ({time.strftime('%Y-%m-%d')}): {seconds:.0f}s wall, "
        f"{cpu_seconds:.0f}s CPU (torch 1 thread). Wall time well above CPU time means the cores were shared "
        "with other jobs, and seconds_per_test are then upper bounds.",
        f"Command: `{command}`",
        "",
        "Targets (issue 18): on the held-out `train` days of the shipped SMD and ASD series (rows `smd`, `asd`) a "
        "false-drift rate <= 5% per test type, and a 2-sigma mean shift on 10% of the metrics detected within 2 "
        "windows in >= 90% of episodes (the 1-sigma rate beside it); the synthetic figures no worse than before.",
        "",
        "| dataset | detector | windows | false drifts | false_drift_rate | episodes | detection_rate_2_windows (2 sigma) "
        "| detection_rate_2_windows_1sigma | mean_delay_windows (2 sigma) | seconds_per_test | calibration s/entity "
        "| window (thin x rows = span) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['detector']} | {r['windows']} | {r['false_drifts']} | "
            f"{fmt(r['false_drift_rate'], True)} | {r['episodes'] or '–'} | {fmt(r['detection_rate_2_windows'], True)} | "
            f"{fmt(r['detection_rate_2_windows_1sigma'], True)} | {fmt(r['mean_delay_windows'])} | "
            f"{r['seconds_per_test']} | {fmt(r['calibration_seconds_per_entity'])} | "
            f"{r['thin']} x {r['window_rows']} = {r['span_rows']} |"
        )
    lines += [
        "",
        "What the rows are (benchmarks/drift.py, fixed seeds):",
        "",
        "- A **window** is one day of consecutive rows (1,440 one-minute rows for synthetic and smd, kept every "
        "6th: 240; 288 five-minute rows for asd, all kept; `DriftConfig.for_period`). One test per window; a day "
        "counts as a false drift when the test flags its window. `windows` = the no-drift days tested.",
        "- `smd`, `asd`, `synthetic`: the **calibrated** decision. Each entity is calibrated on the earlier part of "
        "its series only (smd/asd: the first half of `train`; synthetic: the first 7 of 30 days) and its reference "
        "is 512 rows evenly spaced over that part; the no-drift days are the later part (smd/asd: the last half of "
        "`train`, days the calibration never saw). Shift episodes start at a random row of the later part.",
        "- `... uncalibrated`: the same tests on the same windows and episodes with the iid decision (p = 0.005 per "
        "test, Bonferroni across features for KS, 200 permutations for MMD): what the monitors did before.",
        "- `smd test`, `asd test`: the days of the `test` split that hold no labelled incident (smd: 7 days, all "
        "of machine-2-1; asd: 29 days), calibrated on the whole `train` split as a served model is. The machines "
        "may really have changed between the two periods, so these are not all false drifts.",
        "- `asd monitor windows`, `asd test monitor windows`: the `asd` and `asd test` rows with the windows the "
        "monitors test ASD machines with (`detect.drift.entity_drift_config`: whole days and at least 300 rows, so "
        "two days of 288 five-minute rows, every 2nd kept), and which training calibrates them for. A window is "
        "then two days; `windows` counts them.",
        "- `alternate days`: calibration and reference from the even days of `train`, no-drift days = the odd days "
        "(day-to-day variation without a trend). `synthetic naive`: 240 consecutive rows per window against the "
        "last 512 rows before them, iid decision.",
        "- Shift: + magnitude x the metric's reference std (`inject_drift`, mean_shift) on 10% of the metrics "
        "(synthetic 1 of 9, smd 4 of 38, asd 2 of 19), chosen among metrics that vary in the reference; 2 sigma "
        "(`detection_rate_2_windows`, delay) and 1 sigma (`detection_rate_2_windows_1sigma`) on the same episodes. "
        "Window 1 is the window in which the shift starts (partly shifted), window 2 the next.",
        "- prediction_ks: the anomaly score is a stand-in, the mean absolute z-score of a row against the "
        "reference, so no trained model is needed.",
        "- `any`: the monitor's own decision, which its retraining trigger acts on: a window drifts when any of "
        "its tests flags it, and an episode is found at the first window any test flags. Its seconds_per_test "
        "is the sum of the tests'.",
        "",
        "The calibration (`detect/drift_calibration.py`, fitted by `detect.drift.calibrate_drift` at training time "
        "and stored with the reference):",
        "",
        "- **Null from the entity's own days.** Each whole training window is tested against a reference drawn from "
        "all the other training windows (leave one day out), with the same statistics the monitor uses (alibi-detect "
        "KSDrift distances per metric, MMDDrift's MMD^2, KSDrift on the scores). Days are the resampling unit, so "
        "neither independence of rows nor of neighbouring rows is assumed.",
        "- **Effective sample size.** Each statistic's null is its iid law with a free scale (1/sqrt(n_eff)): the "
        "Kolmogorov law for a KS distance, the half-normal law for sqrt(MMD^2). The scale is a 99% upper confidence "
        "bound given the largest of the N null distances (N = 8 days per smd entity, 15 per asd entity here). A "
        "window's calibrated p-value is that law's tail at its distance, never below the iid p-value; the level "
        "(0.005) and the Bonferroni correction apply as before.",
        "- **KS counts a metric only if it moved at least 0.5 reference std** (Wasserstein-1): KS is a rank test, "
        "and a quantised metric stepping to the adjacent value (asd/omi-1's m03 on train days 23-25) or a sine whose "
        "phase wobbles reaches KS distances of 0.3-0.9 for a move of a few hundredths of a std.",
        "- **MMD** divides each standardised metric by its largest day-to-day move in the calibration days (at least "
        "1), so metrics whose normal days already move by several stds do not drown the kernel.",
        "- Cost: calibration runs 2N tests per entity at training time (`calibration s/entity`, without MMD "
        "permutations); a monitored test costs what it did (`seconds_per_test`; MMD's is its 200 permutations, "
        "kept for the iid p-value reported beside the calibrated one).",
        "- Constants (global, not per entity): the level 0.005, the 99% confidence bound, the 0.5-std movement for "
        "KS, the two laws. They were chosen while looking at these six entities (0.9 confidence left 4 of 24 smd "
        "days flagged by KS), so held-out machines are the fair test.",
        "",
        "Met: KS on both real sets (smd 0 of 24 held-out days, 91.1% of 2-sigma episodes within 2 windows; asd 2 of "
        "45, 100%) and MMD on asd (1 of 45, 100%); no test flags more than 5% of held-out days. The monitor's own "
        "decision (`any`, what its retraining trigger acts on) meets both on both sets: smd 0 of 24 days, 91.1%; asd "
        "2 of 45 (4.4%), 100%. Synthetic: no false drift, and the 1-sigma detection of KS, MMD and `any` is still "
        "100% (the figure the old table reported).",
        "",
        "The windows the monitors test ASD machines with (`asd monitor windows`: two days, which training now "
        "calibrates for): `any` flags 1 of 21 held-out two-day windows (4.8%, MMD) and finds 100% of the 2-sigma "
        "and of the 1-sigma episodes within 2 windows; on the 9 incident-free two-day windows of `test` nothing "
        "fires (KS alone fires on 7 of them uncalibrated).",
        "",
        "Not met, measured: (1) MMD on smd detects the 2-sigma shift in 0 of 45 episodes: its null from 8 days is "
        "dominated by a few metrics whose days differ a lot, and with 8 days the 99% bound puts the critical value "
        "at about 3.6 x the largest null sqrt(MMD^2), above what a shift of 4 of 38 metrics reaches (about 1.8 x on machine-3-3). "
        "(2) prediction_ks on the stand-in score detects it in 6.7% (smd), 64.4% (asd) and 79.7% (synthetic) of "
        "episodes: the stand-in moves by about a tenth of the shift, inside its day-to-day spread (a trained "
        "model's score, which the monitors use, reacts more). KS is the test to trigger retraining on real series. "
        "`smd test`: KS flags 4 of the 7 incident-free test days of machine-2-1, which may be real change between "
        "the periods.",
        "",
    ]
    (out / "drift.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS), help="directory for drift.json and drift.md")
    parser.add_argument("--data", default=None, help="telemetry directory (default: the shipped sets)")
    parser.add_argument(
        "--only", default=None, help="comma-separated parts to run (synthetic, smd, asd); all when omitted"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    import torch

    torch.set_num_threads(1)
    parts = set(args.only.split(",")) if args.only else {"synthetic", "smd", "asd"}
    t0, c0 = time.perf_counter(), time.process_time()
    rows = []
    all_tests = ("ks", "mmd", "prediction_ks")
    if "synthetic" in parts:
        synth = synthetic_cases(**SYNTHETIC)
        cfg = DriftConfig.for_period(PERIOD_ROWS["synthetic"])
        rows += bench("synthetic", synth, cfg, SYNTHETIC["episodes"], SYNTHETIC["seed"], all_tests)
        naive = DriftConfig(window=240, thin=1, use_mmd=False)
        rows += bench("synthetic naive", naive_cases(synth), naive, 0, SYNTHETIC["seed"], ("ks", "prediction_ks"))
    for dataset in ("smd", "asd"):
        if dataset not in parts:
            continue
        cfg = DriftConfig.for_period(PERIOD_ROWS[dataset])
        cases = real_cases(dataset, args.data)
        rows += bench(dataset, cases, cfg, REAL["episodes"], REAL["seed"], all_tests)
        rows += bench(f"{dataset} test", test_day_cases(dataset, args.data, cfg.span), cfg, 0, REAL["seed"], all_tests)
        alternate = alternate_day_cases(cases, cfg.span)
        rows += bench(f"{dataset} alternate days", alternate, cfg, 0, REAL["seed"], all_tests)
        monitored = entity_drift_config(f"{dataset}/entity")  # the windows a monitor tests this dataset with
        if monitored.span != cfg.span:
            name = f"{dataset} monitor windows"
            rows += bench(name, cases, monitored, REAL["episodes"], REAL["seed"], all_tests)
            test_days = test_day_cases(dataset, args.data, monitored.span)
            rows += bench(f"{dataset} test monitor windows", test_days, monitored, 0, REAL["seed"], all_tests)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    command = "python benchmarks/drift.py" + "".join(
        f" --{k} {v}" for k, v in (("out", args.out), ("only", args.only)) if v and v != str(RESULTS)
    )
    write(rows, Path(args.out), seconds, cpu_seconds, command)
    for r in rows:
        print(
            f"{r['dataset']:28s} {r['detector']:14s} false {r['false_drifts']}/{r['windows']} "
            f"det2 {r['detection_rate_2_windows']} det2@1sigma {r['detection_rate_2_windows_1sigma']} "
            f"delay {r['mean_delay_windows']} {r['seconds_per_test']}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
