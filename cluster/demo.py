"""The one-command demo (`raywatch demo`, run by `make demo`): the whole platform on this machine.

1. The peer evaluation on the six shipped entities (the table of `raywatch evaluate`).
2. `raywatch up`: a local Ray head, the three detectors trained through the real pipeline on a
   synthetic machine (3 days of 1-minute telemetry with labelled incidents, written in the shipped
   data layout), the Serve app and the drift monitors.
3. Day 6 (normal, unseen by every model) replayed through `POST /v1/score` (with incident labels sent to `/v1/feedback`),
   then day 7 with drift injected on cpu and latency_p99: the monitors flag it, submit retraining
   jobs through Ray's job API, and each job decides whether its challenger replaces the champion.
4. A summary: detection quality on the replay, latency percentiles, versions before and after.

The services stay up for exploring; `raywatch down` stops them. The replay uses a synthetic machine
because on the shipped SMD/ASD series the drift tests flag normal days too (benchmarks/drift.md).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from cluster.lifecycle import read_state, up, urls
from detect import metrics as M
from detect.data import default_data_dir
from detect.kinds import DETECTOR_KINDS
from detect.synthetic import METRICS, generate_fleet

DAY = 1440
BATCH = 60  # one hour of samples per request
SHIFT = 2.0  # training standard deviations
DRIFTED = ("cpu", "latency_p99")


def _names() -> list[str]:
    return [m for m in METRICS if m != "disk_usage"]  # its fill trend is drift by construction


def write_demo_data(root: Path, seed: int = 3) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """One synthetic machine, 7 days, in the shipped layout: train = days 1-3, test = days 4-7 (labelled;
    the ensemble learns from days 4-5). Returns (entity, metric columns, test rows, test labels)."""
    names = _names()
    fleet = generate_fleet(n_machines=1, n_steps=7 * DAY, metrics=names, incidents_per_machine=10, seed=seed)
    frame = fleet.frame
    values, labels = frame[names].to_numpy(), frame["label"].to_numpy().astype(int)
    folder = root / "fleet" / "machine-00"
    folder.mkdir(parents=True, exist_ok=True)
    cols = [f"m{i:02d}" for i in range(len(names))]
    train = pd.DataFrame(values[: 3 * DAY], columns=cols)
    train.insert(0, "t", np.arange(3 * DAY))
    test = pd.DataFrame(values[3 * DAY :], columns=cols)
    test.insert(0, "t", np.arange(3 * DAY, 7 * DAY))
    test["label"] = labels[3 * DAY :]
    with gzip.open(folder / "train.csv.gz", "wt") as f:
        train.to_csv(f, index=False)
    with gzip.open(folder / "test.csv.gz", "wt") as f:
        test.to_csv(f, index=False)
    return "fleet/machine-00", cols, values[3 * DAY :], labels[3 * DAY :]


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


def run_demo(
    shipped_data: str | None = None,
    workdir: str | Path = "runs/demo",
    port: int = 8000,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    # deferred: the detectors behind `evaluate` load torch, and the job client Ray; `raywatch --help` needs neither
    from detect.evaluate import evaluate, markdown_table, write_report
    from train import jobs

    started = time.monotonic()
    if read_state() is not None:
        raise RuntimeError("raywatch is already up here: run `raywatch down` first, then the demo starts fresh")
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)  # the demo's own registry, state and data: a fresh story each run
    workdir.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["RAYWATCH_STATE_DIR"] = str(workdir / "state")
    progress("== 1/4 peer baselines on the six shipped entities (raywatch evaluate)")
    shipped = Path(shipped_data) if shipped_data else default_data_dir()
    report = evaluate(shipped, ["pca", "iforest", "ecod"])
    write_report(report, workdir / "evaluation.json")
    print(markdown_table(report))

    progress("== 2/4 raywatch up: local Ray head, training, Serve app, drift monitors")
    entity, metrics, rows, labels = write_demo_data(workdir / "data")
    progress(f"  synthetic machine {entity}: metrics m00..m{len(metrics) - 1:02d} = {', '.join(_names())}")
    state = up(
        data_dir=str(workdir / "data"),
        port=port,
        epochs=5,
        monitor={
            "config": {
                "drift": {"mmd_permutations": 100},
                "retrain_args": ["--epochs", "5", "--cpus-per-worker", "0.25"],
            }
        },
        progress=progress,
    )
    for name, url in urls(state).items():
        progress(f"  {name:10s} {url}")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    before = {
        m: v["slots"].get("champion", {}).get("version") for m, v in client.get("/v1/models").json()["models"].items()
    }

    progress("== 3/4 replay: a normal day, then a day with drift on " + " and ".join(DRIFTED))
    day6, day7 = rows[2 * DAY : 3 * DAY], rows[3 * DAY :]
    for t in np.flatnonzero(labels[2 * DAY : 3 * DAY]):
        client.post("/v1/feedback", json={"entity": entity, "timestamp": float(5 * DAY + t), "label": 1})
    normal, lat_normal = _replay(client, entity, metrics, day6, 5 * DAY, "day 6 (normal)")
    deadline = time.monotonic() + 90  # the monitors test the full day off the response path
    while len(client.get("/v1/drift", params={"limit": 1000}).json()["events"]) < 9 and time.monotonic() < deadline:
        time.sleep(1)  # 3 models x (KS, MMD, score KS)
    control = client.get("/v1/drift", params={"only_drift": True}).json()["events"]
    progress(f"  drift events after the normal day: {len(control)}")
    names = _names()
    drifted = day7.copy()
    train_std = day6.std(axis=0)
    for metric in DRIFTED:
        j = names.index(metric)
        drifted[:, j] += SHIFT * train_std[j]
    t_drift = time.time()
    _, lat_drift = _replay(client, entity, metrics, drifted, 6 * DAY, f"day 7 (+{SHIFT} sigma drift)")
    deadline = time.monotonic() + 120
    events: list = []
    while time.monotonic() < deadline and not events:
        events = [
            e for e in client.get("/v1/drift", params={"only_drift": True}).json()["events"] if e["time"] >= t_drift
        ]
        time.sleep(1)
    for e in sorted(events, key=lambda e: e["id"])[:6]:
        progress(
            f"  drift: {e['detector']:14s} model={e['model']:12s} p={e['p_value']} metrics={e['drifted_features']}"
        )
    submitted: list = []
    deadline = time.monotonic() + 120
    drifted_models = {e["model"] for e in events}
    while time.monotonic() < deadline and len(submitted) < len(drifted_models):
        submitted = [j for j in jobs.list_jobs() if j["job_id"].startswith("raywatch-retrain-")]
        time.sleep(1)
    progress(f"  retraining jobs (also in `ray job list` and the dashboard): {[j['job_id'] for j in submitted]}")
    for job in submitted:
        state_ = jobs.wait(job["job_id"], timeout_s=600)
        progress(f"  {job['job_id']}: {state_}")
    models = client.get("/v1/models").json()["models"]
    decisions = {m: v.get("retraining") for m, v in models.items()}
    after = {m: v["slots"].get("champion", {}).get("version") for m, v in models.items()}

    events = [
        e
        for e in client.get("/v1/drift", params={"only_drift": True, "limit": 1000}).json()["events"]
        if e["time"] >= t_drift
    ]
    quality = _quality(normal, labels[2 * DAY : 3 * DAY])
    lat = np.array(lat_normal + lat_drift)
    summary = {
        "quality_day6": quality,
        "latency_ms": {p: round(float(np.percentile(lat, q)), 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "requests": len(lat),
        "rows_per_request": BATCH,
        "control_drift_events": len(control),
        "drift_events": len(events),
        "jobs": [j["job_id"] for j in submitted],
        "decisions": {
            m: (d and {k: d[k] for k in ("promoted", "champion", "challenger", "reason")}) for m, d in decisions.items()
        },
        "versions_before": before,
        "versions_after": after,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    progress("== 4/4 summary")
    print("| detector | PR-AUC on the replayed normal day | F1 of served alerts | alert rate |")
    print("|---|---|---|---|")
    for name, q in quality.items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {fmt(q['pr_auc'])} | {fmt(q['f1_served'])} | {q['alert_rate']:.3f} |")
    print(
        f"\nlatency of /v1/score ({BATCH} rows per request, {len(lat)} requests): "
        f"p50 {summary['latency_ms']['p50']} ms, p95 {summary['latency_ms']['p95']} ms, p99 {summary['latency_ms']['p99']} ms"
    )
    print(f"drift events: {len(control)} after the normal day, {len(events)} after the drifted day")
    print("| model | champion before | champion after | decision |")
    print("|---|---|---|---|")
    for m in after:
        d = decisions.get(m)
        text = "no job" if not d else ("promoted: " if d["promoted"] else "kept champion: ") + d["reason"]
        print(f"| {m} | v{before.get(m)} | v{after.get(m)} | {text} |")
    print(f"\ndemo took {summary['minutes']} min; services are still running:")
    for name, url in urls(state).items():
        print(f"  {name:10s} {url}")
    print("stop everything with: .venv/bin/raywatch down")
    return summary
