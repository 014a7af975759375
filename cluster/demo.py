"""The one-command demo (`raywatch demo`, run by `make demo`): the whole platform on this machine.

1. The peer evaluation on the six shipped entities (the table of `raywatch evaluate`).
2. `raywatch up`: a local Ray head, the three detectors trained through the real pipeline on one real
   shipped entity (DEMO_ENTITY, an ASD application server: 5-minute samples, small, so the demo stays
   quick), the Serve app and the drift monitors.
3. The replay, from the second half of the entity's test split (rows no model learnt from, the ensemble
   included): one drift window (two days) as recorded, through `POST /v1/score` (its incident labels sent
   to `/v1/feedback`), then the next window with a persistent mean shift (+2 sigma on 10% of the
   metrics, `detect.synthetic.inject_mean_shift`). After each the monitors test it, submit retraining
   jobs through Ray's job API where they see drift, and each job decides whether its challenger replaces
   the champion; the decisions are printed with their evidence (test, p-value, alert budget, incidents,
   refusals, reason).
4. A summary: detection quality on the as-recorded window, latency percentiles, versions before and after.

The services stay up for exploring; `raywatch down` stops them. Which drift tests run is whatever the
monitors currently do: on real days they may flag the as-recorded window too (benchmarks/results/drift.md),
and the demo shows that as it is.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cluster.lifecycle import read_state, up, urls
from cluster.local import RAY_DASHBOARD_PORT, RAY_GCS_PORT
from detect import metrics as M
from detect.data import default_data_dir, entity_rows_per_day, load_series
from detect.drift import entity_drift_config
from detect.kinds import DETECTOR_KINDS
from detect.synthetic import inject_mean_shift
from serve.auth import KEYS_FILE_ENV

DEMO_ENTITY = "asd/omi-3"  # 19 metrics, 5-minute samples; its replayed as-recorded window holds an incident
BATCH = 48  # four hours of 5-minute samples per request
SHIFT = 2.0  # pre-shift standard deviations
EPOCHS = 5  # initial training
RETRAIN_EPOCHS = 3


def real_entity_data(
    root: Path, shipped: Path, entity: str = DEMO_ENTITY
) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """The demo's data folder: one shipped entity, copied in the shipped layout, so that `up` trains on it
    alone. Returns (entity, metric columns, test rows, test labels)."""
    dataset, name = entity.split("/")
    shutil.copytree(shipped / dataset / name, root / dataset / name)
    series = load_series(dataset, name, root)
    return series.name, series.metrics, series.test[series.metrics].to_numpy(dtype=np.float64), series.labels


def replay_windows(rows: np.ndarray, labels: np.ndarray, window: int, metrics: list[str]) -> dict[str, Any]:
    """The two windows the demo replays, from the test split's second half (the ensemble learns from the
    first): one as recorded, then the next with the mean shift (its std taken before the shift)."""
    first = len(rows) // 2
    both = rows[first : first + 2 * window]
    if len(both) < 2 * window:
        raise ValueError(f"the test split is too short for two drift windows of {window} rows after its first half")
    shifted, moved = inject_mean_shift(both, metrics, start=window, sigma=SHIFT)
    return {
        "first_row": first,
        "as_recorded": both[:window],
        "shifted": shifted[window:],
        "labels": labels[first : first + window],
        "moved": moved,
    }


def _bar(done: int, total: int, label: str, width: int = 30) -> None:
    filled = int(width * done / total)
    end = "\n" if done == total else ""
    print(f"\r  {label:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, flush=True)


def _replay(
    client: Any, entity: str, metrics: list[str], rows: np.ndarray, start: int, label: str
) -> tuple[list, list]:
    latencies, served = [], []
    total = len(rows) // BATCH
    for b in range(total):
        chunk = rows[b * BATCH : (b + 1) * BATCH]
        body = {
            "rows": [
                {"entity": entity, "timestamp": float(start + b * BATCH + k), "metrics": dict(zip(metrics, v))}
                for k, v in enumerate(chunk.tolist())
            ]
        }
        t0 = time.perf_counter()
        response = client.post("/v1/score", json=body)
        latencies.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
        served += response.json()["results"]
        _bar(b + 1, total, label)
    return served, latencies


def _quality(served: list[dict], labels: np.ndarray) -> dict[str, dict[str, float | None]]:
    out = {}
    for name in DETECTOR_KINDS:
        scores = np.array([r["detectors"][name]["anomaly_score"] for r in served])
        flags = np.array([r["detectors"][name]["is_anomaly"] for r in served])
        has = labels.any()
        out[name] = {
            "pr_auc": M.pr_auc(labels, scores) if has else None,
            "f1_served": M.f1_at(labels, flags.astype(float), 0.5) if has else None,
            "alert_rate": float(flags.mean()),
        }
    return out


def _drift_events(client: Any, since: float) -> list[dict[str, Any]]:
    events = client.get("/v1/drift", params={"only_drift": True, "limit": 1000}).json()["events"]
    return sorted((e for e in events if e["time"] >= since), key=lambda e: e["id"])


def _wait_for_tests(client: Any, since: float, tests: int, quiet_s: float = 10, timeout_s: float = 120) -> None:
    """Until the monitors have tested the replayed window: `tests` results after `since`, or some and none
    new for `quiet_s` (a model without a score test has fewer), or `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    seen, changed = 0, time.monotonic()
    while time.monotonic() < deadline:
        events = client.get("/v1/drift", params={"limit": 1000}).json()["events"]
        count = sum(e["time"] >= since for e in events)
        if count >= tests or (count and count == seen and time.monotonic() - changed > quiet_s):
            return
        if count != seen:
            seen, changed = count, time.monotonic()
        time.sleep(1)


def _finish_jobs(client: Any, since: float, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Wait for the retraining jobs submitted after `since`; returns each model's decision of that round."""
    from train import jobs  # deferred: the job client imports Ray

    time.sleep(3)  # a monitor submits right after its test: let the last submissions land
    submitted = [
        j
        for j in jobs.list_jobs(prefix="raywatch-retrain-")
        if (j["start_time"] or 0) / 1000 >= since - 1  # Ray reports milliseconds
    ]
    progress(
        f"  retraining jobs (also in `ray job list` and the dashboard): {[j['job_id'] for j in submitted] or 'none'}"
    )
    for job in submitted:
        progress(f"  {job['job_id']}: {jobs.wait(job['job_id'], timeout_s=600)}")
    ids = {j["job_id"] for j in submitted}
    decisions = client.get("/v1/drift", params={"limit": 1}).json()["retraining"]
    return [d for name in decisions for d in decisions[name]["decisions"] if d["job_id"] in ids]


def decision_lines(decision: dict[str, Any]) -> list[str]:
    """A decision as an SRE reads it: what happened and why, then the evidence it rests on."""
    details = decision.get("details") or {}
    verdict = "promoted" if decision["promoted"] else "kept champion"
    if details.get("recalibrated"):  # kept, with its threshold fitted again on the recent rows (train/retrain.py)
        verdict += f", its threshold recalibrated as v{details.get('recalibrated_version')}"
    versions = f"v{decision['champion']}" + (
        f" vs challenger v{decision['challenger']}" if decision["challenger"] else ""
    )
    lines = [f"  {decision['model']}: {verdict} ({versions}): {decision['reason']}"]
    figures = {
        k: details.get(k)
        for k in ("test", "p_value", "alpha", "budget", "incidents", "gain")
        if details.get(k) is not None
    }
    if figures:
        lines.append(
            "    " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        )
    if details.get("refused"):
        lines.append(f"    refused: {details['refused']}")
    if details.get("evidence"):
        lines.append(f"    evidence: {details['evidence']}")
    return lines


def _print_round(title: str, client: Any, since: float, progress: Callable[[str], None]) -> dict[str, Any]:
    events = _drift_events(client, since)
    progress(f"  drift events after {title}: {len(events)}")
    for e in events[:6]:
        progress(f"    {e['detector']:14s} model={e['model']:12s} p={e['p_value']} metrics={e['drifted_features'][:6]}")
    decisions = _finish_jobs(client, since, progress)
    for d in decisions:
        for line in decision_lines(d):
            progress(line)
    return {"drift_events": len(events), "decisions": decisions}


def _demo_admin_key(workdir: Path) -> str:
    """A fresh admin key for the demo's app, in an owner-only file that `up` hands to the ingress (never
    printed): the demo's incident labels go to /v1/feedback with it, so retraining may learn from them."""
    key = secrets.token_urlsafe(24)
    path = workdir / "admin_keys"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    os.environ[KEYS_FILE_ENV] = str(path)
    return key


def run_demo(
    shipped_data: str | None = None,
    workdir: str | Path = "runs/demo",
    port: int = 8000,
    progress: Callable[[str], None] = print,
    ray_port: int = RAY_GCS_PORT,
    dashboard_port: int = RAY_DASHBOARD_PORT,
) -> dict[str, Any]:
    # deferred: the detectors behind `evaluate` load torch; `raywatch --help` needs neither
    from detect.evaluate import evaluate, markdown_table, write_report

    started = time.monotonic()
    if read_state() is not None:
        raise RuntimeError("raywatch is already up here: run `raywatch down` first, then the demo starts fresh")
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)  # the demo's own registry, state and data: a fresh story each run
    workdir.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["RAYWATCH_STATE_DIR"] = str(workdir / "state")
    admin_key = _demo_admin_key(workdir)  # the operator's labels are trusted: they are sent with a key
    progress("== 1/4 peer baselines on the six shipped entities (raywatch evaluate)")
    shipped = Path(shipped_data) if shipped_data else default_data_dir()
    report = evaluate(shipped, ["pca", "iforest", "ecod"])
    write_report(report, workdir / "evaluation.json")
    print(markdown_table(report))

    progress("== 2/4 raywatch up: local Ray head, training, Serve app, drift monitors")
    entity, metrics, rows, labels = real_entity_data(workdir / "data", shipped)
    window = entity_drift_config(entity).span
    days = window / entity_rows_per_day(entity)
    progress(f"  real machine {entity}: {len(metrics)} metrics, drift windows of {window} rows ({days:g} days)")
    progress(
        "  retraining gate relaxed for the demo's two one-window rounds: one drifted window earns a job "
        "(the default waits for 2 consecutive ones and allows one training per 7 days of data)"
    )
    state = up(
        data_dir=str(workdir / "data"),
        port=port,
        ray_port=ray_port,
        dashboard_port=dashboard_port,
        epochs=EPOCHS,
        monitor={
            "config": {
                "drift": {"mmd_permutations": 100},  # windows: the entity's sampling rate, as training calibrated
                "cooldown_s": 0,  # the demo's rounds are minutes apart: one job per model per drifted window
                # its two rounds are one window each: a drifted one earns its job without waiting for the
                # next window, and the shifted round's job is not held back by the first round's
                "retrain_persist_windows": 1,
                "retrain_min_days_between": 0,
                "retrain_args": ["--epochs", str(RETRAIN_EPOCHS), "--cpus-per-worker", "0.25"],
            }
        },
        progress=progress,
    )
    for name, url in urls(state).items():
        progress(f"  {name:10s} {url}")
    # `up` moves the API to a free port when the one asked for is taken: talk to the one it chose
    client = httpx.Client(base_url=f"http://127.0.0.1:{state['serve_port']}", timeout=120)
    before = {
        m: v["slots"].get("champion", {}).get("version") for m, v in client.get("/v1/models").json()["models"].items()
    }

    replayed = replay_windows(rows, labels, window, metrics)
    first = replayed["first_row"]
    progress(f"== 3/4 replay of {entity}: a window as recorded, then one with +{SHIFT} sigma on {replayed['moved']}")
    for t in np.flatnonzero(replayed["labels"]):
        label = {"entity": entity, "timestamp": float(first + t), "label": 1}
        client.post("/v1/feedback", json=label, headers={"Authorization": f"Bearer {admin_key}"})
    t_normal = time.time()
    normal, lat_normal = _replay(client, entity, metrics, replayed["as_recorded"], first, "days as recorded")
    _wait_for_tests(client, t_normal, tests=3 * len(DETECTOR_KINDS))  # 3 models x (KS, MMD, score KS)
    as_recorded = _print_round("the as-recorded window", client, t_normal, progress)
    t_shift = time.time()
    _, lat_shift = _replay(client, entity, metrics, replayed["shifted"], first + window, f"days +{SHIFT} sigma shift")
    _wait_for_tests(client, t_shift, tests=3 * len(DETECTOR_KINDS))
    shifted = _print_round("the shifted window", client, t_shift, progress)
    models = client.get("/v1/models").json()["models"]
    after = {m: v["slots"].get("champion", {}).get("version") for m, v in models.items()}

    quality = _quality(normal, replayed["labels"])
    lat = np.array(lat_normal + lat_shift)
    summary = {
        "entity": entity,
        "quality_as_recorded": quality,
        "latency_ms": {p: round(float(np.percentile(lat, q)), 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "requests": len(lat),
        "latencies_ms": {"as_recorded": [round(x, 1) for x in lat_normal], "shifted": [round(x, 1) for x in lat_shift]},
        "rows_per_request": BATCH,
        "shifted_metrics": replayed["moved"],
        "as_recorded": as_recorded,
        "shifted": shifted,
        "versions_before": before,
        "versions_after": after,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    progress("== 4/4 summary")
    print(f"| detector | PR-AUC on the as-recorded window of {entity} | F1 of served alerts | alert rate |")
    print("|---|---|---|---|")
    for name, q in quality.items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {fmt(q['pr_auc'])} | {fmt(q['f1_served'])} | {q['alert_rate']:.3f} |")
    print(
        f"\nlatency of /v1/score ({BATCH} rows per request, {len(lat)} requests): "
        f"p50 {summary['latency_ms']['p50']} ms, p95 {summary['latency_ms']['p95']} ms, p99 {summary['latency_ms']['p99']} ms; "
        f"each window's first request {lat_normal[0]:.1f} and {lat_shift[0]:.1f} ms (the first one loads the machine's "
        "models into the replicas; every request's time is in summary.json)"
    )
    print(
        f"drift events: {as_recorded['drift_events']} on the as-recorded window, {shifted['drift_events']} on the shifted one"
    )
    print("| model | champion before | champion after | decisions (as recorded; shifted) |")
    print("|---|---|---|---|")
    for m in after:
        texts = [
            ("promoted: " if d["promoted"] else "kept: ") + d["reason"]
            for d in as_recorded["decisions"] + shifted["decisions"]
            if d["model"] == m
        ]
        print(f"| {m} | v{before.get(m)} | v{after.get(m)} | {'; '.join(texts) or 'no job'} |")
    print(f"\ndemo took {summary['minutes']} min; services are still running:")
    for name, url in urls(state).items():
        print(f"  {name:10s} {url}")
    print("stop everything with: .venv/bin/raywatch down")
    return summary
