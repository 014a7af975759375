"""Ray jobs: connect a job's driver to its cluster, and submit raywatch entry points through Ray's job
submission API (what `ray job submit` uses).

Why this lives in `train/`: the job entry points (`python -m train.pipeline`, `train.retrain`,
`train.compress`, `tune.search`) run as Ray jobs, and the stages that submit them sit above `train` in the
layer contract (the monitoring stage's retraining trigger, the cluster lifecycle and demo, the CLI). In
`cluster/` the monitoring stage could not import it without an upward edge; here every submitter
imports it downwards, and the client itself needs nothing from raywatch.

The address is the Ray dashboard's (`http://<head>:8265`); with none given, Ray finds it from
RAY_API_SERVER_ADDRESS, RAY_ADDRESS or the local cluster. Ray 2.60's token authentication is sent
by the client from the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

ACTIVE = {"PENDING", "RUNNING"}
# what a retraining job needs to find the same registry, state and data as the service that asked for it
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "RAYWATCH_STATE_DIR", "RAYWATCH_DATA", "RAYWATCH_HOME")


# Ray Train's controller polls workers for reports at this interval (2 s by default), which bounds a
# small job to one epoch per poll; applies to clusters that this process starts.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def init_ray() -> None:
    """Connect this job's driver to RAY_ADDRESS, or start a local Ray, unless connected already."""
    import ray  # deferred: importing this module must not pay for Ray (the CLI imports it to parse args)

    if not ray.is_initialized():
        os.environ.setdefault(TRAIN_POLL_ENV, "0.2")
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)


def client(address: str | None = None) -> Any:
    """A job client for `address`, $RAYWATCH_JOB_ADDRESS, or, inside Ray (a monitor actor, a test),
    the cluster this process belongs to (found through its GCS, never a guess among local clusters)."""
    import ray
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAYWATCH_JOB_ADDRESS")
    if not address and ray.is_initialized():
        address = ray.get_runtime_context().gcs_address
    return JobSubmissionClient(address or None)


def retrain_entrypoint(model: str, entities: list[str] | None = None, extra: list[str] | None = None) -> str:
    """The command a retraining job runs (`train/retrain.py`'s entry point); the same one a person can give
    `ray job submit --`. Here, beside the client, so that the monitors' trigger needs neither torch nor MLflow."""
    args = [sys.executable, "-m", "train.retrain", "--model", model]
    if entities:
        args += ["--entities", ",".join(entities)]
    return shlex.join(args + list(extra or []))


def submit(
    entrypoint: str,
    submission_id: str | None = None,
    env: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    address: str | None = None,
) -> str:
    """Submit a job; returns its submission id. Forwards the raywatch environment (registry, state, data)."""
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env_vars.update(env or {})
    job_id = client(address).submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env={"env_vars": env_vars},
        metadata=metadata or {},
    )
    log.info("job submitted", extra={"job_id": job_id, "entrypoint": entrypoint})
    return job_id


def status(job_id: str, address: str | None = None) -> str:
    return str(client(address).get_job_status(job_id).value)


def wait(job_id: str, timeout_s: float = 600, address: str | None = None, poll_s: float = 1.0) -> str:
    """Wait for a job to end; returns its final status (SUCCEEDED, FAILED, STOPPED) or raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = status(job_id, address)
        if state not in ACTIVE:
            return state
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f} s")


def logs(job_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(job_id)


def list_jobs(address: str | None = None, prefix: str = "raywatch-") -> list[dict[str, Any]]:
    out = []
    for job in client(address).list_jobs():
        if job.submission_id and job.submission_id.startswith(prefix):
            out.append(
                {
                    "job_id": job.submission_id,
                    "status": str(job.status.value),
                    "entrypoint": job.entrypoint,
                    "start_time": job.start_time,
                    "end_time": job.end_time,
                    "metadata": job.metadata,
                }
            )
    return sorted(out, key=lambda j: j["start_time"] or 0)
