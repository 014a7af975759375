"""Replay real entities through the running platform, the self-retraining loop against a static champion.

    python benchmarks/replay.py --data DIR [--entities dataset/entity,...] [--out FILE.json] [--model autoencoder]

Per entity the detector is fitted in-process on the `train` split (small: `--epochs`, `--hidden`) and
registered as champion. Its `test` split is then streamed in time order through `/v1/score/batch` of a
Serve app on a local `ray start --head` (the approach of benchmarks/drift_loop.py), four times:

- variant `as_is` (the rows as recorded) and `shift` (+2 pre-shift sigma on 10% of the metrics (seeded) from
  half-way through the replayed rows on, `detect.synthetic.inject_mean_shift`);
- mode `loop` (drift monitors live, retraining jobs submitted on drift, promotions served) and `static`
  (the same monitors, retraining off: the champion serves every row). Same rows, same thresholds and
  alert rules: whatever the registered version and the monitors currently do.

Time is compressed. Rows go in chunks of a quarter day; after each the replay waits until the monitor
has tested what was sent, so every drift event is dated to the chunk whose rows completed its window;
in `loop` mode it also waits for a running retraining job and for its decision to be served before it
sends more (a job takes minutes, a replayed day seconds: without the pause every promotion would land
after the split ended). The trigger's cooldown is given in wall seconds (`--cooldown-s`, default 0:
the platform's 15-minute cooldown is 15 minutes of data, less than a chunk), so the number of jobs is
what the retraining gate lets through (`monitoring.trigger.RetrainGate` at the platform's defaults: drift
in 2 consecutive windows, at most one training per 7 windows, counted in the replayed data's windows).

The operator's figures use what was served: `anomaly_score` (PR-AUC over the labelled rows) and
`is_anomaly` grouped into alerts by `detect.alerting.group_alerts` (3 of 5 rows open an alert, 10
quiet rows close it), judged by `detect.metrics.alert_scores` (event precision and recall). Drift
events and jobs come from `/v1/drift`, decisions from `/v1/models` and `/v1/drift` (with their job).
Writes benchmarks/results/replay.json (or --out) and the .md beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported: the head keeps token auth on

RESULTS = Path(__file__).resolve().parent / "results"
PORT = 8140
CHUNKS_PER_DAY = 4
VARIANTS = ("as_is", "shift")
MODES = ("loop", "static")
RECORD_KEYS = (
    "entity",
    "variant",
    "mode",
    "days",
    "rows",
    "served_pr_auc",
    "served_f1_operational_after_shift",
    "event_precision",
    "event_recall",
    "alerts",
    "drift_events",
    "drift_events_normal_days",
    "normal_days",
    "jobs",
    "promotions",
    "keeps",
    "recalibrations",
    "decisions",
    "minutes",
)
MEAN_KEYS = (
    "served_pr_auc",
    "served_f1_operational_after_shift",
    "event_precision",
    "event_recall",
    "drift_events",
    "drift_events_normal_days",
    "jobs",
    "promotions",
    "keeps",
    "recalibrations",
)


# -- the pure parts (tests/test_replay.py) ---------------------------------------------------------------
def event_rows(event_times: list[float], sent: list[tuple[float, int]]) -> list[int]:
    """The replayed row each drift event is dated to: the last row of the newest chunk sent before the
    event was recorded (`sent`: (wall time the chunk was sent, its last row), in order)."""
    times = np.array([t for t, _ in sent])
    rows = np.array([r for _, r in sent])
    at = np.searchsorted(times, np.asarray(event_times, dtype=np.float64), side="right") - 1
    return [int(rows[max(i, 0)]) for i in at]


def normal_days(labels: np.ndarray, day_rows: int) -> np.ndarray:
    """Per replayed day (a partial last day counts), whether it holds no labelled incident row."""
    days = -(-len(labels) // day_rows)
    return np.array([not np.asarray(labels[d * day_rows : (d + 1) * day_rows]).any() for d in range(days)])


def drift_events_on_normal_days(rows: list[int], labels: np.ndarray, day_rows: int) -> int:
    """Drift events dated to a day without a labelled incident: on real data the tests' false alarms, or
    real change that the labels do not call an incident."""
    normal = normal_days(labels, day_rows)
    return sum(bool(normal[min(r // day_rows, len(normal) - 1)]) for r in rows)


def served_figures(labels: np.ndarray, scores: np.ndarray, flags: np.ndarray, shift_row: int | None) -> dict:
    """What the operator received, judged: PR-AUC of the served scores, alerts grouped from the served
    flags (the alerting rules serving uses) with their event precision and recall, and point-wise F1 of
    the served flags after the shift (None without one)."""
    from detect import metrics as M
    from detect.alerting import group_alerts

    labels = np.asarray(labels).astype(int)
    flags = np.asarray(flags, dtype=np.float64)
    alerts = group_alerts(flags, 0.5)
    recall, precision, _ = M.alert_scores(labels, alerts)
    has_incident = bool(labels.any())
    after = slice(shift_row, None) if shift_row is not None else None
    f1_after = None
    if after is not None and labels[after].any():
        f1_after = round(M.f1_at(labels[after], flags[after], 0.5), 4)
    return {
        "served_pr_auc": round(M.pr_auc(labels, np.asarray(scores, dtype=np.float64)), 4) if has_incident else None,
        "served_f1_operational_after_shift": f1_after,
        "event_precision": round(precision, 4),
        "event_recall": round(recall, 4) if has_incident else None,
        "alerts": len(alerts),
    }


def make_record(entity: str, variant: str, mode: str, **figures: Any) -> dict[str, Any]:
    """One replay record with every key of RECORD_KEYS (missing figures are None)."""
    record = {"entity": entity, "variant": variant, "mode": mode, **figures}
    unknown = set(record) - set(RECORD_KEYS)
    if unknown:
        raise ValueError(f"unknown replay figures {sorted(unknown)}")
    return {k: record.get(k) for k in RECORD_KEYS}


def means(records: list[dict[str, Any]], variant: str, mode: str) -> dict[str, float | None]:
    """Mean of each figure over the entities of one variant and mode (None figures left out)."""
    rows = [r for r in records if r["variant"] == variant and r["mode"] == mode]
    out: dict[str, float | None] = {}
    for key in MEAN_KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = round(float(np.mean(values)), 4) if values else None
    return out


def targets(records: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The issue's done-when figures on these records: (target, met or None when unmeasured, figures)."""

    def pair(variant: str, key: str) -> dict[str, tuple[Any, Any]]:
        by = {(r["entity"], r["mode"]): r[key] for r in records if r["variant"] == variant}
        entities = sorted({e for e, _ in by})
        return {e: (by.get((e, "loop")), by.get((e, "static"))) for e in entities}

    out: list[tuple[str, bool | None, str]] = []
    auc = {e: (lo, st) for e, (lo, st) in pair("as_is", "served_pr_auc").items() if lo is not None and st is not None}
    if auc:
        gaps = {e: lo - st for e, (lo, st) in auc.items()}
        mean_gap = float(np.mean(list(gaps.values())))
        worst = min(gaps.values())
        out.append(
            (
                "as_is: served PR-AUC loop >= static in the mean, and at most 0.02 lower on any entity",
                mean_gap >= 0 and worst >= -0.02,
                f"mean loop - static {mean_gap:+.4f}, worst entity {worst:+.4f}",
            )
        )
    weekly = [
        (r["entity"], 7 * r["jobs"] / r["days"]) for r in records if r["variant"] == "as_is" and r["mode"] == "loop"
    ]
    if weekly:
        worst_entity, worst_rate = max(weekly, key=lambda x: x[1])
        out.append(
            (
                "as_is: at most 1 retraining job per entity per 7 replayed days",
                worst_rate <= 1,
                f"most: {worst_rate:.2f} jobs per 7 days ({worst_entity})",
            )
        )
    f1 = [(lo, st) for lo, st in pair("shift", "served_f1_operational_after_shift").values() if None not in (lo, st)]
    if f1:
        gain = float(np.mean([lo - st for lo, st in f1]))
        out.append(
            (
                "shift: served F1 after the shift at least 0.05 higher with the loop, in the mean",
                gain >= 0.05,
                f"mean loop - static {gain:+.4f}",
            )
        )
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# the table's columns: a record's figures, without what identifies it or explains it
TABLE_KEYS = tuple(
    k for k in RECORD_KEYS if k not in ("entity", "variant", "mode", "rows", "normal_days", "decisions", "minutes")
)


