"""Security: admin keys (missing, wrong, rotated), the per-client rate limit on scoring, Ray's token
authentication, and no secret in any log. (The registry loader's checks: test_registry_integrity.py.)"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .support import INGRESS, LoadGenerator, new_key, summarize

pytestmark = pytest.mark.slow

ADMIN_CALLS = {
    "/v1/admin/promote": {"model": "lstm", "version": "1"},
    "/v1/admin/rollback": {"model": "lstm"},
    "/v1/admin/traffic": {"model": "lstm", "challenger_percent": 0, "shadow": False},
    "/v1/admin/baseline": {"model": "lstm", "entity": "asd/omi-2"},
    "/v1/admin/rollout": {"model": "lstm", "version": "1"},  # with a key: 409, version 1 is the champion
    "/v1/admin/rollout/abort": {"model": "lstm"},  # with a key: 409, no rollout
}
HARMLESS = ("/v1/admin/traffic", {"model": "autoencoder", "challenger_percent": 0, "shadow": False})


def ray_token() -> str:
    """The cluster's token, found the way Ray finds it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip()


def test_admin_endpoints_reject_missing_and_wrong_keys(served, figures):
    wrong = new_key()
    served.secrets_sent.add(wrong)
    seen = {}
    for path, body in ADMIN_CALLS.items():
        missing = served.client.post(path, json=body)
        basic = served.client.post(path, json=body, headers={"Authorization": f"Basic {wrong}"})
        empty = served.client.post(path, json=body, headers={"Authorization": "Bearer"})
        bad = served.client.post(path, json=body, headers={"Authorization": f"Bearer {wrong}"})
        case = served.client.post(path, json=body, headers={"Authorization": f"Bearer {served.keys[0].upper()}"})
        # the key is checked before the body: no field list for a caller without a key
        no_body = [served.client.post(path, json=junk).status_code for junk in ({}, [1], {"model": "x" * 10_000})]
        wrong_key_no_body = served.client.post(path, json={}, headers={"Authorization": f"Bearer {wrong}"})
        assert no_body == [401, 401, 401] and wrong_key_no_body.status_code == 403, (no_body, wrong_key_no_body.text)
        seen[path] = [missing.status_code, basic.status_code, empty.status_code, bad.status_code, case.status_code]
        assert missing.status_code == 401 and missing.headers.get("www-authenticate") == "Bearer", missing.text
        assert basic.status_code == 401 and empty.status_code == 401
        assert bad.status_code == 403 and case.status_code == 403, (bad.text, case.text)
        assert wrong not in bad.text and served.keys[0] not in bad.text  # the answer never echoes a key
        good = served.client.post(path, json=body, headers=served.admin())
        assert good.status_code not in (401, 403), good.text
    figures["admin_auth"] = {"statuses[missing, basic, empty, wrong, wrong_case]": seen}


def test_key_rotation_two_valid_then_one_revoked(served, figures):
    path, body = HARMLESS
    pids = {a.pid for a in served.replicas(INGRESS)}
    old, current = served.keys
    incoming = new_key()

    def status(key: str) -> int:
        return served.client.post(path, json=body, headers=served.admin(key)).status_code

    try:
        assert (status(old), status(current), status(incoming)) == (200, 200, 403)
        served.set_keys([current, incoming])  # rotate: the oldest key out, a new one in
        assert (status(old), status(current), status(incoming)) == (403, 200, 200)
        served.set_keys([incoming])  # revoke the other one too
        assert (status(current), status(incoming)) == (403, 200)
        served.set_keys([incoming, new_key(), new_key()])  # at most two keys are valid at once
        assert status(served.keys[2]) == 403
    finally:
        served.set_keys([old, current])
    assert status(old) == 200
    assert {a.pid for a in served.replicas(INGRESS)} == pids  # no restart needed
    figures["key_rotation"] = {"revoked_key_status": 403, "restarts": 0}


