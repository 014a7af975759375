"""Traffic policy across ingress replicas: a change applies to every replica before its 200 and survives
killing them all (the policy lives in the state folder, `serve/traffic.py`); canary rollouts under load
(`serve/rollout.py`): a degraded challenger is rolled back at its first step and a good one reaches 100%,
also when the retraining loop asks for the rollout, while the champion keeps serving every request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .support import INGRESS, REPLICAS, LoadGenerator, summarize, wait_for

RECOVERY_S = 60.0
MODEL = "autoencoder"
# short steps for a test: the defaults (60 s, 200 canary calls, tolerances of 0.02-0.05) need more traffic
# than a 2-core machine serves in a test's time; the tolerances are wide enough for ~40 calls per arm
TEST_PLAN = {
    "steps": [10, 50, 100],
    "min_hold_s": 2,
    "min_requests": 40,
    "max_step_s": 150,
    "max_error_rate_increase": 0.15,
    "max_fallback_rate_increase": 0.15,
    "max_slow_rate_increase": 0.2,
    "max_alert_rate_increase": 0.15,
}


def _policies_by_replica(served, model: str, timeout: float = 60.0) -> dict[str, set[float]]:
    """The challenger share each ingress replica reports for `model` on /v1/models, asked until every
    replica has answered at least five times (or `timeout` passes: the caller's assertion then names who
    answered). Waits on who answered, not on a count of calls: a replica that has just started may get
    no request for a while, and 40 calls once all went to the other one (CI of stop 62)."""
    seen: dict[str, list[float]] = {}

    def every_replica_answered() -> bool:
        body = served.client.get("/v1/models").json()
        seen.setdefault(body["replica"], []).append(body["models"][model]["traffic"]["challenger_percent"])
        return len(seen) >= REPLICAS and all(len(shares) >= 5 for shares in seen.values())

    try:
        wait_for(every_replica_answered, timeout, f"every {INGRESS} replica answering /v1/models", poll=0.05)
    except AssertionError:  # the caller's assertion names who answered
        pass
    return {replica: set(shares) for replica, shares in seen.items()}


def test_traffic_change_applies_to_every_ingress_replica_and_survives_their_kill(served, figures):
    model = "autoencoder"
    change = {"model": model, "challenger_version": "1", "challenger_percent": 40, "shadow": False}
    served.wait_ready()  # a full set of ingress replicas, whatever the test before this one killed
    try:
        assert served.client.post("/v1/admin/traffic", json=change, headers=served.admin()).status_code == 200
        after_change = _policies_by_replica(served, model)
        assert len(after_change) == REPLICAS, after_change  # both replicas answered
        assert all(shares == {40.0} for shares in after_change.values()), after_change

        served.kill_every_replica(INGRESS, 3 * RECOVERY_S)
        served.wait_ready()
        after_kill = _policies_by_replica(served, model)
        assert len(after_kill) == REPLICAS and not set(after_kill) & set(after_change), after_kill  # new replicas
        assert all(shares == {40.0} for shares in after_kill.values()), after_kill
    finally:  # no challenger again, as the other tests of the suite expect: alias gone, then a reload
        from train import registry

        registry.setup().delete_registered_model_alias(registry.model_name(model), registry.CHALLENGER)
        reset = {"model": model, "challenger_percent": 0, "shadow": False}
        answer = served.client.post("/v1/admin/traffic", json=reset, headers=served.admin())
        assert answer.status_code == 200 and answer.json()["serving"].get("challenger") is None, answer.text
    figures["traffic_policy"] = {
        "replicas_after_change": {r: sorted(s) for r, s in after_change.items()},
        "replicas_after_kill": {r: sorted(s) for r, s in after_kill.items()},
    }


def _register_variant(served, always_alert: bool) -> str:
    """A new version of MODEL: the champion's own bundle again (a good challenger), or with every
    entity's threshold at 0 so that it flags every row (a degraded one)."""
    import mlflow

    from train import registry

    bundle, _ = registry.load_bundle(MODEL, registry.CHAMPION)
    if always_alert:
        for entity in bundle.detectors:
            bundle.detectors[entity].threshold_ = 0.0
    with mlflow.start_run(run_name=f"rollout-test-{'degraded' if always_alert else 'good'}") as run:
        return registry.register_bundle(bundle, run.info.run_id)


def _rollout(served) -> dict:
    return served.client.get("/v1/models").json()["models"][MODEL]


def _rollout_status(served, status: str, timeout: float) -> dict:
    def ended():
        rollout = _rollout(served)["rollout"]
        return rollout if rollout and rollout["status"] not in ("running", "promoting") else None

    state = wait_for(ended, timeout, f"the rollout to end ({status})", poll=0.5)
    assert state["status"] == status, state
    return state


