"""The fleet lane (serve/fleet_lane.py) against the per-entity objects it stands in for.

One stream of snapshots goes through the objects alone (`EntityHistory`, `ColdStarts`, `AlertBook`, fed as
`RaywatchAPI._score_entities` feeds them) and through the lane, which takes machines over once they are
grown and gives some back mid-stream (as a per-entity request would). Every answer must be the same: the
rows each model call carries, the thresholds, the held top metrics and every alert report.
"""

from __future__ import annotations

import numpy as np
import pytest

from detect.fleet import MAX_WINDOW
from serve.fleet_lane import FleetLane, LaneKey
from serve.history import AlertBook, ColdStarts, EntityHistory

METRICS = ("cpu", "mem", "disk", "net")
CONTEXT = 15  # rows a fleet model reads before a new one (a 16-row window)
HALF_LIFE = 8


def _stream(machines: int, steps: int, seed: int = 0) -> np.ndarray:
    """(steps, machines, metrics) rows with bursts: each machine has a few episodes of high values."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(steps, machines, len(METRICS)))
    for m in range(machines):
        for start in rng.integers(250, steps - 20, size=3):
            values[start : start + rng.integers(2, 15), m, rng.integers(len(METRICS))] += rng.uniform(3, 8)
    return values


def _model(rows: np.ndarray, offset: int, stats_rows: np.ndarray, stats_values: np.ndarray) -> tuple:
    """A stand-in fleet model: the score and top metrics of the last row, in the machine's own units."""
    centre, spread = stats_values[0]
    z = np.abs((rows[-1] - centre) / np.maximum(spread, 1e-9))
    top = np.argsort(-z, kind="stable")[:3]
    return float(z.mean() + 0.01 * rows[:, 0].mean() + 1e-6 * offset), top, z[top]


class _Objects:
    """The per-entity path: what `RaywatchAPI._score_entities` does with the objects for a fleet-scored row."""

    def __init__(self) -> None:
        self.history, self.cold, self.alerts = EntityHistory(), ColdStarts(), AlertBook()

    def step(self, detectors, entities, new_rows, timestamps, fleet_threshold):
        calls, seen = [], []
        for entity, new, ts in zip(entities, new_rows, timestamps):
            stats, before = self.cold.admit(entity, new[None])
            rows = self.history.context_and_new(entity, new[None], CONTEXT)
            for detector in detectors:
                item = rows[-(1 + CONTEXT) :]
                offset = before + 1 - len(item)
                needed = stats.for_windows_from(offset - MAX_WINDOW + 1)
                score, top, values = _model(item, offset, needed.rows, needed.values)
                arrays = {
                    "scores": np.array([score]),
                    "threshold": fleet_threshold,
                    "probability": None,
                    "top": top[None],
                    "top_values": values[None],
                    "metrics": list(METRICS),
                    "attribution_half_life_rows": HALF_LIFE,
                }
                arrays["threshold"] = self.cold.threshold(detector, entity, arrays["scores"], arrays["threshold"])
                calls.append((detector, entity, arrays, [ts], None))
                seen.append((detector, entity, item.copy(), offset))
        out = {}
        for (detector, entity, arrays, _, _), (alerts, threshold), (_, _, item, offset) in zip(
            calls, self.alerts.observe_many(calls), seen
        ):
            out[detector, entity] = (
                item,
                offset,
                float(threshold),
                arrays["top"][0].tolist(),
                arrays["top_values"][0].tolist(),
                alerts[0],
            )
        return out


def _lane_step(lane, objects, key, entities, new_rows, timestamps, fleet_threshold):
    """The same step with the lane taking the grown machines (the rest through the objects, as the app does)."""
    detectors = [name for name, _, _ in key.detectors]
    slots = lane.admit(key, entities, objects.history, objects.cold, objects.alerts)
    taken = slots >= 0
    rest = [i for i in range(len(entities)) if not taken[i]]
    out = objects.step(
        detectors, [entities[i] for i in rest], new_rows[rest], [timestamps[i] for i in rest], fleet_threshold
    )
    idx = np.flatnonzero(taken)
    if not len(idx):
        return out
    plan = lane.plan(key, [entities[i] for i in idx], [timestamps[i] for i in idx], slots[taken], new_rows[idx])
    live = lane.live(plan)
    assert live.all()
    for detector in detectors:
        answers = [
            _model(plan.rows[detector][k], int(plan.offsets[detector][k]), plan.stats_rows[k], plan.stats_values[k])
            for k in range(len(idx))
        ]
        thresholds, top, values, alerts, _, _ = lane.judge(
            plan,
            detector,
            np.arange(len(idx)),
            np.array([a[0] for a in answers]),
            np.full(len(idx), fleet_threshold),
            np.array([a[1] for a in answers]),
            np.array([a[2] for a in answers]),
            HALF_LIFE,
            list(METRICS),
            plan.timestamps,
            True,
        )
        for k, entity in enumerate(plan.entities):
            out[detector, entity] = (
                plan.rows[detector][k],
                int(plan.offsets[detector][k]),
                float(thresholds[k]),
                top[k].tolist(),
                values[k].tolist(),
                alerts[k],
            )
    return out