def test_feedback_trust_per_configuration(served, figures):
    """Feedback without a key is stored but untrusted by default, and retraining reads trusted labels
    only; with `feedback_auth: require` it is refused (401). A key makes it trusted; a wrong key is refused."""
    from detect.state import ServingStore

    entity = served.score_body()["rows"][0]["entity"]
    wrong = new_key()
    served.secrets_sent.add(wrong)

    def send(ts: float, headers: dict[str, str] | None = None) -> httpx.Response:
        return served.client.post("/v1/feedback", json={"entity": entity, "timestamp": ts, "label": 1}, headers=headers)

    anonymous, keyed = send(1.0), send(2.0, served.admin())
    assert (anonymous.status_code, anonymous.json()["trusted"]) == (201, False), anonymous.text
    assert (keyed.status_code, keyed.json()["trusted"]) == (201, True), keyed.text
    assert send(3.0, {"Authorization": f"Bearer {wrong}"}).status_code == 403
    store = ServingStore(served.state_dir / "serving.db")
    assert store.labels(entity, ["1.0", "2.0", "3.0"]).tolist() == [1, 1, -1]  # stored, nothing lost
    assert store.labels(entity, ["1.0", "2.0", "3.0"], trusted_only=True).tolist() == [-1, 1, -1]
    try:
        served.redeploy(feedback_auth="require")
        refused = send(4.0)
        assert refused.status_code == 401 and refused.headers.get("www-authenticate") == "Bearer", refused.text
        assert send(5.0, served.admin()).status_code == 201
    finally:
        served.redeploy(feedback_auth="untrusted")
    figures["feedback_auth"] = {"untrusted": [201, "trusted=false"], "require": 401, "with_key": [201, "trusted=true"]}


def test_ray_token_authentication_is_on(served, ray_cluster, figures):
    token = ray_token()
    jobs = f"{served.dashboard_url}/api/jobs/"
    anonymous = httpx.get(jobs, timeout=10)
    wrong = httpx.get(jobs, headers={"Authorization": f"Bearer {new_key()}"}, timeout=10)
    right = httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert anonymous.status_code in (401, 403), anonymous.status_code
    assert wrong.status_code in (401, 403), wrong.status_code
    assert right.status_code == 200, right.status_code

    @ray_cluster.remote(num_cpus=0)
    def auth_mode() -> str | None:
        return os.environ.get("RAY_AUTH_MODE")

    assert ray_cluster.get(auth_mode.remote()) == "token"
    # a driver with a wrong token is refused by the cluster (GCS): started with the app, see conftest.py
    try:
        out, _ = served.token_probe.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        served.token_probe.kill()
        out, _ = served.token_probe.communicate()
    assert "CONNECTED" not in out and served.token_probe.returncode != 0, out[-500:]
    assert token not in out
    refusal = next((line.strip() for line in out.splitlines() if "auth" in line.lower()), out.strip()[-200:])
    figures["ray_token_auth"] = {
        "dashboard_jobs_api": {"no_token": anonymous.status_code, "wrong": wrong.status_code, "right": 200},
        "driver_with_wrong_token": refusal[:200],
        "workers_RAY_AUTH_MODE": "token",
    }


def test_rate_limit_per_client_on_scoring(served, figures):
    """Past `requests_per_s` (with `burst`) a client gets 429 with Retry-After, a detail naming the limit;
    the two ingress replicas share one limit (not one each); another client is served meanwhile, headers
    cannot fake another client, other routes are not limited."""
    limit = {"requests_per_s": 1, "burst": 2}
    served.redeploy(rate_limit=limit)
    try:
        flood = LoadGenerator(served, rate=None, concurrency=4).start()
        # the other client one request at a time, each sent a second after the last answer: the server checks
        # its requests at least 1/requests_per_s apart, so its bucket never runs dry however the flood delays
        # them (open loop at half the limit, a server stall once bunched three requests into one burst: a 429)
        other = LoadGenerator(served, rate=None, concurrency=1, local_address="127.0.0.2", think_s=1.0).start()
        time.sleep(4.0)
        until = time.monotonic() + 60  # two answers to the other client while the flood goes on (slow machines)
        while len(other.outcomes) < 2 and time.monotonic() < until:
            time.sleep(0.2)
        other.stop()
        flood.stop()
        statuses = summarize(flood.outcomes)["statuses"]
        others = summarize(other.outcomes)["statuses"]
        flood_s = flood.stopped - flood.started
        shared_ceiling = limit["burst"] + limit["requests_per_s"] * flood_s + 1  # per replica: twice that
        for _ in range(20):  # drain the bucket again: it has refilled a little since
            limited = served.client.post("/v1/score", json=served.score_body())
            if limited.status_code == 429:
                break
        spoofed = {"forwarded": 0, "bearer": 0}  # answered 200 of 10: headers any client can set
        spoof_started = time.monotonic()
        for i in range(10):  # must not make it another client
            fake = {"X-Forwarded-For": f"10.9.8.{i}", "X-Real-IP": f"10.9.7.{i}"}
            for kind, headers in (("forwarded", fake), ("bearer", {"Authorization": f"Bearer {new_key()}"})):
                r = served.client.post("/v1/score", json=served.score_body(), headers=headers)
                spoofed[kind] += r.status_code == 200
        refill = limit["requests_per_s"] * (time.monotonic() - spoof_started) + 2  # one shared bucket
        unlimited = {path: served.client.get(path).status_code for path in ("/healthz", "/v1/models")}
        figures["rate_limit"] = {
            "limit": limit,
            "ingress_replicas": served.args.get("ingress_replicas"),
            "flood_statuses": statuses,
            "allowed_per_s": round(statuses.get("200", 0) / flood_s, 1),
            "allowed_of_shared_ceiling": [statuses.get("200", 0), round(shared_ceiling, 1)],
            "other_client": others,
            "spoofed_headers_200_of_10": spoofed,
            "retry_after": limited.headers.get("retry-after"),
        }
        assert statuses.get("429", 0) > 0 and statuses.get("200", 0) > 0, statuses
        assert statuses["200"] <= shared_ceiling, (statuses, shared_ceiling)
        assert limited.status_code == 429, limited.text
        assert float(limited.headers["retry-after"]) > 0
        assert "1" in limited.json()["detail"] and "limit" in limited.json()["detail"], limited.json()
        assert others == {"200": len(other.outcomes)} and len(other.outcomes) >= 2, others
        assert unlimited == {"/healthz": 200, "/v1/models": 200}
        time.sleep(float(limited.headers["retry-after"]) + 0.5)
        assert served.client.post("/v1/score", json=served.score_body()).status_code == 200
        # what the buckets refilled, no more
        assert spoofed["forwarded"] + spoofed["bearer"] <= refill, (spoofed, refill)
    finally:  # the package shares one app: the tests after this one must not inherit the limit
        served.redeploy(rate_limit=None)


