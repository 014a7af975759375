"""The ingress's parts without Serve: entity history (bounded, least recently seen evicted first), the
fallback baseline, the alert book (rows grouped into alert episodes), and the drift-monitor feed (never
blocks, counts what it cannot deliver)."""

from __future__ import annotations

import asyncio
import tracemalloc

import numpy as np
import pytest

from detect.state import ServingStore, connect
from monitoring.served import ServedColumns, ServedColumnsBuilder
from serve.auth import KEYS_FILE_ENV, AuthError, feedback_trusted
from serve.history import FALLBACK_THRESHOLD, AlertBook, EntityHistory, fallback_scores
from serve.monitor_feed import MonitorFeed
from serve.router import TrafficPolicy
from serve.traffic import TrafficStore


def test_history_keeps_the_last_rows_and_evicts_the_least_recently_seen_entity():
    history = EntityHistory(rows=3, max_entities=2)
    for i in range(5):
        history.of("a").append(np.array([float(i)]))
    assert [r[0] for r in history.of("a")] == [2.0, 3.0, 4.0]
    history.of("b")
    history.of("a")  # a is now the most recently seen
    history.of("c")  # evicts b, not a
    assert history.peek("b") is None and history.peek("a") is not None and len(history) == 2


def test_context_and_new_returns_the_context_then_the_new_rows_and_stores_them():
    history = EntityHistory(rows=10)
    history.context_and_new("e", np.arange(6, dtype=float).reshape(3, 2), context=0)
    rows = history.context_and_new("e", np.array([[9.0, 9.0]]), context=2)
    np.testing.assert_array_equal(rows, [[2.0, 3.0], [4.0, 5.0], [9.0, 9.0]])
    assert len(history.of("e")) == 4


def test_history_keeps_copies_of_its_rows_not_views_pinning_the_whole_request():
    """A 5,000-row batch leaves the entity's last rows in the history, in a buffer of their own: the
    request's array is not kept alive by them (memory per entity stays bounded by `rows`)."""
    history = EntityHistory(rows=16)
    batch = np.random.default_rng(0).random((5000, 38))
    history.context_and_new("e", batch, context=0)
    kept = history.of("e")
    np.testing.assert_array_equal(np.asarray(kept), batch[-16:])
    buffers = {id(r.base): r.base for r in kept if r.base is not None}
    assert all(b is not batch for b in buffers.values())
    assert sum(b.nbytes for b in buffers.values()) <= 16 * 38 * 8


def test_a_full_history_takes_new_rows_in_its_own_buffer_not_a_new_one_per_row():
    """Once an entity has `rows` samples, each new one is shifted into the same buffer, not copied with the
    others into a new one: an allocation and a copy saved per entity per snapshot (measured: no change in
    the ingress's resident memory, benchmarks/results/scale.md)."""
    history = EntityHistory(rows=8)
    rows = np.arange(40, dtype=float).reshape(20, 2)
    for row in rows[:8]:
        history.context_and_new("e", row[None], context=0)
    buffer = history.of("e").array().base
    for row in rows[8:]:
        history.context_and_new("e", row[None], context=0)
    kept = history.of("e").array()
    assert kept.base is buffer
    np.testing.assert_array_equal(kept, rows[-8:])


def test_an_entity_keeps_what_its_models_read_at_least_the_floor_and_more_when_a_model_reads_more():
    """A machine scored by a model that reads 15 rows before a new one keeps the floor's 32 rows, in a
    buffer of 32 rows, not 64; once a model that reads 40 serves it, it keeps 40 from then on."""
    history = EntityHistory(rows=64, floor=32)
    rows = np.arange(200, dtype=float).reshape(100, 2)
    for row in rows[:50]:
        history.context_and_new("e", row[None], context=15)
    kept = history.of("e").array()
    np.testing.assert_array_equal(kept, rows[18:50])
    assert kept.base.nbytes == 32 * 2 * 8
    for row in rows[50:]:
        context = history.context_and_new("e", row[None], context=40)
    assert len(context) == 41
    np.testing.assert_array_equal(history.of("e").array(), rows[-40:])


def test_fallback_flags_a_row_far_from_the_recent_history():
    rng = np.random.default_rng(0)
    rows = np.vstack([rng.normal(0, 1, (50, 3)), [[0.0, 0.0, 0.0], [40.0, 0.0, 0.0]]])
    out = fallback_scores(rows, 2, ["a", "b", "c"])
    flagged = out["scores"] >= FALLBACK_THRESHOLD
    assert flagged.tolist() == [False, True]
    assert out["top"][1][0] == 0  # metric a explains the flagged row


