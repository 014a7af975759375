"""Graduation: how long a fleet of new machines waits for its own models, one job each against shared jobs.

A new machine is scored by its schema's fleet model from its first row. Once the drift monitor keeps
`own_model_rows` of its rows, it asks the trigger for the retraining job that fits the machine's own
model, which takes over on a significant win (train/retrain.py). A fleet's new machines reach that count
together, and the trigger runs one job at a time, at least `cooldown_s` apart (15 minutes by default).
With one machine per job (`graduates_per_job` 1, the monitor before 2026-12-07, the control) a fleet waits
a cooldown per machine; with `graduates_per_job` 100 (the default) one job takes up to 100 of them, each
still judged alone (`train.promotion.decide_each`), and their own models are fitted one after another in
one Ray Train run (`train.torch_train.fit_many_with_ray_train`).

Both are run here one after the other on one local `ray start --head` (token auth), with real Ray jobs and
MLflow: a fleet autoencoder trained on three synthetic machines, then `--machines` new synthetic machines
fed to a `DriftMonitor` in this process (no Serve: its rows as the ingress hands them on), a snapshot at a
time. The cooldown is 0 and the monitor's retry after a refused ask 1 s (30 s served), so that the
control's figure is its jobs' time, not waiting. Measured per variant: jobs, wall seconds from the
machines reaching `own_model_rows` to every machine's decision, and each job's seconds. From the two,
a job's fixed cost and its cost per machine, and what a 10,000-machine fleet would wait at the default
cooldown.

    python benchmarks/graduation.py [--machines 8] [--rows 1440] [--workdir runs/bench-graduation]
    # or: make bench-graduation  (about 3 minutes on 2 cores)

Writes benchmarks/results/graduation.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from serving import log, save_tables, use_workdir

FLEET_SEEDS = (101, 102, 103)  # the machines the fleet model learns from; the new ones are 0..machines-1
DEFAULT_COOLDOWN_S = 900.0  # monitoring.monitor.MonitorConfig.cooldown_s
FLEET = 10_000


def fleet_champion(days: int) -> tuple[list[str], str]:
    """Register an autoencoder champion holding only a fleet model; its metrics and key."""
    from detect.fleet import fleet_key
    from detect.sequence import AutoencoderDetector
    from detect.synthetic import machine_days
    from train.pipeline import register_fitted

    series = [machine_days(days, seed=s) for s in FLEET_SEEDS]
    metrics = series[0][1]
    fleet = AutoencoderDetector(epochs=3, hidden=32).fit_fleet([v for _, _, v in series], metrics)
    key = fleet_key(metrics)
    register_fitted("autoencoder", {key: fleet}, {key: metrics}, {})
    return metrics, key


def graduate(per_job: int, machines: int, rows: int, job_address: str, state: Path, timeout_s: float) -> dict[str, Any]:
    """Feed `machines` new machines to a monitor until each has a retraining decision; what it took."""
    from detect.synthetic import machine_days
    from monitoring import monitor as monitor_module
    from monitoring.monitor import DriftMonitor
    from train import jobs as jobs_api

    metrics, key = fleet_champion(days=2)
    series = {f"new-{per_job}-{s}": machine_days(2, seed=s)[2] for s in range(machines)}
    config = {
        "job_address": job_address,
        "cooldown_s": 0,
        "own_model_rows": rows,
        "graduates_per_job": per_job,
        "version_check_s": 1,
        "concept_every_s": 3600,
        "retrain_args": ["--epochs", "3", "--cpus-per-worker", "0.25", "--promote-via", "direct"],
    }
    monitor_module.GRADUATION_RETRY_S = 1.0
    monitor = DriftMonitor("autoencoder", config, str(state))

    def snapshot(t: int) -> list[dict[str, Any]]:
        row = {"score": 0.0, "is_anomaly": False, "path": "champion", "timestamp": float(t), "model_key": key}
        return [{**row, "entity": e, "values": v[t % len(v)].tolist()} for e, v in series.items()]

    for t in range(rows - 1):
        monitor.observe(snapshot(t))
    started, t, jobs, decided = time.monotonic(), rows - 1, {}, {}
    while len(decided) < machines and time.monotonic() - started < timeout_s:
        monitor.observe(snapshot(t))  # a scrape of the whole fleet: the due machines ask in it
        t += 1
        job = monitor.trigger.last_job()
        if job and job["job_id"] not in jobs:
            jobs[job["job_id"]] = {"entities": len(job["entities"]), "submitted": job["submitted"]}
        for job_id, record in jobs.items():
            if "done" not in record and jobs_api.status(job_id, job_address) == "FAILED":
                raise SystemExit(f"job {job_id} failed:\n{jobs_api.logs(job_id, job_address)[-3000:]}")
        for decision in monitor.store.decisions("autoencoder", limit=1000):
            record = jobs.get(decision["job_id"])
            if record is not None and "done" not in record:
                record |= {"done": decision["time"], "graduated": len(decision["details"].get("graduated", []))}
                decided |= dict.fromkeys(decision["details"]["entities"], time.monotonic() - started)
        time.sleep(0.2)
    if len(decided) < machines:
        raise SystemExit(f"graduates_per_job {per_job}: {len(decided)} of {machines} decided in {timeout_s:.0f} s")
    seconds = [r["done"] - r["submitted"] for r in jobs.values()]
    return {
        "graduates_per_job": per_job,
        "machines": machines,
        "own_model_rows": rows,
        "jobs": len(jobs),
        "graduated": sum(r["graduated"] for r in jobs.values()),
        "wall_s": round(max(decided.values()), 1),
        "job_s": [round(s, 1) for s in seconds],
        "mean_job_s": round(float(np.mean(seconds)), 1),
    }


def fleet_wait_days(
    per_job: int, fixed_s: float, per_machine_s: float, cooldown_s: float = DEFAULT_COOLDOWN_S
) -> float:
    """Days until a FLEET of new machines has each had its job: one job at a time, `cooldown_s` apart."""
    jobs = math.ceil(FLEET / per_job)
    return jobs * max(cooldown_s, fixed_s + per_job * per_machine_s) / 86400


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1440, help="own_model_rows: a day of 1-minute rows")
    parser.add_argument("--workdir", default="runs/bench-graduation")
    parser.add_argument("--timeout-s", type=float, default=1200)
    args = parser.parse_args(argv)
    workdir = use_workdir(args.workdir)
    stamp = int(time.time())
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / f'mlflow-{stamp}.db'}"  # the jobs inherit it
    import ray

    from cluster.local import LocalHead

    head = LocalHead(num_cpus=2, log_path=workdir / "ray-start.log").start()
    records = []
    try:
        ray.init(address=head.address, log_to_driver=False)
        for per_job in (1, 100):
            log(f"graduates_per_job {per_job}: {args.machines} new machines, {args.rows} rows each")
            state = workdir / f"state-{stamp}-{per_job}"
            records.append(graduate(per_job, args.machines, args.rows, head.dashboard_url, state, args.timeout_s))
            log(f"  {records[-1]}")
    finally:
        ray.shutdown()
        head.stop()
    one, shared = records
    # a job's seconds = fixed + per machine x machines: from the one-machine jobs and the shared one(s)
    per_machine = max((shared["mean_job_s"] - one["mean_job_s"]) / max(args.machines / shared["jobs"] - 1, 1), 0.0)
    fixed = max(one["mean_job_s"] - per_machine, 0.0)
    for r in records:
        r["fleet_10000_wait_days"] = round(fleet_wait_days(r["graduates_per_job"], fixed, per_machine), 2)
    summary = {"job_fixed_s": round(fixed, 1), "job_per_machine_s": round(per_machine, 1)}
    md = [
        "# Graduation: a fleet of new machines waiting for its own models",
        "",
        f"`python benchmarks/graduation.py --machines {args.machines} --rows {args.rows}` "
        f"({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores): one local Ray head, "
        "real retraining jobs (autoencoder, 3 epochs), a monitor in process fed whole-fleet snapshots, cooldown 0, "
        "retry after a refused ask 1 s. wall s: from the machines reaching `own_model_rows` to the last decision.",
        "",
        "| graduates per job | machines | jobs | graduated | wall s | mean job s | a 10,000-machine fleet waits (days) |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['graduates_per_job']} | {r['machines']} | {r['jobs']} | {r['graduated']} | {r['wall_s']} "
            f"| {r['mean_job_s']} | {r['fleet_10000_wait_days']} |"
            for r in records
        ],
        "",
        f"Ratio of wall time, shared jobs against one job each: {shared['wall_s'] / one['wall_s']:.2f}. "
        f"A job's fixed cost is about {fixed:.1f} s (Ray job start, MLflow, the champion, a Ray Train run) and each "
        f"machine in it about {per_machine:.1f} s (fitting its own model in that run, comparing it), from the two "
        "rows above. The last "
        f"column is the wait of {FLEET:,} new machines at the default {DEFAULT_COOLDOWN_S:.0f} s cooldown, one job "
        "at a time: jobs x max(cooldown, a job's seconds).",
    ]
    save_tables("graduation", {"records": records, **summary}, md, show=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