@pytest.mark.parametrize("detectors", [("autoencoder",), ("autoencoder", "lstm")])
def test_the_lane_answers_every_snapshot_as_the_per_entity_objects_do(detectors):
    machines, steps = 24, 1100
    values = _stream(machines, steps)
    entities = [f"m-{i}" for i in range(machines)]
    key = LaneKey(METRICS, tuple((d, "fleet:x", CONTEXT) for d in detectors), EntityHistory().keep_for(CONTEXT))
    reference, objects, lane = _Objects(), _Objects(), FleetLane()
    rng = np.random.default_rng(1)
    compared = alerts_seen = 0
    for t in range(steps):
        timestamps = [f"t{t}"] * machines
        threshold = 1.5 if t < 700 else 1.2  # the fleet model's threshold may change (a new fleet model)
        expected = reference.step(detectors, entities, values[t], timestamps, threshold)
        got = _lane_step(lane, objects, key, entities, values[t], timestamps, threshold)
        assert got.keys() == expected.keys()
        for pair, (item, offset, thr, top, top_values, alert) in expected.items():
            g_item, g_offset, g_thr, g_top, g_values, g_alert = got[pair]
            np.testing.assert_array_equal(g_item, item, err_msg=f"{pair} at {t}")
            assert (g_offset, g_thr, g_top) == (offset, thr, top), (pair, t)
            np.testing.assert_allclose(g_values, top_values, rtol=0, atol=1e-12, err_msg=f"{pair} at {t}")
            assert g_alert == alert, (pair, t, g_alert, alert)
            compared += 1
            alerts_seen += alert is not None
        if t % 97 == 0 and len(lane):  # a per-entity request for a few machines: they leave the lane
            for entity in rng.choice(entities, size=3, replace=False):
                lane.release(str(entity), objects.history, objects.cold, objects.alerts)
        assert lane.firing() + objects.alerts.firing() == reference.alerts.firing(), t
    assert len(lane) > machines // 2  # the grown machines are in the lane at the end
    assert alerts_seen > 100 and compared == steps * machines * len(detectors)


def test_a_machine_released_while_its_call_is_out_is_not_judged_by_the_lane():
    machines, steps = 4, 400
    values = _stream(machines, steps)
    entities = [f"m-{i}" for i in range(machines)]
    key = LaneKey(METRICS, (("autoencoder", "fleet:x", CONTEXT),), EntityHistory().keep_for(CONTEXT))
    objects, lane = _Objects(), FleetLane()
    for t in range(steps):
        _lane_step(lane, objects, key, entities, values[t], [f"t{t}"] * machines, 1.5)
    assert len(lane) == machines
    slots = lane.admit(key, entities, objects.history, objects.cold, objects.alerts)
    plan = lane.plan(key, entities, ["late"] * machines, slots, values[-1])
    lane.release("m-1", objects.history, objects.cold, objects.alerts)
    assert lane.live(plan).tolist() == [True, False, True, True]
    # the row the plan took is in the history it gave back
    np.testing.assert_array_equal(objects.history.peek("m-1").array()[-1], values[-1, 1])


def test_the_lane_is_bounded_and_forgets_the_least_recently_scored_machine():
    machines, steps = 6, 330
    values = _stream(machines, steps)
    entities = [f"m-{i}" for i in range(machines)]
    key = LaneKey(METRICS, (("autoencoder", "fleet:x", CONTEXT),), EntityHistory().keep_for(CONTEXT))
    objects, lane = _Objects(), FleetLane(max_entities=4)
    for t in range(steps):  # all six grow in the same snapshot: four move in, the objects keep two
        _lane_step(lane, objects, key, entities, values[t], [f"t{t}"] * machines, 1.5)
    held = {e for e in entities if e in lane}
    assert len(held) == 4
    # a snapshot without two of them: the two it brings push out the two it did not see
    quiet = sorted(held)[:2]
    seen = [e for e in entities if e not in quiet]
    _lane_step(lane, objects, key, seen, values[-1, : len(seen)], ["late"] * len(seen), 1.5)
    _lane_step(lane, objects, key, seen, values[-2, : len(seen)], ["later"] * len(seen), 1.5)
    assert {e for e in entities if e in lane} == set(seen)
    assert all(objects.cold.peek(e) is None for e in quiet)  # forgotten, as an evicted entity is


def test_a_machine_moves_to_the_lane_of_its_new_key_when_its_models_change():
    """A new fleet model that reads more rows (another context) makes another lane for the same metrics: a
    machine held in the old one moves over at its next snapshot, and the old lane, emptied, goes (one
    machine: the new lane is still empty when the old one empties)."""
    machines, steps = 1, 330
    values = _stream(machines, steps)
    entities = [f"m-{i}" for i in range(machines)]
    old = LaneKey(METRICS, (("autoencoder", "fleet:x", CONTEXT),), EntityHistory().keep_for(CONTEXT))
    new = LaneKey(METRICS, (("autoencoder", "fleet:y", CONTEXT + 4),), EntityHistory().keep_for(CONTEXT + 4))
    objects, lane = _Objects(), FleetLane()
    for t in range(steps - 1):
        _lane_step(lane, objects, old, entities, values[t], [f"t{t}"] * machines, 1.5)
    assert len(lane) == machines
    slots = lane.admit(new, entities, objects.history, objects.cold, objects.alerts)
    assert (slots >= 0).all() and len(lane) == machines
    plan = lane.plan(new, entities, ["late"] * machines, slots, values[-1])
    assert plan.rows["autoencoder"].shape == (machines, CONTEXT + 5, len(METRICS)) and lane.live(plan).all()
    lane.admit(new, entities, objects.history, objects.cold, objects.alerts)  # the next snapshot
    assert list(lane._stores) == [new]
