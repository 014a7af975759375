"""Traffic policy across ingress replicas: a change applies to every replica before its 200 and survives
killing them all (the policy lives in the state folder, `serve/traffic.py`)."""

from __future__ import annotations

from .support import INGRESS, REPLICAS

RECOVERY_S = 60.0


def _policies_by_replica(served, model: str, answers: int = 40) -> dict[str, set[float]]:
    """The challenger share each ingress replica reports for `model`, over `answers` calls of /v1/models."""
    seen: dict[str, set[float]] = {}
    for asked in range(answers):
        body = served.client.get("/v1/models").json()
        seen.setdefault(body["replica"], set()).add(body["models"][model]["traffic"]["challenger_percent"])
        if len(seen) >= REPLICAS and asked >= 10:
            break
    return seen


def test_traffic_change_applies_to_every_ingress_replica_and_survives_their_kill(served, figures):
    model = "autoencoder"
    change = {"model": model, "challenger_version": "1", "challenger_percent": 40, "shadow": False}
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