def markdown(records: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """A table per variant, loop beside static per entity and in the mean, the targets and the method."""
    lines = [
        f"Replay of real entities through the platform, measured on {settings['machine']} ({settings['date']}), "
        f"`{settings['command']}`; {settings['minutes']} min in all.",
        "",
    ]
    for variant in VARIANTS:
        rows = [r for r in records if r["variant"] == variant]
        if not rows:
            continue
        lines += [f"## {variant}", "", "| entity | mode | " + " | ".join(TABLE_KEYS) + " |"]
        lines.append("|---|---|" + "---|" * len(TABLE_KEYS))
        for entity in sorted({r["entity"] for r in rows}):
            for mode in MODES:
                for r in rows:
                    if r["entity"] == entity and r["mode"] == mode:
                        lines.append(f"| {entity} | {mode} | " + " | ".join(_fmt(r[k]) for k in TABLE_KEYS) + " |")
        for mode in MODES:
            m = means(records, variant, mode)
            lines.append(f"| **mean** | {mode} | | " + " | ".join(_fmt(m.get(k)) for k in TABLE_KEYS[1:]) + " |")
        lines.append("")
    lines += ["## Targets (issue 18)", "", "| target | met | figures |", "|---|---|---|"]
    for name, met, figures in targets(records):
        lines.append(f"| {name} | {'yes' if met else 'no'} | {figures} |")
    lines += ["", "## How it was measured", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items() if k not in ("machine", "date", "command", "minutes")]
    lines += [
        "- Per entity the detector is fitted in-process on the `train` split and registered as champion; the "
        "`test` split is streamed in time order through `POST /v1/score/batch` in chunks of a quarter day, "
        "faster than real time. After each chunk the replay waits until the monitor has tested it; in `loop` "
        "mode it also waits for a running retraining job and its served decision (time compression: a job's "
        "minutes are no data time).",
        "- `static`: the same app and monitors with retraining off (`monitor.config.retrain = false`), so its "
        "drift events are the same tests' and its jobs are 0.",
        "- served_pr_auc: average precision of the served `anomaly_score` over the replayed rows; alerts: the "
        "served `is_anomaly` grouped by `detect.alerting.group_alerts`; event precision/recall by "
        "`detect.metrics.alert_scores` (an entity with no alert has precision 0).",
        "- served_f1_operational_after_shift: point-wise F1 of the served `is_anomaly` over the rows after the "
        "shift (`shift` only). The shift: +2 sigma (pre-shift std) on 10% of the metrics (seeded), from the "
        "middle of the replayed rows on (`detect.synthetic.inject_mean_shift`).",
        "- drift_events: events with `is_drift` in `/v1/drift` for the entity; drift_events_normal_days: those "
        "dated to a day (rows_per_day rows) without a labelled incident row; normal_days: such days replayed.",
        "- jobs: retraining jobs submitted during the replay; promotions / keeps: their decisions (a challenger "
        "promoted or not); recalibrations: kept champions whose threshold the job fitted again on the recent rows "
        "believed normal, served as a new version (`train.retrain.recalibrate`).",
    ]
    return "\n".join(lines) + "\n"


# -- the platform ------------------------------------------------------------------------------------------
@dataclass
class Replayed:
    """One replay's served columns and what the loop did, before they are judged."""

    scores: np.ndarray
    flags: np.ndarray
    event_rows: list[int]
    jobs: list[str]
    decisions: list[dict[str, Any]]


class Platform:
    """A local head, one MLflow store and the Serve app, redeployed per replay with its own state folder
    (fresh history, monitors, drift events and decisions) and the registered champion it must serve."""

    def __init__(self, workdir: Path, port: int, model: str) -> None:
        self.workdir, self.port, self.model = workdir, port, model
        self.head: Any = None
        self.client: Any = None

    def start(self) -> Platform:
        import httpx
        import ray
        from ray import serve

        from cluster.local import LocalHead

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{self.workdir / 'mlflow.db'}"  # the head's jobs use it
        self.head = LocalHead(num_cpus=2, log_path=self.workdir / "ray-start.log").start()
        ray.init(address=self.head.address, log_to_driver=False)
        os.environ["RAYWATCH_JOB_ADDRESS"] = self.head.dashboard_url
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=300)
        return self

    def stop(self) -> None:
        import ray
        from ray import serve

        from monitoring import monitor

        if self.client is not None:
            self.client.close()
        try:
            serve.shutdown()
            monitor.stop_all()
        finally:
            ray.shutdown()
            if self.head is not None:
                self.head.stop()

    def deploy(self, run: str, version: str, monitor_config: dict[str, Any]) -> None:
        """Serve `version` as champion with fresh state and these monitors; returns once it answers."""
        from ray import serve

        from monitoring import monitor
        from serve.app import build_app

        monitor.stop_all()  # detached actors of the previous replay: they hold its state folder
        state = self.workdir / "state" / run
        app = build_app({"reload_interval_s": 0.5, "state_dir": str(state), "monitor": {"config": monitor_config}})
        serve.run(app, name="raywatch", route_prefix="/")
        self.wait_for_champion(version)

    def champion(self) -> str | None:
        slots = self.client.get("/v1/models").json()["models"][self.model]["slots"]
        return (slots.get("champion") or {}).get("version")

    def wait_for_champion(self, version: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.champion() != version:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.model} v{version} is not served after {timeout_s:.0f} s")
            time.sleep(0.5)

    def drift(self, **params: Any) -> dict[str, Any]:
        return self.client.get("/v1/drift", params={"model": self.model, **params}).json()

    def wait_for_monitor(self, settle_s: float = 1.0, timeout_s: float = 120) -> None:
        """Until the ingress queue is drained and the monitor's last call had time to finish its tests."""
        deadline = time.monotonic() + timeout_s
        while self.drift(limit=1)["monitor_queue"]["pending"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(settle_s)

    def score(self, entity: str, metrics: list[str], rows: np.ndarray, first_row: int) -> dict[str, Any]:
        body = {
            "entity": entity,
            "metrics": metrics,
            "values": rows.tolist(),
            "timestamps": [float(first_row + k) for k in range(len(rows))],
            "detectors": [self.model],
        }
        response = self.client.post("/v1/score/batch", json=body)
        response.raise_for_status()
        return response.json()["detectors"][self.model]

    def finish_job(self, job: dict[str, Any], done: dict[str, dict[str, Any]]) -> None:
        """Wait for a retraining job, keep its decision, and wait until a promotion is served."""
        from train import jobs

        state = jobs.wait(job["job_id"], timeout_s=900, address=self.head.dashboard_url)
        decision = next(
            (d for d in self.drift(limit=1)["retraining"][self.model]["decisions"] if d["job_id"] == job["job_id"]),
            None,
        )
        done[job["job_id"]] = {"job_id": job["job_id"], "status": state, **_decision_summary(decision)}
        details = (decision or {}).get("details") or {}
        if decision and decision["promoted"]:
            self.wait_for_champion(str(details.get("champion_after") or decision["challenger"]))
        elif details.get("recalibrated"):  # the kept champion, its threshold fitted again: served as champion
            self.wait_for_champion(str(details["recalibrated_version"]))


def _decision_summary(decision: dict[str, Any] | None) -> dict[str, Any]:
    if decision is None:
        return {"promoted": None, "reason": "no decision recorded (the job failed?)"}
    details = decision.get("details") or {}
    keys = ("test", "p_value", "budget", "refused", "recalibrated", "recalibrated_bars")
    return {"promoted": decision["promoted"], "reason": decision["reason"], **{k: details.get(k) for k in keys}}


def replay(
    platform_: Platform,
    entity: str,
    metrics: list[str],
    rows: np.ndarray,
    day_rows: int,
    loop: bool,
    progress: Callable[[str], None],
) -> Replayed:
    """Stream the rows in quarter-day chunks, waiting for the monitor (and in the loop for each job)."""
    chunk = max(1, day_rows // CHUNKS_PER_DAY)
    scores, flags, sent = [], [], []
    done: dict[str, dict[str, Any]] = {}
    total_days = len(rows) / day_rows
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        sent.append((time.time(), start + len(part) - 1))
        served = platform_.score(entity, metrics, part, start)
        scores += served["anomaly_score"]
        flags += served["is_anomaly"]
        platform_.wait_for_monitor()
        job = platform_.drift(limit=1)["retraining"][platform_.model]["last_job"] if loop else None
        if job and job["job_id"] not in done:
            progress(f"    day {(start + len(part)) / day_rows:.1f}: drift -> job {job['job_id']}, waiting")
            platform_.finish_job(job, done)
            progress(f"      {done[job['job_id']]}")
        if (start // chunk + 1) % CHUNKS_PER_DAY == 0:
            progress(f"    day {(start + len(part)) / day_rows:.0f}/{total_days:.1f} replayed")
    events = [e for e in platform_.drift(only_drift=True, entity=entity, limit=1000)["events"]]
    return Replayed(
        np.asarray(scores, dtype=np.float64),
        np.asarray(flags, dtype=bool),
        event_rows([e["time"] for e in events], sent),
        list(done),
        list(done.values()),
    )


def fit_champion(model: str, series: Any, epochs: int, hidden: int) -> tuple[Any, np.ndarray]:
    """The entity's detector, fitted in-process on its train split (small, so six entities fit the budget)."""
    from detect.sequence import AutoencoderDetector, LSTMDetector

    kinds = {"autoencoder": AutoencoderDetector, "lstm": LSTMDetector}
    train = series.train[series.metrics].to_numpy(dtype=np.float64)
    return kinds[model](epochs=epochs, hidden=hidden).fit(train, series.metrics), train


def replay_entity(platform_: Platform, dataset: str, name: str, args: argparse.Namespace, log: Callable) -> list[dict]:
    """Both variants and modes of one entity: fitted once, registered afresh before every replay."""
    from detect.data import load_series
    from detect.synthetic import inject_mean_shift
    from train.pipeline import register_fitted

    series = load_series(dataset, name, args.data)
    entity, day_rows = series.name, args.rows_per_day or series.rows_per_day
    values = series.test[series.metrics].to_numpy(dtype=np.float64)
    labels = series.labels.astype(int)
    if args.days:
        values, labels = values[: args.days * day_rows], labels[: args.days * day_rows]
    t0 = time.perf_counter()
    det, train = fit_champion(args.model, series, args.epochs, args.hidden)
    log(f"  {entity}: fitted on {len(train)} train rows in {time.perf_counter() - t0:.0f} s")
    # test windows: whole days at the series' sampling rate (detect.drift.entity_drift_config), recorded with
    # its reference as its training calibrated
    drift = {"mmd_permutations": args.mmd_permutations}
    rate = {entity: series.rows_per_day}
    out = []
    for variant in args.variants:
        shift_row = len(values) // 2 if variant == "shift" else None
        rows = values if shift_row is None else inject_mean_shift(values, series.metrics, shift_row)[0]
        for mode in args.modes:
            started = time.perf_counter()
            log(f"  {entity} {variant} {mode}: {len(rows)} rows ({len(rows) / day_rows:.1f} days)")
            version = register_fitted(
                args.model, {entity: det}, {entity: series.metrics}, {entity: train}, rows_per_day=rate
            )
            config = {
                "drift": drift,
                "retrain": mode == "loop",
                "cooldown_s": args.cooldown_s,
                "retrain_persist_windows": args.persist_windows,
                "retrain_min_days_between": args.min_days_between,
                "concept_every_s": 10**9,  # no /v1/feedback labels are sent: the operator's view, unlabelled
                # direct: days pass in minutes here, so a canary's wall-clock hold times would judge nothing
                # (and wait_for_champion would time out while the canary waited for traffic)
                "retrain_args": ["--epochs", str(args.epochs), "--cpus-per-worker", "0.25", "--promote-via", "direct"]
                + (["--recalibrate"] if args.recalibrate else []),
            }
            platform_.deploy(f"{entity.replace('/', '-')}-{variant}-{mode}", version, config)
            done = replay(platform_, entity, series.metrics, rows, day_rows, mode == "loop", log)
            record = make_record(
                entity,
                variant,
                mode,
                days=round(len(rows) / day_rows, 2),
                rows=len(rows),
                **served_figures(labels, done.scores, done.flags, shift_row),
                drift_events=len(done.event_rows),
                drift_events_normal_days=drift_events_on_normal_days(done.event_rows, labels, day_rows),
                normal_days=int(normal_days(labels, day_rows).sum()),
                jobs=len(done.jobs),
                promotions=sum(bool(d["promoted"]) for d in done.decisions),
                keeps=sum(d["promoted"] is False for d in done.decisions),
                recalibrations=sum(bool(d.get("recalibrated")) for d in done.decisions),
                decisions=done.decisions,
                minutes=round((time.perf_counter() - started) / 60, 1),
            )
            log("    " + json.dumps({k: v for k, v in record.items() if k != "decisions"}, default=str))
            out.append(record)
    return out


def main(argv: list[str] | None = None) -> int:
    from monitoring.monitor import MonitorConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a folder in the shipped layout (default: the shipped data)")
    parser.add_argument("--entities", help="comma-separated dataset/entity (default: every entity in --data)")
    parser.add_argument("--out", default=str(RESULTS / "replay.json"))
    parser.add_argument("--model", default="autoencoder", choices=("autoencoder", "lstm"))
    parser.add_argument("--workdir", default="runs/bench-replay")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--epochs", type=int, default=3, help="initial fit and every retraining job")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--days", type=int, help="replay only the first N days of each test split")
    parser.add_argument(
        "--rows-per-day",
        type=int,
        help="override the day length the tables count days in (default and drift windows: the series' rate)",
    )
    parser.add_argument("--cooldown-s", type=float, default=0.0, help="the trigger's cooldown, wall seconds")
    gate = "the retraining gate's %s (default: the platform's, %g)"
    persist, between = MonitorConfig.retrain_persist_windows, MonitorConfig.retrain_min_days_between
    parser.add_argument("--persist-windows", type=int, default=persist, help=gate % ("persistence", persist))
    parser.add_argument("--min-days-between", type=float, default=between, help=gate % ("budget, days", between))
    parser.add_argument("--mmd-permutations", type=int, default=100)
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="retraining jobs recalibrate a kept champion (train.retrain --recalibrate; off by default)",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} (default: both)"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default: both)"
    )
    args = parser.parse_args(argv)
    for name, allowed in (("variants", VARIANTS), ("modes", MODES)):
        chosen_values = [v for v in getattr(args, name).split(",") if v]
        unknown = sorted(set(chosen_values) - set(allowed))
        if unknown or not chosen_values:
            parser.error(f"--{name}: {', '.join(unknown) or 'none given'}; choose from {', '.join(allowed)}")
        setattr(args, name, tuple(chosen_values))
    args.gate_defaults = (persist, between)  # the platform's, for the report

    from detect.data import default_data_dir, list_entities

    args.data = str(Path(args.data).resolve()) if args.data else str(default_data_dir())
    chosen = [tuple(e.split("/", 1)) for e in args.entities.split(",")] if args.entities else list_entities(args.data)
    workdir = Path(args.workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    started = time.perf_counter()
    out = Path(args.out).resolve()
    records: list[dict[str, Any]] = []
    platform_ = Platform(workdir, args.port, args.model).start()
    try:
        for i, (dataset, name) in enumerate(chosen, 1):
            log(f"== {i}/{len(chosen)} {dataset}/{name}")
            records += replay_entity(platform_, dataset, name, args, log)
            write(out, records, settings(args, chosen, started))  # partial results survive an interruption
    finally:
        platform_.stop()
    report = write(out, records, settings(args, chosen, started))
    print(report)
    return 0


def settings(args: argparse.Namespace, chosen: list, started: float) -> dict[str, Any]:
    persist, between = args.gate_defaults
    return {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/replay.py " + " ".join(sys.argv[1:]),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "entities": ", ".join(f"{d}/{e}" for d, e in chosen),
        "model": f"{args.model}, hidden {args.hidden}, {args.epochs} epochs (initial fit and retraining jobs)",
        "days": f"first {args.days} days of each test split" if args.days else "the whole test split",
        "drift monitors": "detect.drift.entity_drift_config(entity): windows of whole days, at least 300 rows, "
        f"as training calibrated; MMD permutations {args.mmd_permutations}; "
        f"trigger cooldown {args.cooldown_s} wall s; retraining gate: drift in {args.persist_windows} consecutive "
        f"windows, one training per {args.min_days_between:g} days of data (the platform's defaults: "
        f"{persist} and {between:g}); concept test "
        "off (no feedback labels sent)",
        "retraining jobs": "recalibrate a kept champion (--recalibrate)" if args.recalibrate else "the defaults",
    }


def write(out: Path, records: list[dict[str, Any]], settings_: dict[str, Any]) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2, default=str) + "\n")
    report = markdown(records, settings_)
    out.with_suffix(".md").write_text(report)
    return report


if __name__ == "__main__":
    sys.exit(main())