def test_no_secret_in_actor_or_job_metadata(served, figures, monkeypatch):
    """What the GCS holds about every actor (Serve replicas, monitors) and every job submitted the way
    raywatch submits them (`train.jobs.submit`: the retraining trigger's path) carries no admin key and
    not the Ray token, even when they sit in the submitting process's environment, as an operator's would."""
    import dataclasses
    import json

    from ray.util.state import list_actors

    from train import jobs

    secrets = set(served.secrets_sent) | {ray_token()}
    monkeypatch.setenv("RAYWATCH_ADMIN_KEYS", ",".join(served.keys))
    job_id = jobs.submit(
        "python -c pass",
        submission_id=f"raywatch-secrets-check-{new_key()[-8:]}",
        env={"RAYWATCH_STATE_DIR": str(served.state_dir)},
        metadata={"model": "autoencoder", "entity": "check", "trigger": "ks"},
        address=served.dashboard_url,
    )
    assert jobs.wait(job_id, timeout_s=120, address=served.dashboard_url) == "SUCCEEDED"

    def plain(record):  # the state API's records are dataclasses; the job client's, pydantic models
        return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record.model_dump()

    actors = [plain(a) for a in list_actors(address=served.dashboard_url, detail=True, limit=10_000)]
    submitted = [plain(j) for j in jobs.client(served.dashboard_url).list_jobs()]
    gcs = json.dumps({"actors": actors, "jobs": submitted}, default=str)
    assert len(actors) >= 4 and any(j["submission_id"] == job_id for j in submitted)
    assert '"RAYWATCH_STATE_DIR"' in gcs  # what the job was given is there to be searched
    hits = [s[:12] for s in secrets if s in gcs]
    figures["secrets_in_gcs"] = {
        "actors": len(actors),
        "jobs": len(submitted),
        "secrets_searched": len(secrets),
        "hits": len(hits),
    }
    assert not hits, hits


def test_no_secret_in_any_log(served, figures, tmp_path_factory):
    """After every admin call of the suite (right, wrong, rotated and revoked keys), neither an admin key
    nor the Ray token appears in the Ray session's logs (Serve replicas, proxy, controller, workers, the
    dashboard), in the head's start log, or in the Serve application config the dashboard shows."""
    from ray._private import worker

    secrets = set(served.secrets_sent) | {ray_token()}
    assert len(served.secrets_sent) >= 4
    logs = Path(worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    files += list(tmp_path_factory.getbasetemp().glob("ray-head*/*.log"))
    hits, scanned = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        scanned += len(data)
        hits += [(str(path), s[:12]) for s in secrets if s.encode() in data]
    config = httpx.get(
        f"{served.dashboard_url}/api/serve/applications/",
        headers={"Authorization": f"Bearer {ray_token()}"},
        timeout=30,
    )
    assert config.status_code == 200
    hits += [("serve config", s[:12]) for s in served.secrets_sent if s in config.text]
    figures["secrets_in_logs"] = {
        "files": len(files),
        "mib_scanned": round(scanned / 2**20, 1),
        "secrets_searched": len(secrets),
        "hits": len(hits),
    }
    assert files and scanned > 0
    assert not hits, hits
