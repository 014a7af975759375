"""The demo's real-entity replay: which rows it replays, the shift it injects, how it prints a decision."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.demo import DEMO_ENTITY, decision_lines, real_entity_data, replay_windows
from detect.data import default_data_dir
from detect.drift import entity_drift_config


def test_the_demo_replays_two_unseen_windows_of_a_real_entity_the_second_shifted(tmp_path):
    entity, metrics, rows, labels = real_entity_data(tmp_path, default_data_dir())
    assert entity == DEMO_ENTITY and (tmp_path / DEMO_ENTITY / "test.csv.gz").exists()
    window = entity_drift_config(entity).span
    out = replay_windows(rows, labels, window, metrics)
    first = len(rows) // 2  # after the ensemble's training half
    np.testing.assert_array_equal(out["as_recorded"], rows[first : first + window])
    moved = [metrics.index(m) for m in out["moved"]]
    assert len(moved) == 2  # 10% of 19 metrics
    gain = (out["shifted"] - rows[first + window : first + 2 * window])[:, moved].mean(axis=0)
    np.testing.assert_allclose(gain, 2.0 * rows[first : first + window, moved].std(axis=0))
    assert out["labels"].any()  # the as-recorded window holds an incident: its PR-AUC is defined
    with pytest.raises(ValueError, match="too short"):
        replay_windows(rows[: 2 * window], labels, window, metrics)


def test_a_decision_prints_with_its_evidence():
    decision = {
        "model": "lstm",
        "promoted": False,
        "champion": "1",
        "challenger": "2",
        "reason": "no significant win (p 0.31 >= 0.05)",
        "details": {"test": "wilcoxon", "p_value": 0.31, "budget": 0.01, "incidents": 30, "evidence": "injected"},
    }
    text = "\n".join(decision_lines(decision))
    assert "kept champion" in text and "p_value 0.31" in text and "budget 0.01" in text
    assert "incidents 30" in text and "evidence: injected" in text
    assert "recalibrated" not in text
    decision["details"] |= {"recalibrated": ["smd/machine-1-6"], "recalibrated_version": "3"}
    assert "kept champion, its threshold recalibrated as v3 (v1 vs challenger v2)" in decision_lines(decision)[0]