def _offer(feed: MonitorFeed, model: str, n: int, path: str) -> None:
    """`n` rows served by `model` along `path`, scored 0, 1, ..., n-1 against a threshold of 1.5."""
    served = ServedColumnsBuilder()
    served.add(model, "e", list(range(n)), np.ones((n, 2)), path, np.arange(n, dtype=float), np.full(n, 1.5))
    for model, rows in served.batches():
        feed.offer(model, rows)


def test_feed_delivers_served_rows_in_batches_with_champion_scores_only():
    delivered: list[tuple[str, list]] = []

    async def deliver(model, rows):
        delivered.append((model, rows.rows()))

    async def scenario():
        feed = MonitorFeed(deliver, queue_rows=100, flush_s=0.01)
        _offer(feed, "lstm", 3, "champion")
        _offer(feed, "lstm", 2, "fallback")
        while feed.status()["pending"] or not delivered:
            await asyncio.sleep(0.01)
        return feed

    feed = asyncio.run(scenario())
    rows = [item for _, items in delivered for item in items]
    assert len(rows) == 5 and feed.status() == {"pending": 0, "dropped": 0}
    assert [r["is_anomaly"] for r in rows[:3]] == [False, False, True]
    assert all(r["score"] is None and r["is_anomaly"] is None for r in rows[3:])  # not the champion's


def test_feed_never_blocks_and_counts_what_it_cannot_take_or_deliver():
    counted: list[tuple[str, int, str | None]] = []

    async def unreachable(model, items):
        raise ConnectionError("monitor gone")

    async def scenario():
        feed = MonitorFeed(unreachable, queue_rows=4, flush_s=0.01, count=lambda *c: counted.append(c))
        _offer(feed, "ensemble", 6, "champion")  # 4 fit, 2 do not
        while feed.status()["pending"] or feed.dropped < 6:
            await asyncio.sleep(0.01)
        return feed

    feed = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert feed.dropped == 6
    assert sum(n for _, n, reason in counted if reason == "queue_full") == 2
    assert sum(n for _, n, reason in counted if reason == "monitor_error") == 4


def test_a_disabled_feed_takes_nothing():
    async def deliver(model, items):
        pytest.fail("a disabled feed delivered rows")

    async def scenario():
        feed = MonitorFeed(deliver, queue_rows=10, flush_s=0.01, enabled=False)
        _offer(feed, "lstm", 3, "champion")
        return feed.status()

    assert asyncio.run(scenario()) == {"pending": 0, "dropped": 0}


def test_served_columns_give_the_monitor_its_rows_per_model_and_width():
    served = ServedColumnsBuilder()
    at = np.full(2, 1.5)
    served.add("lstm", "a", ["t0", "t1"], np.array([[1.0, 2.0], [3.0, 4.0]]), "champion", np.array([1.0, 2.0]), at)
    served.add("lstm", "new", ["t0"], np.array([[5.0, 6.0]]), "champion", np.array([0.5]), at[:1], model_key="fleet:x")
    served.add("lstm", "b", ["t0"], np.array([[7.0, 8.0, 9.0]]), "fallback", np.array([9.0]), at[:1])
    batches = served.batches()
    assert [(model, len(rows), rows.width) for model, rows in batches] == [("lstm", 3, 2), ("lstm", 1, 3)]
    rows = batches[0][1].rows()
    assert [r["entity"] for r in rows] == ["a", "a", "new"] and rows[1]["values"] == [3.0, 4.0]
    assert [r["is_anomaly"] for r in rows] == [False, True, False] and rows[0]["score"] == 1.0
    assert rows[2]["model_key"] == "fleet:x" and "model_key" not in rows[0]
    fallback = batches[1][1].rows()[0]
    assert fallback["score"] is None and fallback["is_anomaly"] is None and fallback["path"] == "fallback"


def test_served_columns_are_stored_as_the_same_observations_as_their_rows(tmp_path):
    """The monitor stores a batch's columns without making its row dicts (`ServedColumns.stored`): the store
    must then hold what storing those dicts held, challenger and fallback rows (no score, no verdict) too."""
    from detect.state import ServingStore

    served = ServedColumnsBuilder()
    values = np.array([[1.0, 2.5], [3.0, -4.0], [np.nan, 6.0], [7.0, 8.0]])
    scores, at = np.array([1.0, 2.0, 0.5, 9.0]), np.full(4, 1.5)
    served.add("lstm", "a", ["t0", "t1"], values[:2], "champion", scores[:2], at[:2])
    served.add("lstm", "b", [None], values[2:3], "challenger", scores[2:3], at[:1])
    served.add("lstm", "a", [3], values[3:], "fallback", scores[3:], at[:1])
    [(_, columns)] = served.batches()
    by_rows, by_columns = ServingStore(tmp_path / "rows.db"), ServingStore(tmp_path / "columns.db")
    keep = [0, 1, 3]  # the rows a monitor watches: here not entity b's
    by_rows.add_observations("lstm", [columns.rows()[i] for i in keep])
    by_columns.add_observation_columns("lstm", *columns.stored(keep))
    for entity in ("a", "b"):
        want, got = by_rows.observations("lstm", entity), by_columns.observations("lstm", entity)
        assert want.keys() == got.keys() and want["ids"] == got["ids"]
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    assert by_columns.observations("lstm", "a")["is_anomaly"] == [False, True, None]