def test_canary_rollback_of_a_degraded_challenger_and_promotion_of_a_good_one(served, figures):
    from train import registry

    original = registry.alias_version(MODEL, registry.CHAMPION)
    degraded, good = _register_variant(served, always_alert=True), _register_variant(served, always_alert=False)
    load = LoadGenerator(served, rate=60, concurrency=8).start()
    try:
        started = time.monotonic()
        answer = served.client.post(
            "/v1/admin/rollout", json={"model": MODEL, "version": degraded, "plan": TEST_PLAN}, headers=served.admin()
        )
        assert answer.status_code == 200 and answer.json()["percent"] == 10, answer.text
        busy = served.client.post("/v1/admin/rollout", json={"model": MODEL, "version": good}, headers=served.admin())
        assert busy.status_code == 409 and "in progress" in busy.json()["detail"], busy.text
        # nor may the retraining loop take the slot from it (what the canary's share is scored by)
        assert registry.rollout_in_progress(MODEL) == degraded
        with pytest.raises(registry.RolloutBusy):
            registry.request_rollout(MODEL, good)
        assert registry.alias_version(MODEL, registry.CHALLENGER) == degraded
        rolled_back = _rollout_status(served, "rolled_back", 120)
        rollback_s = time.monotonic() - started
        assert [h["step"] for h in rolled_back["history"]] == [0], rolled_back["history"]  # at the first step
        assert rolled_back["reason"].startswith("alert guard breached"), rolled_back["reason"]
        wait_for(lambda: "challenger" not in _rollout(served)["slots"], 60, "the challenger slot emptied")
        assert _rollout(served)["traffic"]["challenger_percent"] == 0

        started = time.monotonic()  # the good one through the CLI, as an operator would: `raywatch rollout --wait`
        plan = served.workdir / "rollout-plan.json"
        plan.write_text(json.dumps(TEST_PLAN))
        cli = [os.path.join(os.path.dirname(sys.executable), "raywatch"), "rollout", MODEL, good, "--wait"]
        env = {**os.environ, "RAYWATCH_ADMIN_KEYS_FILE": str(served.keys_file)}
        done = subprocess.run(
            [*cli, "--plan", str(plan), "--url", served.base_url], env=env, capture_output=True, text=True, timeout=300
        )
        promote_s = time.monotonic() - started
        assert done.returncode == 0, done.stdout + done.stderr
        assert "completed" in done.stdout.splitlines()[-1] and "at 50%" in done.stdout, done.stdout
        completed = _rollout_status(served, "completed", 10)
        assert [h["action"] for h in completed["history"]] == ["advance", "advance"], completed["history"]
        assert [h["percent"] for h in completed["history"]] == [10, 50]
        assert registry.alias_version(MODEL, registry.CHAMPION) == good
        assert registry.alias_version(MODEL, registry.PREVIOUS) == original
        wait_for(
            lambda: _rollout(served)["slots"]["champion"]["version"] == good
            and "challenger" not in _rollout(served)["slots"],
            60,
            "the promoted version serving as champion",
        )

        # a requested rollout the ingress cannot start (here a plan that does not end at 100%) is marked
        # refused with the reason; left "requested", it would hold the challenger slot and refuse the next
        refused = _register_variant(served, always_alert=False)
        registry.request_rollout(MODEL, refused, {**TEST_PLAN, "steps": [10, 50]})
        marked = wait_for(
            lambda: (r := registry.rollout_request(MODEL, refused)) and r["status"] != "requested" and r,
            60,
            "the unstartable rollout request marked",
            poll=0.5,
        )
        assert marked["status"] == "refused" and "100" in marked["reason"], marked
        assert registry.rollout_in_progress(MODEL) is None
        wait_for(lambda: "challenger" not in _rollout(served)["slots"], 60, "the refused version's slot emptied")

        # the retraining loop's way: it registers a challenger and asks for a rollout; the ingress starts it
        started = time.monotonic()
        retrained = _register_variant(served, always_alert=False)
        registry.request_rollout(MODEL, retrained, TEST_PLAN)

        def completed_by_loop():
            rollout = _rollout(served)["rollout"]
            return rollout if rollout["version"] == retrained and rollout["status"] == "completed" else None

        by_loop = wait_for(completed_by_loop, 240, "the requested rollout to start and complete")
        loop_s = time.monotonic() - started
        assert registry.alias_version(MODEL, registry.CHAMPION) == retrained
        assert registry.rollout_request(MODEL, retrained)["status"] == "started"  # started once, not again
    finally:
        load.stop()
        registry.promote(MODEL, original)  # the other tests of the suite expect the first version
        served.client.post("/v1/admin/rollout/abort", json={"model": MODEL}, headers=served.admin())
    outcome = summarize(load.outcomes)
    figures["canary_rollout"] = {
        "load": outcome,
        "degraded": {"rolled_back_after_s": round(rollback_s, 1), "step": rolled_back["history"][-1]},
        "good": {"promoted_after_s": round(promote_s, 1), "steps": [h["percent"] for h in completed["history"]]},
        "requested_by_the_loop": {"promoted_after_s": round(loop_s, 1), "steps": len(by_loop["history"])},
        "unstartable_request": {"status": marked["status"], "reason": marked["reason"][:200]},
    }
    assert outcome["statuses"] == {"200": outcome["requests"]}, outcome  # the champion never stopped serving
