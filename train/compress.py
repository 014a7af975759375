"""Compression: ONNX export, INT8 quantization and knowledge distillation, each gated on accuracy.

- ONNX export: the autoencoder / LSTM as one scoring graph (z-scoring, network, normalised
  per-metric error; the LSTM also its next-row forecast) with a dynamic batch axis; the ensemble's
  members through skl2onnx / onnxmltools (forest, XGBoost, LightGBM) and torch (logistic), combined by
  the weighted vote in detect/runtime.py.
- INT8: ONNX Runtime dynamic quantization (MatMul / LSTM weights to int8).
- Distillation: small students trained on Ray Train on the teacher's soft outputs at temperature T.
  Autoencoder / LSTM: an MLP over the newest rows of the window (TorchTrainer) that mimics the
  teacher's estimate of the newest row (MSE) and its per-metric error shares softened at T (KL); a
  first design that regressed the error itself kept only 84% of PR-AUC, as it never sees the large
  errors of anomalies. Ensemble: a small LightGBM (LightGBMTrainer) fitted with cross-entropy to the teacher's probability
  softened at T, sigmoid(logit(p) / T), its graph ending in sigmoid(T logit(.)) so it emits an
  unsoftened probability again; its transfer set is
  the unlabelled train series plus the labelled training half (distillation needs no labels). An MLP
  student was tried first and tracked the teacher on its transfer set (r = 0.96) but not on the
  shifted second halves (PR-AUC 0.22 vs 0.71 on machine-1-6). Students emit the same graph outputs
  as their teachers, so serving swaps them without code changes.
- Gates: INT8 / FP16 must keep >= 95% of the FP32 model's F1 and PR-AUC, a student >= 90% of its
  teacher's; a variant that passes is registered as its own model version (tag `variant`), one that
  fails is not, and the reason is logged to MLflow.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn

from detect import metrics as M
from detect.bundle import ModelBundle
from detect.data import Series, load_benchmark
from detect.ensemble import EnsembleDetector
from detect.features import entity_features, entity_windows
from detect.kinds import DETECTOR_KINDS
from detect.metrics import operational_threshold
from detect.runtime import smooth_causal
from detect.sequence import CLIP, SequenceDetector
from train import registry
from train.boosters import train_lgbm_with_ray
from train.export import SequenceScoringGraph, compact_graph, torch_to_onnx
from train.jobs import init_ray
from train.kinds import export_graphs, runtime_for

log = logging.getLogger(__name__)

GATES = {"int8": 0.95, "fp16": 0.95, "student": 0.90}


# -- INT8 -----------------------------------------------------------------------------------------------
def quantize_int8(graph: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder, "fp32.onnx"), Path(folder, "int8.onnx")
        src.write_bytes(graph)
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # quantizer warns via root
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return compact_graph(dst.read_bytes())


# -- distillation ---------------------------------------------------------------------------------------
class SequenceStudent(nn.Module):
    """A small MLP over the newest `rows` rows of the window that mimics the teacher's own output:
    the autoencoder's reconstruction of the newest row (it sees that row), or the LSTM's forecast
    of it (it sees only the rows before). Its anomaly score is its own error against the newest row,
    so, unlike a student that regresses error magnitudes, it still produces large errors on
    anomalies it never saw. Reading few rows is what makes it cheap: normalising the whole window
    costs more than the teacher's matrix products."""

    def __init__(self, kind: str, rows: int, n_metrics: int, hidden: int, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.forecasting, self.rows = kind == "lstm", rows
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
        spec["kind"], spec["rows"], spec["n_metrics"], spec["hidden"], np.asarray(spec["mean"]), np.asarray(spec["std"])
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

    features = np.concatenate([entity_features(np.asarray(X, dtype=np.float64), det.spec_) for X in transfer]).astype(
        np.float32
    )
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


def distill(det: Any, transfer: list[np.ndarray], cfg: StudentConfig, **ray_kwargs: Any) -> bytes:
    """Train a student of `det` on its transfer set (telemetry series, no labels needed); its ONNX graph."""
    if isinstance(det, EnsembleDetector):
        return distill_ensemble(det, transfer, cfg, **ray_kwargs)
    X = np.asarray(transfer[0], dtype=np.float64)
    windows = entity_windows(X, det.spec_)
    teacher_out, teacher_err = teacher_outputs(det, windows)
    rows = min(cfg.rows, det.config.window - (1 if det.kind == "lstm" else 0))
    spec = {
        "kind": det.kind,
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
        estimate = graph.network(z)[:, -1] if det.kind == "autoencoder" else graph.network(z)
        outs.append(estimate.numpy())
        errs.append(((estimate - z[:, -1]) ** 2 / graph.scale).numpy())
    return np.concatenate(outs), np.concatenate(errs)


# -- thresholds and quality ----------------------------------------------------------------------------
def transfer_set(series: Series, kind: str) -> list[np.ndarray]:
    """What a student learns from: the teacher's training rows; for the ensemble also the unlabelled train series."""
    X, _ = training_data(series, kind)
    return [series.train[series.metrics].to_numpy(), X] if kind == "ensemble" else [X]


def training_data(series: Series, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """What a detector of this kind learns from: (rows, labels)."""
    if kind == "ensemble":
        test = series.test[series.metrics].to_numpy()
        half = len(test) // 2
        return test[:half], series.labels[:half]
    return series.train[series.metrics].to_numpy(), None


def calibrate(det: Any, graphs: dict[str, bytes], series: Series) -> float:
    """A variant's own operational threshold, from training data only (as its teacher's)."""
    X, y = training_data(series, det.name)
    runtime = runtime_for(det, graphs)
    if det.name == "ensemble":
        _, target, _, val_mask = det.prepare(X, y, series.metrics)
        scores = runtime.score_series(X)[val_mask]
        _, thr = M.best_f1(target[val_mask], scores)
        return thr if np.isfinite(thr) else 0.5
    n_val = int(len(X) * det.config.val_fraction)
    windows = entity_windows(X, det.spec_)[len(X) - n_val :]
    val_scores = smooth_causal(runtime.errors(windows).astype(np.float64), det.config.smooth).sum(axis=1)
    return operational_threshold(val_scores, det.threshold_quantile)


def quality(det: Any, graphs: dict[str, bytes], series: Series) -> dict[str, float | None]:
    """F1 / PR-AUC of a variant on the shipped data (the ensemble: the held-back second half)."""
    runtime = runtime_for(det, graphs)
    test = series.test[series.metrics].to_numpy()
    scores, y = runtime.score_series(test), series.labels
    if det.name == "ensemble":
        half = len(test) // 2
        scores, y = scores[half:], y[half:]
    if not y.any():
        return {"f1": None, "pr_auc": None}
    return {"f1": M.best_f1(y, scores)[0], "pr_auc": M.pr_auc(y, scores)}


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def gate(
    variant: str, base: dict[str, float | None], candidate: dict[str, float | None]
) -> tuple[bool, dict[str, float], str]:
    """Retention of F1 and PR-AUC against the base (FP32 or teacher) and the decision."""
    need = GATES[variant]
    retention = {k: (candidate[k] / base[k]) if base[k] else 1.0 for k in ("f1", "pr_auc")}
    ok = all(r >= need for r in retention.values())
    reason = (
        f"{variant} keeps {retention['f1']:.1%} of F1 and {retention['pr_auc']:.1%} of PR-AUC "
        f"({'>=' if ok else 'below'} the {need:.0%} gate)"
    )
    return ok, retention, reason


# -- the command ----------------------------------------------------------------------------------------
def compress_model(
    model: str,
    ref: str = "champion",
    data_dir: str | Path | None = None,
    variants: tuple[str, ...] = ("int8", "student"),
    student: StudentConfig | None = None,
    num_workers: int = 1,
    register: bool = True,
    progress: Callable[[str], None] = lambda m: log.info(m),
) -> dict[str, Any]:
    """Export, quantize and distill a registered version; register the variants that pass their gate."""
    student = student or StudentConfig()
    bundle, version = registry.load_bundle(model, ref)
    kind = bundle.kind
    if "int8" in variants and kind == "ensemble":
        variants = tuple(v for v in variants if v != "int8")  # trees have no int8 weights to quantize
        progress("ensemble: int8 skipped (tree models); distillation only")
    if "fp16" in variants and not torch.cuda.is_available():
        variants = tuple(v for v in variants if v != "fp16")
        progress("fp16 skipped: no GPU in this process")
    series = {s.name: s for s in load_benchmark(data_dir, list(bundle.detectors))}
    graphs: dict[str, dict[str, dict[str, bytes]]] = {"fp32": {}}
    thresholds: dict[str, dict[str, float]] = {}
    per_entity: dict[str, dict[str, dict[str, Any]]] = {}
    for i, (entity, det) in enumerate(bundle.detectors.items(), 1):
        s = series[entity]
        # compacted like every variant, so sizes compare fairly whichever code exported the FP32 graph
        fp32 = {name: compact_graph(g) for name, g in (bundle.graphs.get(entity) or export_graphs(det)).items()}
        graphs["fp32"][entity] = fp32
        per_entity[entity] = {"fp32": quality(det, fp32, s)}
        for variant in variants:
            if variant == "int8":
                g = {name: quantize_int8(b) for name, b in fp32.items()}
            else:
                graph = distill(det, transfer_set(s, kind), student, num_workers=num_workers)
                g = {"student": graph} if kind == "ensemble" else {"scorer": graph}
            graphs.setdefault(variant, {})[entity] = g
            thresholds.setdefault(variant, {})[entity] = calibrate(det, g, s)
            per_entity[entity][variant] = quality(det, g, s)
        progress(
            f"[{i}/{len(bundle.detectors)}] {entity}: "
            + "; ".join(
                f"{v} f1={q['f1'] if q['f1'] is None else round(q['f1'], 3)} pr_auc={q['pr_auc'] if q['pr_auc'] is None else round(q['pr_auc'], 3)}"
                for v, q in per_entity[entity].items()
            )
        )
    summary = {
        v: {
            "f1": _mean(list(e[v] for e in per_entity.values()), "f1"),
            "pr_auc": _mean(list(e[v] for e in per_entity.values()), "pr_auc"),
            "size_bytes": int(sum(len(b) for g in graphs[v].values() for b in g.values())),
        }
        for v in graphs
    }
    registry.setup()
    decisions = {}
    with mlflow.start_run(run_name=f"compress-{kind}-v{version}") as run:
        mlflow.set_tags({"raywatch.model": kind, "raywatch.kind": "compress", "source_version": version})
        mlflow.log_params(
            {
                "temperature": student.temperature,
                "student_hidden": student.hidden,
                "student_rows": student.rows,
                "student_trees": student.trees,
                "variants": ",".join(variants),
            }
        )
        mlflow.log_dict(per_entity, "variant_quality.json")
        for variant, figures in summary.items():
            mlflow.log_metrics({f"{variant}/{k}": v for k, v in figures.items() if v is not None})
        for variant in variants:
            ok, retention, reason = gate(variant, summary["fp32"], summary[variant])
            summary[variant]["retention"] = retention
            mlflow.log_metrics({f"{variant}/retention_{k}": v for k, v in retention.items()})
            mlflow.set_tag(f"gate.{variant}", reason)
            decision = {"passed": ok, "reason": reason, "version": None}
            if ok and register:
                variant_bundle = _variant_bundle(bundle, graphs[variant], thresholds[variant], variant, version)
                decision["version"] = registry.register_bundle(
                    variant_bundle, run.info.run_id, tags={"variant": variant, "source_version": version}
                )
            progress(
                f"{variant}: {reason}"
                + (
                    f" -> registered version {decision['version']}"
                    if decision["version"]
                    else ""
                    if ok
                    else " -> not registered"
                )
            )
            decisions[variant] = decision
    return {
        "model": kind,
        "source_version": version,
        "summary": summary,
        "decisions": decisions,
        "per_entity": per_entity,
        "graphs": graphs,
    }


def _variant_bundle(
    bundle: ModelBundle,
    graphs: dict[str, dict[str, bytes]],
    thresholds: dict[str, float],
    variant: str,
    source_version: str,
) -> ModelBundle:
    detectors = {}
    for entity, det in bundle.detectors.items():
        clone = copy.copy(det)
        clone.threshold_ = thresholds[entity]
        detectors[entity] = clone
    return ModelBundle(
        bundle.kind,
        detectors,
        bundle.metrics,
        bundle.references,
        bundle.evaluation,
        info={**bundle.info, "variant": variant, "source_version": source_version},
        graphs=graphs,
    )


def main(argv: list[str] | None = None, prog: str = "python -m train.compress") -> int:
    """`python -m train.compress --model M [...]`, runnable as a Ray job
    (`ray job submit --working-dir . -- python -m train.compress --model lstm`); `raywatch compress` runs it too."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=DETECTOR_KINDS)
    parser.add_argument("--version", default="champion", help="version number or alias to compress")
    parser.add_argument("--data", help="benchmark directory for the accuracy gates")
    parser.add_argument("--variants", default="int8,student", help="comma-separated: int8, fp16 (GPU only), student")
    parser.add_argument("--temperature", type=float, default=3.0, help="distillation temperature (2 to 4)")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers for the students")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = set(variants) - set(GATES)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {', '.join(GATES)}")
    if not 2 <= args.temperature <= 4:
        print(f"note: temperature {args.temperature} is outside the usual 2..4", file=sys.stderr)
    result = compress_model(
        args.model,
        args.version,
        args.data,
        variants,
        StudentConfig(temperature=args.temperature),
        num_workers=args.num_workers,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(f"{args.model} version {result['source_version']}:")
    for variant, figures in result["summary"].items():
        ret = figures.get("retention")
        print(
            f"  {variant:8s} size {figures['size_bytes']:>9,d} B  f1 {figures['f1']:.3f}  pr_auc {figures['pr_auc']:.3f}"
            + (f"  retention f1 {ret['f1']:.1%} pr_auc {ret['pr_auc']:.1%}" if ret else "")
        )
    for variant, decision in result["decisions"].items():
        outcome = f"registered as version {decision['version']}" if decision["version"] else "not registered"
        print(f"  {variant}: {decision['reason']} -> {outcome}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
