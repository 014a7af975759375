"""The detectors learn, on a real local Ray: Ray Train for the sequence models and the boosters."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time
from functools import partial

import numpy as np
import pytest

from detect.data import load_series
from detect.ensemble import EnsembleDetector, incident_target
from detect.metrics import pr_auc
from detect.sequence import AutoencoderDetector, LSTMDetector
from detect.synthetic import generate_fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def omi2(data_dir):
    return load_series("asd", "omi-2", data_dir)


@pytest.mark.parametrize("cls", [AutoencoderDetector, LSTMDetector])
def test_sequence_detector_learns_on_ray_train(cls, omi2, ray_cluster, tmp_path):
    from train.torch_train import fit_with_ray_train

    det = fit_with_ray_train(
        cls(epochs=4, hidden=32),
        omi2.train[omi2.metrics].to_numpy()[:4000],
        omi2.metrics,
        num_workers=1,
        storage_path=tmp_path,
    )
    losses = [h["train_loss"] for h in det.history_]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8, losses
    assert det.used_gpu_ is False  # this cluster has no GPU: the same code ran on CPU
    scores = det.score(omi2.test[omi2.metrics].to_numpy())
    constant = omi2.labels.mean()  # a constant scorer's PR-AUC is the anomaly ratio
    assert pr_auc(omi2.labels, scores) > 5 * constant
    explained = det.explain(omi2.test[omi2.metrics].to_numpy()[:50])
    assert explained.shape == (50, len(omi2.metrics))
    # each metric's contribution is held at its recent peak: never below the row's own, equal on the first
    assert np.all(explained.sum(axis=1) >= scores[:50] - 1e-9) and np.isclose(explained[0].sum(), scores[0])


def test_a_retraining_fit_continues_from_the_champion_on_ray_train(omi2, ray_cluster, tmp_path):
    """The retraining job's warm start: Ray Train starts from the champion's weights, the recent rows give
    the means (a settled level is the new normal) and the champion keeps the spreads."""
    from train.torch_train import continue_with_ray_train

    champion = AutoencoderDetector(epochs=2, hidden=16).fit(omi2.train[omi2.metrics].to_numpy()[:3000])
    recent = omi2.test[omi2.metrics].to_numpy()[:1500].copy()
    recent[:, 0] += 2 * champion.scaler_.std[0]  # a level shift on one metric
    # a learning rate too small to move the weights: what the run ends with is what it started from
    warm = continue_with_ray_train(
        AutoencoderDetector(champion.config, epochs=1, lr=1e-9), champion, recent, storage_path=tmp_path
    )
    for name, value in champion.network_.state_dict().items():
        np.testing.assert_allclose(warm.network_.state_dict()[name].numpy(), value.numpy(), atol=1e-5)
    np.testing.assert_allclose(warm.scaler_.mean, recent.mean(axis=0))
    np.testing.assert_array_equal(warm.scaler_.std, champion.scaler_.std)
    assert warm.spec_ == champion.spec_ and np.isfinite(warm.threshold_)


def test_lstm_forecasts_h_steps_ahead(omi2):
    det = LSTMDetector(epochs=2, hidden=16).fit(omi2.train[omi2.metrics].to_numpy()[:3000])
    future = det.forecast(omi2.test[omi2.metrics].to_numpy()[:200], horizon=5)
    assert future.shape == (5, len(omi2.metrics)) and np.isfinite(future).all()
    with pytest.raises(ValueError, match="horizon"):
        det.forecast(omi2.test[omi2.metrics].to_numpy()[:200], horizon=0)


def test_ensemble_with_ray_boosters_learns_incidents_and_their_kind(ray_cluster, tmp_path):
    from train.boosters import train_boosters_with_ray

    fleet = generate_fleet(n_machines=1, n_steps=12000, incidents_per_machine=30, incident_length=(30, 60), seed=3)
    frame = fleet.frame
    X, y, kinds = frame[fleet.metrics].to_numpy(), frame.label.to_numpy(), frame.incident_kind.to_numpy()
    cut = 8000  # time-ordered split: learn from the first two thirds
    boost = partial(train_boosters_with_ray, num_workers=2, storage_path=tmp_path, run_name="test")
    det = EnsembleDetector(rf_trees=50, xgb_rounds=60, lgbm_rounds=60, horizon=5, evidence_epochs=2)
    det.fit(X[:cut], y[:cut], fleet.metrics, kinds=kinds[:cut], train_boosters=lambda F, t: boost(F, t, det.config))
    scores = det.score(X)[cut:]
    lead = incident_target(y, 5)[cut:]
    assert pr_auc(lead, scores) > max(0.6, 3 * lead.mean())  # a constant scorer's PR-AUC is lead.mean()
    assert set(det.member_scores(X[:10])) == {"rf", "xgb", "lgbm", "logistic"}
    assert np.isclose(det.weights_.sum(), 1) and (det.weights_ >= 0).all()
    inside = kinds[cut:] != ""
    predicted, _ = det.predict_kind(X)
    accuracy = np.mean(np.asarray(predicted)[cut:][inside] == kinds[cut:][inside])
    assert accuracy > 0.6  # six kinds: chance is about 0.17


def kill_a_worker_after_two_checkpoints(ray_cluster, run_folder: str) -> list[int]:
    """In a thread: once the run in `run_folder` has two checkpoints (and 2.5 s for the controller to register
    them), SIGKILL one of its Ray Train workers. Returns the list the killed pid is put in."""
    from ray.util.state import list_actors

    killed: list[int] = []

    def kill() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and len(glob.glob(f"{run_folder}/checkpoint_*")) < 2:
            time.sleep(0.2)
        time.sleep(2.5)  # let the controller register the checkpoints
        workers = list_actors(
            address=ray_cluster.get_runtime_context().gcs_address,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            detail=True,
        )
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.append(workers[-1].pid)

    threading.Thread(target=kill, daemon=True).start()
    return killed


def test_killed_ray_train_worker_resumes_from_checkpoint(data_dir, ray_cluster, tmp_path):
    from train.torch_train import fit_with_ray_train

    series = load_series("asd", "omi-1", data_dir)
    killed = kill_a_worker_after_two_checkpoints(ray_cluster, f"{tmp_path}/kill-test")
    det = fit_with_ray_train(
        # 16 epochs: the kill (after 2 checkpoints and a 2.5 s wait) must land while epochs remain to
        # resume into, even when another job slows the machine's start and speeds up nothing else
        AutoencoderDetector(epochs=16, hidden=256, batch_size=64),
        series.train[series.metrics].to_numpy(),
        series.metrics,
        num_workers=2,
        storage_path=tmp_path,
        run_name="kill-test",
        max_failures=2,
    )
    assert killed, "no worker was killed: training finished before the first checkpoints"
    epochs = [int(h["epoch"]) for h in det.history_]
    assert epochs == list(range(16))  # every epoch done exactly once in the final history
    resumed = max(h["resumed_from"] for h in det.history_)
    assert resumed >= 0, "the run never resumed from a checkpoint"
    assert det.history_[-1]["train_loss"] < det.history_[0]["train_loss"]


def test_many_small_models_fit_in_one_ray_train_run_and_resume_after_the_last_finished(data_dir, ray_cluster, tmp_path):
    """A graduation job's new entities (train/retrain.py): one `TorchTrainer` run fits them one after another,
    a checkpoint per finished model. A worker killed mid-run: the run restarts after the last finished model,
    and every model comes back, the ones before the kill from their kept checkpoints."""
    from train.torch_train import fit_many_with_ray_train

    series = load_series("asd", "omi-1", data_dir)
    rows = series.train[series.metrics].to_numpy()
    fits = []
    for i in range(20):  # twenty "machines", by seed; about 0.8 s each on 2 cores, so the kill lands mid-run
        det = AutoencoderDetector(epochs=4, hidden=256, batch_size=32, seed=i)
        fits.append((det, *det.prepare(rows, series.metrics)))
    killed = kill_a_worker_after_two_checkpoints(ray_cluster, f"{tmp_path}/many-test")
    fitted = fit_many_with_ray_train(fits, storage_path=tmp_path, run_name="many-test", max_failures=2)
    assert killed, "no worker was killed: the run finished before its first checkpoints"
    assert [det for det, _, _ in fits] == fitted and len({det.ray_result_path_ for det in fitted}) == 1  # one run
    resumed = [max(h["resumed_from"] for h in det.history_) for det in fitted]
    assert resumed[0] == -1 and resumed[-1] >= 0, resumed  # fitted before the kill, and after the restart
    for det in fitted:
        assert [int(h["epoch"]) for h in det.history_] == [0, 1, 2, 3]
        assert np.isfinite(det.threshold_) and det.score(rows[:200]).shape == (200,)
