"""The retraining gate (monitoring/trigger.py RetrainGate): drift earns an entity a job only when it
persists over consecutive test windows, and at most one training in `min_days_between` days of served data
(the champion's own included); counted in the data's windows per champion version, kept in the drift
event store across restarts, and applied by the monitor."""

from __future__ import annotations

import pytest

from detect.drift import DriftResult
from monitoring.events import DriftEventStore
from monitoring.monitor import DriftMonitor, MonitorConfig
from monitoring.trigger import RetrainGate, gate_key

ENTITY = "smd/machine-9-9"


@pytest.fixture()
def store(tmp_path):
    return DriftEventStore(tmp_path / "drift.db")


def windows(gate: RetrainGate, drifted: list[bool], first_id: int = 1, rows: int = 100, version: str = "1") -> list:
    """Feed one verdict per window; window k starts at row first_id + k * rows."""
    return [gate.observe(ENTITY, version, d, first_id + k * rows) for k, d in enumerate(drifted)]


def test_an_isolated_drifted_window_earns_no_job_and_a_clean_one_resets_the_streak(store):
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=0)
    verdicts = windows(gate, [True, False, True, False])
    assert not any(v.ready for v in verdicts)
    assert "drift in 1 consecutive window(s) of the 2" in verdicts[0].reason
    assert verdicts[0].held_by == "persistence" and verdicts[1].held_by is None  # a clean window holds nothing
    assert gate.state(ENTITY)["streak"] == 0


def test_persistent_drift_earns_a_job_learning_from_the_first_drifted_window(store):
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=0)
    first, second = windows(gate, [True, True], first_id=501)
    assert not first.ready and second.ready
    assert second.since_id == 501  # the challenger learns from the whole persistent drift, not its last window


def test_at_most_one_training_per_entity_in_the_budget_of_windows(store):
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=7)
    # a champion drifted from its first window: not retrained before its 7th
    first = windows(gate, [True] * 7)
    assert [v.ready for v in first] == [False] * 6 + [True]
    assert "retraining budget: 2 day(s) of data since the champion started serving" in first[1].reason
    assert first[1].held_by == "budget" and first[-1].held_by is None
    gate.submitted(ENTITY)
    # the challenger was kept and the machine stays drifted: the next job 7 windows after the last one
    later = windows(gate, [True] * 7, first_id=801)
    assert [v.ready for v in later] == [False] * 6 + [True]
    assert later[-1].since_id == 801


def test_the_budget_is_in_days_of_data_whatever_a_window_spans(store):
    """Two-day windows (a 5-minute machine's): the 7-day budget lets the 4th drifted window through (8 days),
    not the 7th (14 days, as a budget in windows did)."""
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=7)
    verdicts = [gate.observe(ENTITY, "1", True, 1 + 576 * k, window_days=2.0) for k in range(4)]
    assert [v.ready for v in verdicts] == [False] * 3 + [True]
    assert "6 day(s) of data" in verdicts[2].reason and "at most one in 7 days" in verdicts[2].reason


def test_counts_kept_in_windows_before_the_budget_was_in_days_read_as_days(store):
    store.set_state(
        gate_key("autoencoder", ENTITY), {"version": "1", "streak": 1, "since_id": 1, "windows_since_training": 6}
    )
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=7)
    assert gate.state(ENTITY)["days_since_training"] == 6.0
    assert gate.observe(ENTITY, "1", True, 101).ready  # the seventh day, the second drifted window


def test_jobs_stay_within_one_per_budget_whatever_the_drift(store):
    """Persistent drift in every window for 60 windows: never more than 60 / 7 jobs."""
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=7)
    jobs = 0
    for k in range(60):
        if gate.observe(ENTITY, "1", True, 1 + 100 * k).ready:
            gate.submitted(ENTITY)
            jobs += 1
    assert jobs == 60 // 7


def test_a_new_champion_starts_the_counts_afresh(store):
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=2)
    assert windows(gate, [True, True], version="1")[-1].ready
    assert not windows(gate, [True], version="2")[-1].ready  # version 2 was just trained: streak and budget anew


def test_the_gate_counts_on_after_a_restart(store, tmp_path):
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=0)
    windows(gate, [True])
    restarted = RetrainGate("autoencoder", DriftEventStore(tmp_path / "drift.db"), 2, 0)
    assert restarted.observe(ENTITY, "1", True, 101).ready  # the first drifted window was not forgotten


def test_a_baseline_reset_restarts_the_streak(store):
    gate = RetrainGate("autoencoder", store, persist_windows=2, min_days_between=0)
    windows(gate, [True])
    gate.restart_streak(ENTITY)
    assert not gate.observe(ENTITY, "1", True, 101).ready


@pytest.mark.parametrize("field, value", [("retrain_persist_windows", 0), ("retrain_min_days_between", -1)])
def test_bad_gate_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        MonitorConfig.from_dict({field: value})


def test_a_renamed_gate_setting_is_refused_with_its_new_name():
    """A config written for the windows-based budget says what replaced it, not only "unknown field"."""
    with pytest.raises(ValueError, match="retrain_min_windows_between is now retrain_min_days_between"):
        MonitorConfig.from_dict({"retrain_min_windows_between": 7})


def drift(detector: str, is_drift: bool) -> DriftResult:
    return DriftResult(0.0, "autoencoder", ENTITY, detector, is_drift, 0.5, 0.0001, 0.005)


def test_the_monitor_submits_only_what_the_gate_lets_through(tmp_path, monkeypatch):
    """In process, with no champion and a job address where nothing listens: a window the gate holds back
    records the gate's reason; one it lets through reaches the submission (which then fails, and says so)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = {"retrain_persist_windows": 2, "retrain_min_days_between": 0, "job_address": "http://127.0.0.1:9"}
    monitor = DriftMonitor("autoencoder", config, str(tmp_path / "state"))
    monitor._after_window(ENTITY, [drift("ks", True), drift("mmd", False)], [1, 2], first_id=1)
    assert "drift in 1 consecutive window(s)" in monitor.trigger.last_skip()["reason"]
    monitor._after_window(ENTITY, [drift("ks", True)], [3], first_id=101)
    assert monitor.trigger.last_skip()["reason"].startswith("submission failed")
    assert monitor.trigger.last_job() is None
    # drift from a detector that does not trigger retraining counts as none: the streak ends
    monitor.config.retrain_on = ("mmd",)
    monitor._after_window(ENTITY, [drift("ks", True)], [4], first_id=201)
    assert monitor.gate.state(ENTITY)["streak"] == 0


def test_the_gate_counts_windows_while_retraining_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monitor = DriftMonitor("autoencoder", {"retrain": False}, str(tmp_path / "state"))
    monitor._after_window(ENTITY, [drift("ks", True)], [1], first_id=1)
    state = monitor.gate.state(ENTITY)
    assert state["streak"] == 1 and state["days_since_training"] == 1
    assert monitor.trigger.last_skip() is None  # nothing was asked of the trigger