def test_feed_hands_a_monitor_at_most_a_batch_of_rows_oldest_first():
    async def scenario():
        feed = MonitorFeed(_never_called, queue_rows=100, flush_s=60)
        _offer(feed, "lstm", 7, "champion")
        _offer(feed, "lstm", 4, "champion")
        first, second = feed.take(limit=5), feed.take(limit=100)
        return feed, first, second

    feed, first, second = asyncio.run(scenario())
    assert [r["timestamp"] for part in first["lstm"] for r in part.rows()] == [0, 1, 2, 3, 4]
    assert [r["timestamp"] for part in second["lstm"] for r in part.rows()] == [5, 6, 0, 1, 2, 3]
    assert len(second["lstm"]) == 1  # the same model and width: one monitor call
    assert feed.status() == {"pending": 0, "dropped": 0}


def test_a_full_feed_holds_a_snapshot_as_columns_not_objects_per_row():
    """At a 10,000-machine snapshot the queue is full between monitor calls: it must hold its rows in a
    few arrays (about 100 bytes a row here), not the dict, list and floats per row it once held (about 670)."""
    n, width = 20_000, 8
    entities = [f"machine-{i}" for i in range(n)]
    values, scores = np.random.default_rng(0).normal(size=(n, width)), np.arange(n, dtype=float)
    threshold = np.full(1, 10.0)

    async def scenario():
        feed = MonitorFeed(_never_called, queue_rows=n, flush_s=60)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        served = ServedColumnsBuilder()
        for i, entity in enumerate(entities):
            served.add("autoencoder", entity, [1.0e9], values[i : i + 1], "champion", scores[i : i + 1], threshold)
        for model, rows in served.batches():
            feed.offer(model, rows)
        del served
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return feed, held

    feed, held = asyncio.run(scenario())
    assert feed.status() == {"pending": n, "dropped": 0}
    assert held / n < 200, f"{held / n:.0f} bytes per queued row"


async def _never_called(model: str, rows: ServedColumns) -> None:
    pytest.fail("delivered before the flush")


def test_feedback_trust_follows_the_policy_and_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEYS_FILE_ENV, raising=False)
    keys = tmp_path / "keys"
    keys.write_text("rw-key-one\n")
    assert feedback_trusted(None, "untrusted", str(keys)) is False
    assert feedback_trusted("Bearer rw-key-one", "untrusted", str(keys)) is True
    with pytest.raises(AuthError) as refused:
        feedback_trusted(None, "require", str(keys))
    assert refused.value.status == 401
    with pytest.raises(AuthError) as wrong:
        feedback_trusted("Bearer rw-key-two", "untrusted", str(keys))
    assert wrong.value.status == 403


def test_untrusted_labels_are_kept_but_left_out_on_request_and_old_stores_gain_the_column(tmp_path):
    old = tmp_path / "serving.db"  # a store from before feedback carried its trust
    with connect(old) as db:
        db.execute(
            "CREATE TABLE feedback (id INTEGER PRIMARY KEY, received REAL, entity TEXT, ts TEXT, label INTEGER, detector TEXT)"
        )
        db.execute("INSERT INTO feedback (received, entity, ts, label, detector) VALUES (0, 'e', '1', 1, NULL)")
    store = ServingStore(old)
    store.add_feedback("e", 2, 0, None, trusted=True)
    assert store.labels("e", ["1", "2", "3"]).tolist() == [1, 0, -1]
    assert store.labels("e", ["1", "2", "3"], trusted_only=True).tolist() == [-1, 0, -1]
    assert [f["trusted"] for f in ServingStore(old).feedback()] == [True, False]  # and after a restart


def test_a_traffic_change_reaches_every_replica_and_a_restarted_one(tmp_path):
    one, two = TrafficStore(tmp_path / "traffic.db"), TrafficStore(tmp_path / "traffic.db")  # two ingress replicas
    assert two.get("lstm") == TrafficPolicy()  # nothing set: all traffic to the champion
    one.set("lstm", TrafficPolicy(25.0, shadow=True))
    assert two.get("lstm") == TrafficPolicy(25.0, shadow=True)  # the other replica's next request
    one.set("lstm", TrafficPolicy(0.0))
    assert two.get("lstm") == TrafficPolicy(0.0) and two.get("ensemble") == TrafficPolicy()
    assert TrafficStore(tmp_path / "traffic.db").get("lstm") == TrafficPolicy(0.0)  # after a restart


