"""Canary rollouts without Serve: the guards' test, the step machine in traffic.db as two replicas share it,
and the plan's validation. The rollout over real HTTP is in tests/reliability/test_rollouts.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from detect.state import file_stamp
from serve.rollout import ArmStats, RolloutPlan, RolloutStore, StepCounter, difference_bounds, judge, step_key
from serve.router import TrafficPolicy
from serve.traffic import TrafficStore

FAST = RolloutPlan(steps=[5, 25, 100], min_hold_s=10, min_requests=50, max_step_s=600)


def arm(calls: int, errors: int = 0, fallbacks: int = 0, flagged: int = 0, latency_ms: float = 5.0) -> ArmStats:
    stats = ArmStats()
    for i in range(calls):
        stats.record(i >= errors, i < fallbacks, latency_ms + (i % 7) * 0.1, 1, int(i < flagged))
    return stats


def test_difference_bounds_bracket_the_observed_difference_and_narrow_with_more_data():
    small, large = difference_bounds(10, 100, 5, 100, 0.05), difference_bounds(100, 1000, 50, 1000, 0.05)
    assert small[0] < 0.05 < small[1] and large[0] < 0.05 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert difference_bounds(0, 0, 0, 0, 0.05)[1] > 0.5  # no evidence: nothing is shown


def test_an_always_alerting_canary_is_rolled_back_on_the_first_evidence():
    verdict = judge(FAST, arm(20, flagged=20), arm(400, flagged=4), held_s=1.0)
    assert verdict.action == "rollback" and verdict.reason.startswith("alert guard breached"), verdict


def test_a_slow_canary_and_a_failing_canary_are_rolled_back():
    slow = judge(FAST, arm(60, latency_ms=80.0), arm(600, latency_ms=5.0), held_s=1.0)
    assert slow.action == "rollback" and slow.reason.startswith("latency"), slow
    failing = judge(FAST, arm(60, errors=20, fallbacks=20), arm(600), held_s=1.0)
    assert failing.action == "rollback" and failing.reason.startswith(("error", "fallback")), failing


def test_an_equal_canary_holds_until_time_and_evidence_then_advances():
    assert judge(FAST, arm(60, flagged=1), arm(1200, flagged=12), held_s=5.0).action == "hold"  # too soon
    assert judge(FAST, arm(20), arm(400), held_s=30.0).action == "hold"  # too few canary calls
    verdict = judge(FAST, arm(300, flagged=3), arm(6000, flagged=60), held_s=30.0)
    assert verdict.action == "advance", verdict
    assert set(verdict.guards) == {"error", "fallback", "alert", "latency"}


def test_a_step_with_no_verdict_rolls_back_as_inconclusive():
    verdict = judge(FAST, arm(5), arm(100), held_s=601.0)
    assert verdict.action == "rollback" and "inconclusive" in verdict.reason
    assert verdict.reason.endswith("5/50 canary calls"), verdict.reason  # it says what was missing
    unproven = judge(FAST, arm(60, flagged=3), arm(600, flagged=24), held_s=601.0)  # 0.05 vs 0.04: unclear
    assert unproven.action == "rollback" and "not yet shown within tolerance: alert (canary" in unproven.reason
    late = judge(FAST, arm(300, flagged=3), arm(6000, flagged=60), held_s=601.0)
    assert late.action == "advance", late  # evidence that arrives at the limit still counts


def test_the_plan_refuses_unknown_keys_and_steps_that_do_not_rise_to_100():
    with pytest.raises(ValidationError, match="hold_s"):
        RolloutPlan(hold_s=5)
    for steps in ([25, 5, 100], [5, 25], [0, 100], [5, 5, 100]):
        with pytest.raises(ValidationError, match="steps"):
            RolloutPlan(steps=steps)


def test_the_step_machine_drives_the_shared_policy_and_survives_a_restart(tmp_path):
    path = tmp_path / "traffic.db"
    one, two = RolloutStore(path), RolloutStore(path)  # two ingress replicas
    traffic = TrafficStore(path)
    state = one.start("autoencoder", "2", FAST, now=0.0)
    with pytest.raises(ValueError, match="in progress"):
        two.start("autoencoder", "3", FAST, now=1.0)
    policy = traffic.get("autoencoder")
    assert policy == TrafficPolicy(5.0, False, "request", step_key(state))
    counter = StepCounter(two)
    for stats, which in ((arm(300, flagged=3), "canary"), (arm(6000, flagged=60), "champion")):
        counter.pending[(step_key(state), which)] = stats
    policy_stamp = file_stamp(path)
    counter.flush()
    assert file_stamp(path) == policy_stamp  # counts go to their own file: the replicas' policy cache stays valid
    assert one.decide("autoencoder", now=5.0) is None  # held: too soon
    state, verdict = two.decide("autoencoder", now=30.0)
    assert verdict.action == "advance" and state["percent"] == 25.0 and state["status"] == "running"
    assert one.decide("autoencoder", now=30.5) is None  # the new step has no counts yet: the other replica holds
    assert RolloutStore(path).get("autoencoder")["step"] == 1  # a restarted replica resumes the step
    assert TrafficStore(path).get("autoencoder").challenger_percent == 25.0
    counter.pending[(step_key(state), "canary")] = arm(20, flagged=20)
    counter.pending[(step_key(state), "champion")] = arm(200, flagged=2)
    counter.flush()
    state, verdict = one.decide("autoencoder", now=31.0)
    assert verdict.action == "rollback" and state["status"] == "rolled_back", verdict
    assert [h["action"] for h in state["history"]] == ["advance", "rollback"]
    assert TrafficStore(path).get("autoencoder") == TrafficPolicy(0.0)  # all traffic back to the champion


def test_passing_the_last_step_before_100_promotes_and_an_abort_clears_the_share(tmp_path):
    path = tmp_path / "traffic.db"
    store = RolloutStore(path)
    state = store.start("lstm", "4", RolloutPlan(steps=[50, 100], min_hold_s=0, min_requests=50), now=0.0)
    counter = StepCounter(store)
    counter.pending[(step_key(state), "canary")] = arm(3000, flagged=30)
    counter.pending[(step_key(state), "champion")] = arm(3000, flagged=30)
    counter.flush()
    state, verdict = store.decide("lstm", now=1.0)
    assert verdict.action == "advance" and state["status"] == "promoting" and state["percent"] == 100.0
    assert store.finish("lstm", "completed", "promoted")["status"] == "completed"
    assert TrafficStore(path).get("lstm") == TrafficPolicy(0.0)
    store.start("lstm", "5", FAST, now=2.0)
    assert store.finish("lstm", "aborted", "by an operator")["percent"] == 0.0
    assert store.finish("lstm", "aborted", "twice") is None


def test_a_request_split_reaches_the_canary_in_its_share_whatever_the_entity():
    policy = TrafficPolicy(25.0, split="request", step_key="x:0")
    paths = [policy.path_for("one-entity", has_challenger=True) for _ in range(4000)]
    assert 0.2 < paths.count("challenger") / len(paths) < 0.3
    assert {TrafficPolicy(25.0).path_for("one-entity", True) for _ in range(50)} in ({"champion"}, {"challenger"})


def test_with_trusted_labels_a_canary_whose_alerts_are_false_is_rolled_back_on_precision(tmp_path):
    """The false-alarm guard (1 - precision) counts only flagged rows with a trusted label, and only once
    both arms have `min_labels` of them; the labels come from the serving store, as /v1/feedback keeps them."""
    from detect.state import ServingStore

    store = ServingStore(tmp_path / "serving.db")
    canary, champion = arm(400, flagged=30), arm(400, flagged=30)
    canary.flagged_rows = [["e1", str(t)] for t in range(30)]
    champion.flagged_rows = [["e2", str(t)] for t in range(30)]
    for t in range(30):
        store.add_feedback("e1", str(t), int(t < 6), None, trusted=True)  # 24 of the canary's 30 alerts false
        store.add_feedback("e2", str(t), int(t < 27), None, trusted=True)  # 3 of the champion's false
    labels = lambda entity, stamps: store.labels(entity, stamps, trusted_only=True)  # noqa: E731
    plan = RolloutPlan(min_hold_s=0, min_requests=50, max_alert_rate_increase=0.5, min_labels=20)
    verdict = judge(plan, canary, champion, held_s=1.0, labels=labels)
    assert verdict.action == "rollback" and verdict.reason.startswith("false_alarm guard breached"), verdict
    assert verdict.guards["false_alarm"]["canary"] == 0.8 and verdict.guards["false_alarm"]["champion"] == 0.1
    assert "false_alarm" not in judge(plan, canary, champion, 1.0, labels=None).guards  # no labels: not judged
    untrusted = ServingStore(tmp_path / "other.db")
    for t in range(30):
        untrusted.add_feedback("e1", str(t), 0, None, trusted=False)
    anonymous = lambda entity, stamps: untrusted.labels(entity, stamps, trusted_only=True)  # noqa: E731
    assert "false_alarm" not in judge(plan, canary, champion, 1.0, labels=anonymous).guards


def test_an_ingress_refuses_a_rollout_request_it_cannot_start_but_not_one_another_replica_started(
    mlflow_store, tmp_path, capsys
):
    """The ingress's start of a requested rollout (serve/app.py `_start_requested_rollout`) with the real
    registry and store, as two ingress replicas meet it: a request that cannot start is marked refused, with
    the reason, and holds no slot. The challenger slot goes back to the rollout under way that the tags had
    missed (the request had taken it), or is emptied after a bad plan. The second replica to read a request
    the first has just started leaves it alone, even once that rollout has ended. `raywatch models` shows
    each request's status and reason."""
    import asyncio
    from types import MethodType, SimpleNamespace

    from mlflow import MlflowClient

    from cli.main import main
    from serve.app import RaywatchAPI
    from train import registry

    registry.setup()
    client, name = MlflowClient(), registry.model_name("autoencoder")
    client.create_registered_model(name)
    for _ in range(3):
        client.create_model_version(name, source=str(tmp_path))
    store, ingress = RolloutStore(tmp_path / "traffic.db"), RaywatchAPI.func_or_class

    def replica_sees(version: str) -> None:
        """One ingress replica's first look at `version` in the challenger slot."""
        replica = SimpleNamespace(
            rollout_seen=set(), rollouts=store, m_rollout_percent=SimpleNamespace(set=lambda *a, **k: None)
        )
        replica._refuse_rollout_request = MethodType(ingress._refuse_rollout_request, replica)
        asyncio.run(
            ingress._start_requested_rollout(replica, "autoencoder", {"slots": {"challenger": {"version": version}}})
        )

    def status(version: str) -> dict:
        return registry.rollout_request("autoencoder", version)

    def challenger() -> str | None:
        return registry.alias_version("autoencoder", registry.CHALLENGER)

    registry.request_rollout("autoencoder", "1")
    replica_sees("1")
    assert status("1")["status"] == "started" and store.in_progress("autoencoder")["version"] == "1"
    # a second replica that read the tag before the first one marked it: the rollout is this version's
    registry.mark_rollout("autoencoder", "1", "requested")
    replica_sees("1")
    assert status("1")["status"] == "requested", status("1")  # not refused: the first replica marks it
    assert challenger() == "1"

    # version 1's rollout runs, but its tag is gone (as for a rollout started before the tags existed): a job's
    # request takes the slot; the ingress refuses it, says why, and gives the slot back to the rollout
    client.delete_model_version_tag(name, "1", registry.ROLLOUT_TAG)
    registry.request_rollout("autoencoder", "2")
    assert challenger() == "2"
    replica_sees("2")
    assert status("2")["status"] == "refused" and "version 1 is in progress" in status("2")["reason"], status("2")
    assert challenger() == "1" and status("1")["status"] == "started"
    assert registry.rollout_in_progress("autoencoder") == "1"  # the rollout holds its slot again
    assert main(["models"]) == 0  # what an operator reads of it
    assert "v1 [challenger] (rollout started), v2 (rollout refused: a rollout of version 1 is in progress" in (
        capsys.readouterr().out
    )

    store.finish("autoencoder", "aborted", "test")
    registry.clear_alias("autoencoder", registry.CHALLENGER, "1")  # what the ingress does when a rollout ends
    registry.request_rollout("autoencoder", "3", {"steps": [10, 50]})  # a plan the ingress cannot run
    replica_sees("3")
    assert status("3")["status"] == "refused" and "end at 100" in status("3")["reason"], status("3")
    assert store.get("autoencoder")["version"] == "1"  # nothing started
    assert challenger() is None and registry.rollout_in_progress("autoencoder") is None  # nobody serves it

    # a replica that read a request as "requested" before another replica started it, and only acts on it once
    # that rollout has ended, does not start it again: the store starts one rollout per request
    registry.request_rollout("autoencoder", "2")
    replica_sees("2")
    started = store.get("autoencoder")
    assert started["version"] == "2" and started["status"] == "running"
    store.finish("autoencoder", "rolled_back", "test")
    registry.mark_rollout("autoencoder", "2", "requested")  # what the late replica read
    replica_sees("2")
    assert store.get("autoencoder")["id"] == started["id"] and store.in_progress("autoencoder") is None
    assert status("2")["status"] == "requested"  # not refused either: nothing was wrong with it
