"""Compression: ONNX Runtime matches the frameworks, INT8 shrinks, students learn, gates decide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detect.bundle import ModelBundle
from detect.data import load_series
from detect.ensemble import MEMBERS, EnsembleDetector
from detect.features import entity_windows
from detect.sequence import CLIP, AutoencoderDetector, LSTMDetector
from detect.thresholds import operational_threshold
from train import compress as C
from train import distill as D
from train import kinds as E


@pytest.fixture(scope="module")
def omi2(data_dir):
    return load_series("asd", "omi-2", data_dir)


@pytest.fixture(scope="module")
def sequence_models(omi2):
    X = omi2.train[omi2.metrics].to_numpy()[:5000]
    return {cls.name: cls(epochs=2).fit(X, omi2.metrics) for cls in (AutoencoderDetector, LSTMDetector)}


@pytest.fixture(scope="module")
def ensemble(data_dir):
    s = load_series("asd", "omi-1", data_dir)
    test = s.test[s.metrics].to_numpy()
    det = EnsembleDetector(rf_trees=40, xgb_rounds=40, lgbm_rounds=40, evidence_epochs=2)
    det.fit(test[:2160], s.labels[:2160], s.metrics, normal=s.train[s.metrics].to_numpy()[:5000])
    return det, test


def test_sequence_onnx_matches_torch_on_1000_rows(sequence_models, omi2):
    windows = entity_windows(omi2.test[omi2.metrics].to_numpy()[:1000], sequence_models["lstm"].spec_)
    assert len(windows) == 1000
    for name, det in sequence_models.items():
        windows = entity_windows(omi2.test[omi2.metrics].to_numpy()[:1000], det.spec_)
        runtime = E.runtime_for(det, E.export_graphs(det))
        errors, network_out = runtime.session.run(None, {"windows": windows})
        z = torch.clamp(
            (torch.from_numpy(windows) - torch.tensor(det.scaler_.mean, dtype=torch.float32))
            / torch.tensor(det.scaler_.std, dtype=torch.float32),
            -CLIP,
            CLIP,
        )
        with torch.no_grad():
            if name == "autoencoder":
                expected = det.network_(z)[:, -1].numpy()  # reconstruction of the newest row
            else:
                shifted = torch.cat([z[:, 1:], z[:, -1:]], dim=1)
                expected = (
                    det.network_(shifted) * torch.tensor(det.scaler_.std, dtype=torch.float32)
                    + torch.tensor(det.scaler_.mean, dtype=torch.float32)
                ).numpy()
        assert np.abs(network_out - expected).max() <= 1e-4, name
        # the normalised errors reach the thousands: compare them relative to their scale
        framework = det._normalised_error(omi2.test[omi2.metrics].to_numpy()[:1000])
        assert np.abs(errors - framework).max() <= 1e-4 * max(1.0, np.abs(framework).max()), name
        np.testing.assert_allclose(
            runtime.score_series(omi2.test[omi2.metrics].to_numpy()[:1000]),
            det.score(omi2.test[omi2.metrics].to_numpy()[:1000]),
            rtol=1e-4,
        )


def test_lstm_onnx_forecast_matches_detector(sequence_models, omi2):
    det = sequence_models["lstm"]
    X = omi2.test[omi2.metrics].to_numpy()[:300]
    runtime = E.runtime_for(det, E.export_graphs(det))
    window = entity_windows(X, det.spec_)[-1:]
    np.testing.assert_allclose(runtime.forecast_next(window)[0], det.forecast(X, 1)[0], atol=1e-4)


def test_ensemble_onnx_matches_framework_on_1000_rows(ensemble):
    det, test = ensemble
    features = det.features(test[:1000])
    runtime = E.runtime_for(det, E.export_graphs(det))
    members = runtime.member_probabilities(features)
    expected = det.member_matrix(features)
    for i, name in enumerate(MEMBERS):
        assert np.abs(members[name] - expected[:, i]).max() <= 1e-4, name
    assert np.abs(runtime.probability(features) - expected @ det.weights_).max() <= 1e-4


def test_stacked_ensemble_runtime_scores_as_the_detector_and_tails_as_the_series(ensemble):
    det, test = ensemble
    graphs = E.export_graphs(det)
    assert {"evidence.autoencoder", "evidence.lstm"} <= set(graphs)  # its evidence detectors' graphs travel with it
    runtime = E.runtime_for(det, graphs)
    assert set(runtime.sessions) == set(MEMBERS) and len(runtime.evidence) == 2
    series = runtime.score_series(test[:1000])
    # ONNX float32 evidence against torch: a tree's split may fall either side of a hair's difference
    gap = np.abs(series - det.score(test[:1000]))
    assert np.median(gap) <= 1e-4 and gap.max() <= 0.05
    # a served request's rows (the model's context, then new ones) score as the same rows of the series,
    # at the series' start too
    ctx = det.context_rows()
    tails, probability, contributions = runtime.score_tails([(test[600 - ctx - 4 : 600], 4), (test[:10], 10)])
    np.testing.assert_allclose(tails, np.concatenate([series[596:600], series[:10]]), atol=1e-5)
    assert probability is tails and contributions.shape == (14, test.shape[1])


def test_a_compressed_ensemble_takes_its_threshold_by_its_teachers_rule(ensemble, data_dir):
    """A variant's decision threshold comes from its own validation scores by `decision_threshold`, the rule
    the FP32 ensemble learnt its own by (`fit_vote`), not by the best validation F1 alone: on asd/omi-1, a
    third of whose validation rows are incidents, best F1 would flag nearly every row."""
    from detect.metrics import best_f1
    from detect.thresholds import decision_threshold

    det, _ = ensemble
    series = load_series("asd", "omi-1", data_dir)
    kind = E.kind_of(det)
    runtime = E.runtime_for(det, E.export_graphs(det))
    threshold, normal_scores = kind.calibrate_threshold(det, runtime, series)
    X, y = kind.training_data(series)
    _, target, _, val = det.prepare(X, y, series.metrics)
    scores = runtime.score_series(X)[val]
    chosen = decision_threshold(target[val], scores)
    assert threshold == chosen.threshold and threshold != best_f1(target[val], scores)[1]
    np.testing.assert_array_equal(normal_scores, scores[target[val] == 0])


def test_int8_is_smaller_and_keeps_quality(sequence_models, omi2):
    for name, det in sequence_models.items():
        fp32 = E.export_graphs(det)
        int8 = {k: C.quantize_int8(v) for k, v in fp32.items()}
        assert len(fp32["scorer"]) / len(int8["scorer"]) >= 3.0, name  # default sizes, 19 metrics
        q32, q8 = C.quality(det, fp32, omi2), C.quality(det, int8, omi2)
        ok, retention, reason = C.gate("int8", q32, q8)
        assert retention["pr_auc"] > 0.9, (name, reason)


def test_gate_decisions():
    assert C.gate("int8", {"f1": 0.5, "pr_auc": 0.4}, {"f1": 0.49, "pr_auc": 0.39})[0]
    ok, retention, reason = C.gate("int8", {"f1": 0.5, "pr_auc": 0.4}, {"f1": 0.45, "pr_auc": 0.4})
    assert not ok and retention["f1"] == pytest.approx(0.9) and "below the 95% gate" in reason
    assert C.gate("student", {"f1": 0.5, "pr_auc": 0.4}, {"f1": 0.46, "pr_auc": 0.37})[0]


def test_tempered_probability_graph():
    from onnx import TensorProto, helper

    from detect.runtime import session

    # a stand-in classifier graph whose probabilities output is its input
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["probabilities"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)])  # as converters may declare
    tempered = D.tempered_probability_graph(model.SerializeToString(), 3.0)
    p_t = np.array([0.5, 0.6, 0.9], dtype=np.float32)
    out = session(tempered).run(None, {"x": np.column_stack([1 - p_t, p_t])})[0]
    expected = 1 / (1 + np.exp(-3.0 * np.log(p_t / (1 - p_t))))
    np.testing.assert_allclose(out.ravel(), expected, rtol=1e-5)


@pytest.mark.slow
def test_compress_registers_passing_variants_and_logs_failures(
    omi2, sequence_models, data_dir, ray_cluster, mlflow_store, monkeypatch
):
    import mlflow

    from train import registry

    det = sequence_models["autoencoder"]
    bundle = ModelBundle(
        "autoencoder",
        {omi2.name: det},
        {omi2.name: omi2.metrics},
        graphs={omi2.name: E.export_graphs(det)},
        info={"variant": "fp32"},
    )
    registry.setup()
    with mlflow.start_run() as run:
        registry.register_bundle(bundle, run.info.run_id)
    registry.promote("autoencoder", "1")
    monkeypatch.setitem(C.GATES, "student", 5.0)  # an impossible gate: the student must be refused
    result = C.compress_model(
        "autoencoder", data_dir=data_dir, variants=("int8", "student"), student=D.StudentConfig(epochs=3)
    )
    assert result["decisions"]["int8"]["passed"] and result["decisions"]["int8"]["version"] == "2"
    assert not result["decisions"]["student"]["passed"] and result["decisions"]["student"]["version"] is None
    versions = registry.versions("autoencoder")
    assert [v["tags"].get("variant") for v in versions] == ["fp32", "int8"]
    int8_bundle, _ = registry.load_bundle("autoencoder", "2")
    assert int8_bundle.variant == "int8" and len(int8_bundle.graphs[omi2.name]["scorer"]) < len(
        bundle.graphs[omi2.name]["scorer"]
    )
    # each version carries the threshold it is served with (DSPOT's state), fitted on its own calibration scores
    fp32_bundle, _ = registry.load_bundle("autoencoder", "1")
    assert fp32_bundle.detectors[omi2.name].served_spot() == operational_threshold(det.calibration_scores_).state()
    _, int8_scores = C.calibrate(det, result["graphs"]["int8"][omi2.name], omi2)
    assert int8_bundle.detectors[omi2.name].served_spot() == operational_threshold(int8_scores).state()
    runs = mlflow.search_runs(experiment_names=["raywatch"], filter_string="tags.`raywatch.kind` = 'compress'")
    assert "below the 500% gate" in runs["tags.gate.student"].iloc[0]
    student_pr = result["summary"]["student"]["pr_auc"]
    assert student_pr > 5 * omi2.labels.mean()  # the student learned something, though the gate refused it