def test_the_watcher_sends_snapshots_to_the_route_and_limit_the_api_has():
    from ingest.watch import FLEET_ROUTE, FLEET_ROWS
    from serve.schemas import FLEET_PATH, MAX_FLEET_ROWS

    assert (FLEET_ROUTE, FLEET_ROWS) == (FLEET_PATH, MAX_FLEET_ROWS)


def _arrays(scores: list[float], hot_metric: int = 1, metrics: tuple[str, ...] = ("cpu", "mem", "disk")) -> dict:
    """`EntityModel.score_arrays` output for rows whose top metric is `hot_metric` when they score high."""
    top = [[hot_metric, 0] if s >= 1.0 else [0, 2] for s in scores]
    return {
        "scores": np.asarray(scores),
        "threshold": 1.0,
        "metrics": list(metrics),
        "top": np.asarray(top),
        "top_values": np.asarray([[s, 0.1] for s in scores]),
    }


def test_the_ingress_keeps_a_few_kilobytes_per_machine_and_nothing_per_row():
    """What a fleet-scored machine costs the ingress once its statistics are grown: its 64-row history
    (4 KB at 8 metrics) and a few small objects, whatever else it sent (its young sample rows are dropped,
    its own threshold keeps 9 scores of 720, its alert window lives in place). 10,000 machines hold
    their state in every ingress replica, so a kilobyte per machine is 10 MB a replica."""
    import tracemalloc

    from detect.fleet import MAX_WINDOW
    from serve.history import ColdStarts

    machines, rows, metrics = 200, 200, tuple(f"m{i}" for i in range(8))
    values = np.random.default_rng(0).normal(size=(rows, machines, len(metrics)))
    history, cold, book = EntityHistory(), ColdStarts(), AlertBook()

    def snapshot(t: int) -> None:  # one row per machine, as `RaywatchAPI._score_entities` feeds the state
        calls = []
        for e in range(machines):
            entity, new = f"m-{e}", values[t, e : e + 1]
            cold.admit(entity, new)
            history.context_and_new(entity, new, MAX_WINDOW)
            arrays = _arrays([float(abs(new[0, 0])) * 2], metrics=metrics) | {"attribution_half_life_rows": 8}
            arrays["threshold"] = cold.threshold("autoencoder", entity, arrays["scores"], 1.0)
            calls.append(("autoencoder", entity, arrays, [f"t{t}"], None))
        book.observe_many(calls)

    tracemalloc.start()
    for t in range(rows - 1):
        snapshot(t)
    grown = tracemalloc.get_traced_memory()[0]
    snapshot(rows - 1)
    per_row = (tracemalloc.get_traced_memory()[0] - grown) / machines
    tracemalloc.stop()
    per_machine = grown / machines
    assert per_machine < 10 * 1024, f"{per_machine:.0f} bytes per machine"  # 18 KB before the in-place state
    assert per_row < 64, f"{per_row:.0f} bytes per machine kept from one more row"


def test_the_alert_book_turns_served_rows_into_one_alert_per_episode():
    """3 of 5 rows above the threshold open an alert (not one spike), the episode carries its first row's
    timestamp, peak and top metric, and 10 quiet rows close it; each detector has its own."""
    book = AlertBook()
    scores = [0.1, 3.0, 0.2, 0.1, 0.1, 0.1, 2.0, 5.0, 0.3, 4.0, 2.0] + [0.1] * 10
    timestamps = [f"t{i}" for i in range(len(scores))]
    first, thresholds = book.observe("autoencoder", "web-1", _arrays(scores[:8]), timestamps[:8])
    assert thresholds == 1.0  # no SPOT state given: every row judged against the model's stored threshold
    assert first[:8] == [None] * 8  # the lone spike at t1 and two hot rows at t6, t7 page nobody
    rest, _ = book.observe("autoencoder", "web-1", _arrays(scores[8:]), timestamps[8:])
    states = [a and a["state"] for a in rest]
    assert states[:3] == [None, "opened", "firing"] and states[-1] == "closed" and states.count("closed") == 1
    opened, closed = rest[1], rest[-1]
    assert opened["started"] == "t6" and opened["opened"] == "t9" and opened["closed"] is None
    assert closed["closed"] == "t20" and closed["peak_score"] == 5.0 and closed["rows"] == 5  # t6..t10
    assert closed["top_metrics"][0] == "mem" and book.firing() == 0
    # the LSTM's view of the same entity is another alert
    assert book.observe("lstm", "web-1", _arrays([3.0] * 3), ["u0", "u1", "u2"])[0][-1]["state"] == "opened"
    assert book.firing() == 1


