"""Knowledge distillation: small students trained on Ray Train on a teacher's soft outputs at temperature T.

Each kind's plug-in (`train/kinds.py`) picks its student; compression (`train/compress.py`) gates them.

- Autoencoder / LSTM: an MLP over the newest rows of the window (TorchTrainer) that mimics the
  teacher's estimate of the newest row (MSE) and its per-metric error shares softened at T (KL); a
  first design that regressed the error itself kept only 84% of PR-AUC, as it never sees the large
  errors of anomalies.
- Ensemble: a small LightGBM (LightGBMTrainer) fitted with cross-entropy to the teacher's probability
  softened at T, sigmoid(logit(p) / T), its graph ending in sigmoid(T logit(.)) so it emits an
  unsoftened probability again. An MLP student was tried first and tracked the teacher on its transfer
  set (r = 0.96) but not on the shifted second halves (PR-AUC 0.22 vs 0.71 on machine-1-6).

Students emit the same graph outputs as their teachers, so serving swaps them without code changes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detect.ensemble import EnsembleDetector
from detect.features import entity_windows
from detect.sequence import CLIP, SequenceDetector
from train.boosters import train_lgbm_with_ray
from train.export import SequenceScoringGraph, compact_graph, torch_to_onnx
from train.jobs import init_ray


class SequenceStudent(nn.Module):
    """A small MLP over the newest `rows` rows of the window that mimics the teacher's own output:
    the autoencoder's reconstruction of the newest row (it sees that row), or the LSTM's forecast
    of it (it sees only the rows before). Its anomaly score is its own error against the newest row,
    so, unlike a student that regresses error magnitudes, it still produces large errors on
    anomalies it never saw. Reading few rows is what makes it cheap: normalising the whole window
    costs more than the teacher's matrix products."""

    def __init__(
        self, sees_newest_row: bool, rows: int, n_metrics: int, hidden: int, mean: np.ndarray, std: np.ndarray
    ) -> None:
        super().__init__()
        self.forecasting, self.rows = not sees_newest_row, rows
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(n_metrics))  # set from validation windows after training
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(rows * n_metrics, hidden), nn.ReLU(), nn.Linear(hidden, n_metrics)
        )

    def predict(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's estimate of the newest row, the newest row), both z-scored."""
        # slice before normalising: z-scoring the whole window would cost more than the MLP itself
        w = windows.shape[1]
        first = w - 1 - self.rows if self.forecasting else w - self.rows
        z = torch.clamp((windows[:, first:] - self.mean) / self.std, -CLIP, CLIP)
        seen = z[:, : self.rows]
        return self.net(seen), z[:, -1]

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        estimate, newest = self.predict(windows)
        return (estimate - newest) ** 2 / self.scale


def distillation_loss(
    student: SequenceStudent,
    windows: torch.Tensor,
    teacher_out: torch.Tensor,
    teacher_err: torch.Tensor,
    temperature: float,
    share_weight: float = 0.1,
) -> torch.Tensor:
    """Match the teacher's output (MSE), plus its per-metric error shares softened at temperature T
    (KL, scaled by T^2 as in Hinton et al.)."""
    t = temperature
    estimate, newest = student.predict(windows)
    own_err = (estimate - newest) ** 2
    shares = nn.functional.kl_div(
        torch.log_softmax(torch.log(own_err + 1e-6) / t, dim=1),
        torch.softmax(torch.log(teacher_err + 1e-6) / t, dim=1),
        reduction="batchmean",
    )
    return ((estimate - teacher_out) ** 2).mean() + share_weight * shares * t * t


@dataclass
class StudentConfig:
    hidden: int = 16
    rows: int = 8  # sequence students read the newest rows of the window only
    temperature: float = 3.0
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 256
    seed: int = 0
    trees: int = 80  # ensemble student
    leaves: int = 15


def _build_student(spec: dict[str, Any]) -> SequenceStudent:
    return SequenceStudent(
        spec["sees_newest_row"],
        spec["rows"],
        spec["n_metrics"],
        spec["hidden"],
        np.asarray(spec["mean"]),
        np.asarray(spec["std"]),
    )


def _student_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for a sequence student; rank 0 checkpoints the final weights."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    windows, teacher_out, teacher_err = (torch.from_numpy(a[rank::world]) for a in ray.get(config["data_ref"]))
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(_build_student(config["student"]))
    inner = model.module if hasattr(model, "module") else model
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    gen = torch.Generator().manual_seed(config["seed"])
    for epoch in range(config["epochs"]):
        perm = torch.randperm(len(windows), generator=gen)
        total = 0.0
        for i in range(0, len(perm), config["batch_size"]):
            idx = perm[i : i + config["batch_size"]]
            loss = distillation_loss(inner, windows[idx], teacher_out[idx], teacher_err[idx], config["temperature"])
            if model is not inner:  # DDP: route through forward so gradients are all-reduced
                loss = loss + 0.0 * model(windows[idx][:1]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        metrics = {"epoch": epoch, "distill_loss": total / len(windows)}
        if epoch == config["epochs"] - 1 and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(inner.state_dict(), os.path.join(folder, "student.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)


def train_student_with_ray(
    student_spec: dict[str, Any],
    data: tuple[np.ndarray, ...],
    cfg: StudentConfig,
    num_workers: int = 1,
    storage_path: str | Path | None = None,
    run_name: str | None = None,
) -> SequenceStudent:
    """Train a sequence student on TorchTrainer; data = (windows, teacher estimate, teacher error)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray()
    spec = {**student_spec, "hidden": cfg.hidden}
    data_ref = ray.put(tuple(np.ascontiguousarray(a, dtype=np.float32) for a in data))
    storage = str(Path(storage_path or Path.cwd() / "runs" / "ray_train").resolve())
    result = TorchTrainer(
        _student_loop,
        train_loop_config={
            "data_ref": data_ref,
            "student": spec,
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
        },
        scaling_config=ScalingConfig(num_workers=num_workers),
        run_config=RunConfig(name=run_name, storage_path=storage),
    ).fit()
    student = _build_student(spec)
    with result.checkpoint.as_directory() as folder:
        student.load_state_dict(torch.load(os.path.join(folder, "student.pt"), weights_only=True))
    return student.eval()


def tempered_probability_graph(graph: bytes, temperature: float) -> bytes:
    """Undo the temperature on a binary classifier graph: probability = sigmoid(T * logit(p_T)),
    where p_T is the positive-class column of the graph's last output."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(graph)
    probs = model.graph.output[-1].name
    # the appended nodes need opset >= 13 in the default domain (converters may declare less)
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if default:
        default[0].version = max(default[0].version, 13)
    else:
        model.opset_import.append(helper.make_opsetid("", 13))
    consts = {"t_temp": float(temperature), "t_eps": 1e-6, "t_one": 1.0}
    for name, value in consts.items():
        model.graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    for name, value in {"t_start": 1, "t_end": 2, "t_axis": 1}.items():
        model.graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    model.graph.node.extend(
        [
            helper.make_node("Slice", [probs, "t_start", "t_end", "t_axis"], ["t_pos"]),
            helper.make_node("Sub", ["t_one", "t_pos"], ["t_neg"]),
            helper.make_node("Max", ["t_pos", "t_eps"], ["t_pos_c"]),
            helper.make_node("Max", ["t_neg", "t_eps"], ["t_neg_c"]),
            helper.make_node("Div", ["t_pos_c", "t_neg_c"], ["t_odds"]),
            helper.make_node("Log", ["t_odds"], ["t_logit"]),
            helper.make_node("Mul", ["t_logit", "t_temp"], ["t_scaled"]),
            helper.make_node("Sigmoid", ["t_scaled"], ["probability"]),
        ]
    )
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1]))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def distill_ensemble(det: EnsembleDetector, transfer: list[np.ndarray], cfg: StudentConfig, **ray_kwargs: Any) -> bytes:
    """LightGBM student on the teacher's probabilities softened at temperature T (cross-entropy)."""
    import lightgbm as lgb
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    features = np.concatenate([det.features(np.asarray(X, dtype=np.float64)) for X in transfer]).astype(np.float32)
    teacher = np.clip(det.member_matrix(features) @ det.weights_, 1e-5, 1 - 1e-5)
    soft = 1 / (1 + np.exp(-np.log(teacher / (1 - teacher)) / cfg.temperature))  # sigmoid(logit(p) / T)
    params = {
        "objective": "cross_entropy",
        "num_leaves": cfg.leaves,
        "learning_rate": 0.1,
        "verbose": -1,
        "seed": cfg.seed,
    }
    booster = train_lgbm_with_ray(features, soft, params, cfg.trees, **ray_kwargs)
    # onnxmltools converts `binary` but not `cross_entropy`; both output sigmoid(raw score), so relabel
    text = booster.model_to_string().replace("objective=cross_entropy", "objective=binary sigmoid:1")
    text = text.replace("[objective: cross_entropy]", "[objective: binary]")
    graph = convert_lightgbm(
        lgb.Booster(model_str=text),
        initial_types=[("features", FloatTensorType([None, features.shape[1]]))],
        target_opset=15,
        zipmap=False,
    ).SerializeToString()
    return compact_graph(tempered_probability_graph(graph, cfg.temperature))


def distill_sequence(det: SequenceDetector, transfer: list[np.ndarray], cfg: StudentConfig, **ray_kwargs: Any) -> bytes:
    """Train a student of a sequence detector on its transfer set (telemetry series, no labels needed);
    its ONNX graph."""
    X = np.asarray(transfer[0], dtype=np.float64)
    windows = entity_windows(X, det.spec_)
    teacher_out, teacher_err = teacher_outputs(det, windows)
    sees_newest_row = det.network_class.sees_newest_row
    rows = min(cfg.rows, det.config.window - (0 if sees_newest_row else 1))  # a forecaster's student sees no newest row
    spec = {
        "sees_newest_row": sees_newest_row,
        "rows": rows,
        "n_metrics": det.n_metrics_,
        "mean": det.scaler_.mean.tolist(),
        "std": det.scaler_.std.tolist(),
    }
    n_val = int(len(windows) * det.config.val_fraction)  # the teacher's validation tail calibrates the scale
    fit = slice(0, len(windows) - n_val)
    student = train_student_with_ray(spec, (windows[fit], teacher_out[fit], teacher_err[fit]), cfg, **ray_kwargs)
    with torch.no_grad():
        val = torch.from_numpy(windows[len(windows) - n_val :])
        student.scale.copy_(torch.clamp(student(val).mean(dim=0), min=1e-2))
    return torch_to_onnx(student, torch.zeros(2, det.config.window, det.n_metrics_), "windows", ["errors"])


@torch.no_grad()
def teacher_outputs(det: SequenceDetector, windows: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's estimate of each window's newest row (z-scored) and its normalised per-metric error."""
    graph = SequenceScoringGraph(det).eval()
    outs, errs = [], []
    for i in range(0, len(windows), batch):
        z = torch.clamp((torch.from_numpy(windows[i : i + batch]) - graph.mean) / graph.std, -CLIP, CLIP)
        estimate = graph.network.newest_row_estimate(z)
        outs.append(estimate.numpy())
        errs.append(((estimate - z[:, -1]) ** 2 / graph.scale).numpy())
    return np.concatenate(outs), np.concatenate(errs)
