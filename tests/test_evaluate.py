"""The evaluation harness reproduces the published peer baselines and writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from detect.evaluate import evaluate
from detect.peers import PEERS

# shared/data/README.md: mean point-wise F1 with the best threshold over the six shipped entities
PUBLISHED_F1 = {"pca": 0.34, "iforest": 0.25, "ecod": 0.23}
PUBLISHED_PR_AUC = {"pca": 0.29, "iforest": 0.17, "ecod": 0.14}


@pytest.fixture(scope="module")
def report(data_dir):
    return evaluate(data_dir, list(PUBLISHED_F1))


def test_reproduces_published_peer_figures(report):
    summary = {s["detector"]: s for s in report["summary"]}
    for name, f1 in PUBLISHED_F1.items():
        assert summary[name]["entities"] == 6
        assert summary[name]["f1"] == pytest.approx(f1, abs=0.02)
        assert summary[name]["pr_auc"] == pytest.approx(PUBLISHED_PR_AUC[name], abs=0.02)


def test_records_hold_every_figure(report):
    keys = {
        "entity",
        "detector",
        "f1",
        "f1_operational",
        "pr_auc",
        "pa_f1",
        "event_recall",
        "event_precision",
        "hitrate_100",
        "hitrate_150",
    }
    for record in report["results"]:
        assert keys <= set(record)
        assert 0 <= record["f1_operational"] <= record["f1"] + 1e-12  # the best threshold bounds any other
        assert record["pa_f1"] >= record["f1"] - 1e-12
        assert 0 <= record["hitrate_100"] <= record["hitrate_150"] <= 1
    pca = [r for r in report["results"] if r["detector"] == "pca"]
    assert np.mean([r["hitrate_150"] for r in pca]) > 0.4  # PCA's per-metric error does find root causes


def test_operational_threshold_comes_from_training_data_only(data_dir):
    from detect.data import load_series

    series = load_series("asd", "omi-2", data_dir)
    det = PEERS["pca"]().fit(series.train[series.metrics].to_numpy())
    train_scores = det.score(series.train[series.metrics].to_numpy())
    assert det.threshold_ == pytest.approx(np.quantile(train_scores, det.threshold_quantile))


def test_detectors_save_and_load(data_dir, tmp_path):
    from detect.data import load_series

    series = load_series("asd", "omi-3", data_dir)
    train, test = (f[series.metrics].to_numpy() for f in (series.train, series.test))
    for name, cls in PEERS.items():
        det = cls().fit(train)
        det.save(tmp_path / name)
        again = cls.load(tmp_path / name)
        np.testing.assert_allclose(again.score(test[:500]), det.score(test[:500]), rtol=1e-9)
        assert again.threshold_ == det.threshold_
        np.testing.assert_allclose(again.explain(test[:5]), det.explain(test[:5]), rtol=1e-9)
    with pytest.raises(ValueError, match="trained on 19 metrics, got 3"):
        PEERS["pca"]().fit(train).score(test[:, :3])


def test_cli_writes_json_and_markdown(data_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert (
        main(["evaluate", "--data", str(data_dir), "--detectors", "pca", "--entities", "omi-2", "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert [r["entity"] for r in report["results"]] == ["omi-2"]
    assert "| asd/omi-2 | pca |" in out.with_suffix(".md").read_text()
    assert "mean (1)" in capsys.readouterr().out


def test_cli_rejects_unknown_detector_and_missing_data(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path), "--detectors", "pca"]) == 2
    assert "no <dataset>/<entity>/test.csv.gz found" in capsys.readouterr().err
    assert main(["evaluate", "--detectors", "magic"]) == 2
    assert "unknown detector(s) ['magic']" in capsys.readouterr().err