def test_the_alert_book_is_bounded_and_forgets_the_least_recently_scored_first():
    book = AlertBook(max_entities=2)
    for entity in ("a", "b"):
        book.observe("autoencoder", entity, _arrays([3.0] * 3), [0, 1, 2])
    book.observe("autoencoder", "a", _arrays([3.0]), [3])  # a is now the most recently scored
    book.observe("autoencoder", "c", _arrays([0.1]), [0])  # evicts b, not a
    assert book.firing() == 1  # a's alert is kept, b's is gone
    assert book.observe("autoencoder", "a", _arrays([3.0]), [4])[0][0]["state"] == "firing"


def test_served_rows_are_judged_against_spot_learning_as_evaluate_judges_them():
    """With the model's SPOT state, the alert book judges each row against SPOT's current threshold and
    lets SPOT learn from it unless an alert fires: over a series cut into requests of any size, the
    thresholds and the alerts are those of `online_alerts`, the rule `raywatch evaluate` reports. A new
    model (a promotion) starts again from its own state."""
    from detect.alerting import online_alerts
    from detect.thresholds import SPOT
    from serve.history import SpotSeed

    rng = np.random.default_rng(3)
    calibration = rng.gamma(2.0, 1.0, 3000)
    served = np.concatenate([rng.gamma(2.0, 1.2, 1500), np.full(12, 40.0), rng.gamma(2.0, 1.2, 500)])
    expected, expected_alerts = online_alerts(served, SPOT().fit(calibration))
    assert expected.min() < expected.max()  # SPOT learnt: the bar moved while the rows were served

    book, seed = AlertBook(), SpotSeed(("champion", "1", "fp32"), SPOT().fit(calibration).state())
    thresholds, opened = [], 0
    cuts = np.cumsum(rng.integers(1, 40, 200))
    for part in np.split(np.arange(len(served)), cuts[cuts < len(served)]):
        alerts, judged = book.observe("autoencoder", "web-1", _arrays(served[part].tolist()), part.tolist(), seed)
        thresholds.extend(np.asarray(judged).tolist())
        opened += sum(a is not None and a["state"] == "opened" for a in alerts)
    np.testing.assert_allclose(thresholds, expected)
    assert opened == len(expected_alerts) >= 1

    promoted = SpotSeed(("champion", "2", "fp32"), SPOT().fit(calibration * 3).state())
    _, judged = book.observe("autoencoder", "web-1", _arrays([0.1]), [0], promoted)
    assert judged[0] == pytest.approx(SPOT().fit(calibration * 3).threshold_)


def test_freed_memory_is_given_back_after_big_requests_at_most_once_an_interval_and_after_the_last():
    import time

    from serving_fixtures import wait_for

    from serve.memory import MemoryTrim

    trim = MemoryTrim(rows=100, every_s=1.0, delay_s=0)
    if trim._trim is None:
        pytest.skip("no glibc malloc_trim on this system")
    assert not trim.after(99)  # a small request leaves little behind
    assert trim.after(100)
    wait_for(lambda: trim.trims == 1, 5, "the first trim", poll=0.01)
    first = time.monotonic()
    assert trim.after(5000)  # inside the interval: scheduled for its end, not dropped
    assert not trim.after(5000)  # one trim per interval, however many big requests
    wait_for(lambda: trim.trims == 2, 5, "the trim after the last big request", poll=0.01)
    assert time.monotonic() - first >= 0.9  # not before the interval was over


def test_a_policy_written_in_the_same_clock_tick_as_a_read_is_still_seen(tmp_path):
    """File times tick coarsely: a write in the same tick as a cached stamp leaves the stamp unchanged. A
    stamp that recent is not trusted (detect.state.settled), so the second store sees the new policy."""
    import os

    from detect.state import file_stamp

    writer, reader = TrafficStore(tmp_path / "traffic.db"), TrafficStore(tmp_path / "traffic.db")
    writer.set("lstm", TrafficPolicy(10.0, False))
    stamp = file_stamp(tmp_path / "traffic.db")
    assert reader.get("lstm").challenger_percent == 10.0  # read at once: the stamp is just made
    writer.set("lstm", TrafficPolicy(0.0, False))
    for path, mtime in zip((tmp_path / "traffic.db", tmp_path / "traffic.db-wal"), stamp):
        os.utime(path, ns=(mtime, mtime))  # the second write in the first one's tick
    assert file_stamp(tmp_path / "traffic.db") == stamp
    assert reader.get("lstm").challenger_percent == 0.0


def test_only_a_stamp_older_than_a_clock_tick_is_trusted(tmp_path):
    import os
    import time

    from detect.state import STAMP_SETTLE_NS, file_stamp, settled

    path = tmp_path / "x.db"
    path.write_text("x")
    assert settled(file_stamp(path)) is None  # just written: a write in this tick would not change it
    old = time.time_ns() - 2 * STAMP_SETTLE_NS
    os.utime(path, ns=(old, old))
    assert settled(file_stamp(path)) == file_stamp(path)
    assert settled(None) is None


def test_served_top_metrics_hold_each_metrics_peak_across_requests_as_explain_does():
    """A metric that spiked keeps the top rank on the quiet rows that follow, over requests of any size,
    as `detect.attribution.hold_peaks` ranks the whole series at once; a model that does not hold (half-life
    0) ranks each row on its own, so the spiking metric drops out as soon as the spike ends."""
    from detect.attribution import hold_peaks

    rng = np.random.default_rng(5)
    n, metrics = 300, ("cpu", "mem", "disk", "net")
    contributions = rng.uniform(0.5, 1.5, (n, len(metrics)))
    contributions[100:104, 2] = 40.0  # "disk" spikes for four rows, then looks ordinary again
    top = np.argsort(-contributions, axis=1, kind="stable")[:, :3]

    def arrays(rows: np.ndarray, half_life: float) -> dict:
        return {
            "scores": contributions[rows].sum(axis=1),
            "threshold": 1e9,
            "metrics": list(metrics),
            "top": top[rows],
            "top_values": np.take_along_axis(contributions[rows], top[rows], axis=1),
            "attribution_half_life_rows": half_life,
        }

    sparse = np.zeros_like(contributions)
    np.put_along_axis(sparse, top, np.take_along_axis(contributions, top, axis=1), axis=1)
    held = hold_peaks(sparse, 60)[0]
    expected = np.argsort(-held, axis=1, kind="stable")[:, :3]
    # requests of 1 to 29 rows, and one row a request (a snapshot's entity: its own path, in Python floats)
    for half_life, sizes in (
        (60, rng.integers(1, 30, 100)),
        (60, np.ones(n, dtype=int)),
        (0, rng.integers(1, 30, 100)),
    ):
        book, served, values = AlertBook(), [], []
        cuts = np.cumsum(sizes)
        for part in np.split(np.arange(n), cuts[cuts < n]):
            sent = arrays(part, half_life)
            book.observe("lstm", "web-1", sent, part.tolist())
            served.extend(sent["top"].tolist())
            values.extend(sent["top_values"].tolist())
        firsts = [row[0] for row in served[104:200]]
        if half_life:
            np.testing.assert_array_equal(served, expected)
            np.testing.assert_array_equal(values, np.take_along_axis(held, expected, axis=1))
            assert firsts == [2] * 96  # an hour later, disk is still the first suspect
        else:
            np.testing.assert_array_equal(served, top)
            assert firsts.count(2) < 48


def test_a_packed_call_carries_each_field_as_one_array_and_unpacks_to_the_same_items():
    """serve/wire.py: a snapshot chunk's items (and the answers) travel as columns: every field that is an
    array of one shape in every item is one stacked array; the rest (strings, arrays of other shapes,
    missing fields) come back as they were."""
    from serve.wire import PACK_FROM, is_packed, pack, unpack

    rng = np.random.default_rng(0)
    items = [
        {"entity": f"e{i}", "rows": rng.random((9, 4)), "n_new": 1, "stats": (np.array([192]), rng.random((1, 2, 4)))}
        for i in range(PACK_FROM)
    ]
    items[3]["rows"] = rng.random((5, 4))  # another shape: sent as it is
    del items[5]["stats"]  # an entity's own model: no statistics
    answers = [{"ok": True, "arrays": {"scores": rng.random(1), "metrics": ["a", "b"]}} for _ in items]
    answers[2] = {"ok": False, "error": "boom"}
    for payload in (items, answers):
        packed = pack(payload)
        assert is_packed(packed) and not is_packed(payload)
        back = unpack(packed)
        assert [sorted(b) for b in back] == [sorted(p) for p in payload]
        for got, sent in zip(back, payload):
            for field, value in sent.items():
                if isinstance(value, dict):
                    np.testing.assert_array_equal(got[field]["scores"], value["scores"])
                    assert got[field]["metrics"] == value["metrics"]
                elif isinstance(value, tuple):
                    assert all(np.array_equal(g, v) for g, v in zip(got[field], value))
                else:
                    np.testing.assert_array_equal(got[field], value)
    packed = pack(items)
    assert isinstance(packed["columns"]["n_new"][1], list)
    assert isinstance(packed["columns"]["rows"][1], list)  # one item's rows differ in shape
    stats_rows, stats_values = packed["tuples"]["stats"][1]
    assert stats_values.shape == (PACK_FROM - 1, 1, 2, 4) and stats_rows.shape == (PACK_FROM - 1, 1)
    assert pack(answers)["nested"]["arrays"][1]["columns"]["scores"][1].shape == (PACK_FROM - 1, 1)


def test_a_snapshot_is_cut_into_overlapping_steps_of_bounded_size():
    from serve.app import MIN_SNAPSHOT_CHUNK, SNAPSHOT_CHUNK, SNAPSHOT_STEPS, snapshot_chunk

    assert snapshot_chunk(1) == MIN_SNAPSHOT_CHUNK  # one step: no call smaller than the floor
    assert snapshot_chunk(1000) == 250 and -(-1000 // snapshot_chunk(1000)) == SNAPSHOT_STEPS  # 4 steps overlap
    assert snapshot_chunk(10_000) == SNAPSHOT_CHUNK  # a big fleet: bounded steps (the ingress's peak memory)


def test_the_alert_book_serves_a_decision_threshold_as_is():
    """An incident predictor's saved threshold (`DecisionThreshold`, learnt on labelled validation rows)
    reaches the alert book through its state and judges every served row: no score moves it, not a long
    run of low ones, and an alert still opens on rows above it."""
    from detect.thresholds import DecisionThreshold
    from serve.history import SpotSeed

    seed = SpotSeed(("champion", "1", "fp32"), DecisionThreshold(0.62).state())
    book = AlertBook()
    served = [0.05] * 300 + [0.9] * 6
    alerts, judged = book.observe("ensemble", "web-1", _arrays(served), list(range(len(served))), seed)
    assert np.asarray(judged).tolist() == [0.62] * len(served)
    assert any(a is not None and a["state"] == "opened" for a in alerts)


def test_an_unexpected_error_in_the_app_answers_json_naming_its_type_not_its_text():
    """A bare-text 'Internal Server Error' then means Serve's proxy lost the request with a dead replica
    (tests/reliability/test_faults.py tells the two apart)."""
    import json

    import ray  # noqa: F401  (serve.app's imports want Ray loaded first)
    from starlette.requests import Request

    from serve.app import _internal_error, api

    assert api.exception_handlers.get(Exception) is _internal_error
    request = Request({"type": "http", "method": "POST", "path": "/v1/score", "headers": []})
    answer = asyncio.run(_internal_error(request, KeyError("a row of secret-ish data")))
    body = json.loads(answer.body)
    assert answer.status_code == 500 and "KeyError" in body["detail"] and "secret" not in body["detail"]


def test_a_snapshots_alerts_in_one_pass_are_what_each_entity_gets_alone():
    """`AlertBook.observe_many` (a request's entities, their one-row attribution held in one numpy pass)
    answers exactly as `observe` called for each (detector, entity) in turn: the same alerts, thresholds,
    held top metrics and contributions, snapshot after snapshot, with entities of several metric counts,
    requests of several rows among them, and SPOT-judged pairs."""
    from detect.thresholds import SPOT
    from serve.history import SpotSeed

    rng = np.random.default_rng(5)
    spot = SpotSeed(("champion", "1", None), SPOT().fit(rng.exponential(1.0, 500)).state())
    schemas = {f"m-{e}": tuple(f"x{j}" for j in range(3 + e % 3)) for e in range(12)}
    one_by_one, at_once = AlertBook(), AlertBook()

    def arrays_of(entity: str, rows: int) -> dict:
        metrics = schemas[entity]
        scores = rng.exponential(0.8, rows) * (3.0 if rng.random() < 0.2 else 1.0)
        top = np.argsort(-rng.random((rows, len(metrics))), axis=1)[:, :2]
        out = _arrays(scores.tolist(), metrics=metrics) | {"top": top, "top_values": rng.exponential(2.0, (rows, 2))}
        return out | {"attribution_half_life_rows": 8}

    for t in range(60):
        calls = []
        for entity in schemas:
            arrays = arrays_of(entity, 3 if (t + len(entity)) % 7 == 0 else 1)
            seed = spot if entity.endswith(("1", "4")) else None
            calls.append(("autoencoder", entity, arrays, [f"t{t}.{r}" for r in range(len(arrays["scores"]))], seed))
        copies = [
            (d, e, {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in a.items()}, ts, s)
            for d, e, a, ts, s in calls
        ]
        expected = [one_by_one.observe(*call) for call in copies]
        for (alerts, thresholds), (want_alerts, want_thresholds), (_, _, arrays, _, _), (_, _, want, _, _) in zip(
            at_once.observe_many(calls), expected, calls, copies
        ):
            assert alerts == want_alerts
            np.testing.assert_array_equal(thresholds, want_thresholds)
            np.testing.assert_array_equal(arrays["top"], want["top"])
            np.testing.assert_array_equal(arrays["top_values"], want["top_values"])
    assert at_once.firing() == one_by_one.firing() > 0


def test_a_valid_snapshot_is_parsed_in_one_pass_and_a_bad_row_is_named_by_its_index():
    """A snapshot whose rows are all valid is parsed straight into rows (`schemas.ValidSnapshot`), and they
    are checked as the row-by-row parse checks them (the snapshot's timestamp, one row per entity); one bad
    row sends the snapshot through the row-by-row parse, which rejects that row by index and scores the rest."""
    import json

    from fastapi.exceptions import RequestValidationError

    from serve import schemas as S
    from serve.app import _parse

    known = {"a": ["x", "y"], "b": ["x", "y"], "c": ["x", "y"]}
    rows = [
        {"entity": "a", "metrics": {"x": 1, "y": 2.5}},
        {"entity": "b", "timestamp": "2026-01-01T00:00:00Z", "metrics": {"y": 2, "x": "1.5"}},
        {"entity": "a", "metrics": {"x": 1.0, "y": 2.0}},
        {"entity": "c", "timestamp": None, "metrics": {"x": 3.0, "y": 4.0}},
    ]
    body = json.dumps({"timestamp": 7, "rows": rows}).encode()
    request = _parse(S.FleetSnapshotRequest, body)
    assert isinstance(request, S.ValidSnapshot)
    accepted, where, rejected = S.fleet_rows(request, known)
    by_row = S.fleet_rows(S.FleetSnapshotRequest.model_validate_json(body), known)
    assert [r.model_dump() for r in accepted] == [r.model_dump() for r in by_row[0]]
    assert [r.timestamp for r in accepted] == [7.0, "2026-01-01T00:00:00Z", 7.0] and where == by_row[1] == [0, 1, 3]
    assert rejected == by_row[2] and rejected[0]["field"] == "rows[2].entity"

    rows[1]["metrics"]["x"] = "not a number"
    request = _parse(S.FleetSnapshotRequest, json.dumps({"rows": rows}).encode())
    assert not isinstance(request, S.ValidSnapshot)
    accepted, where, rejected = S.fleet_rows(request, known)
    assert where == [0, 3] and [r["field"] for r in rejected] == ["rows[1].metrics.x", "rows[2].entity"]
    with pytest.raises(RequestValidationError):  # what is wrong with the snapshot itself still answers 422
        _parse(S.FleetSnapshotRequest, json.dumps({"rows": rows, "detectors": ["nope"]}).encode())


def test_raywatch_log_lines_carry_their_fields_and_a_bad_level_falls_back_to_info(monkeypatch, capsys):
    """detect/logs.py: what a Serve replica or monitor actor writes for `log.warning(msg, extra=...)` (before,
    the bare message); a RAYWATCH_LOG_LEVEL that is no level logs at INFO instead of failing the replica."""
    import logging

    from detect.logs import HANDLER_NAME, LEVEL_ENV, FieldsFormatter, process_logging

    record = logging.LogRecord("raywatch.serve", logging.WARNING, __file__, 1, "request refused", None, None)
    record.__dict__.update(route="/v1/score", status=422, detail='rows[0].entity: "x" unknown')
    line = FieldsFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert (
        line
        == 'WARNING raywatch.serve: request refused route="/v1/score" status=422 detail="rows[0].entity: \\"x\\" unknown"'
    )

    logger = logging.getLogger("raywatch")
    monkeypatch.setattr(logger, "handlers", [h for h in logger.handlers if h.get_name() != HANDLER_NAME])
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setenv(LEVEL_ENV, "loud")
    process_logging()
    process_logging()  # once per process
    assert [h.get_name() for h in logger.handlers].count(HANDLER_NAME) == 1 and logger.level == logging.INFO
    assert "RAYWATCH_LOG_LEVEL='LOUD' is no log level" in capsys.readouterr().err


def test_a_line_budget_writes_at_most_its_lines_a_second_and_says_how_many_it_held_back():
    from detect.logs import LineBudget

    now = [100.0]
    budget = LineBudget(per_s=3, clock=lambda: now[0])
    assert [budget.take() for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    now[0] += 0.5
    assert budget.take() == (False, 0)  # the same second
    now[0] += 0.6
    assert budget.take() == (True, 3) and budget.take() == (True, 0)  # a new second: 3 were held back
