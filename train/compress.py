"""Compression: ONNX export, INT8 quantization and knowledge distillation, each gated on accuracy.

- ONNX export (`train/export.py`): the FP32 graphs every version carries.
- INT8: ONNX Runtime dynamic quantization (MatMul / LSTM weights to int8); FP16 (GPU only): ONNX
  Runtime's float16 converter, inputs and outputs kept FP32.
- Distillation (`train/distill.py`): small students trained on Ray Train on the teacher's soft outputs
  at temperature T; each kind's plug-in picks its student and its transfer set.
- Which variants apply is the kind's (`DetectorKind.compressions`: trees have no INT8 weights), and so
  is how a variant's threshold is calibrated and which test rows judge it.
- Gates: INT8 / FP16 must keep >= 95% of the FP32 model's F1 and PR-AUC, a student >= 90% of its
  teacher's; a variant that passes is registered as its own model version (tag `variant`), one that
  fails is not, and the reason is logged to MLflow.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from detect import metrics as M
from detect.bundle import ModelBundle
from detect.data import Series, load_benchmark
from detect.fleet import is_fleet_key
from detect.kinds import DETECTOR_KINDS
from train import registry
from train.distill import StudentConfig
from train.export import compact_graph
from train.kinds import DetectorKind, export_graphs, kind_named, kind_of, runtime_for

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


def to_fp16(graph: bytes) -> bytes:
    """FP16 weights and arithmetic, FP32 inputs and outputs (for GPUs: ONNX Runtime's CPU kernels lack most FP16 ops)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return compact_graph(convert_float_to_float16(onnx.load_from_string(graph), keep_io_types=True).SerializeToString())


def variant_graphs(
    variant: str,
    kind: DetectorKind,
    det: Any,
    fp32: dict[str, bytes],
    series: Series,
    student: StudentConfig,
    num_workers: int,
) -> dict[str, bytes]:
    """One compressed variant of a detector's FP32 graphs: quantized, halved, or a distilled student."""
    if variant == "student":
        return kind.distill(det, kind.transfer_set(series), student, num_workers=num_workers)
    convert = {"int8": quantize_int8, "fp16": to_fp16}[variant]
    return {name: convert(graph) for name, graph in fp32.items()}


# -- thresholds and quality ----------------------------------------------------------------------------
def calibrate(det: Any, graphs: dict[str, bytes], series: Series) -> tuple[float, np.ndarray]:
    """A variant's own operational threshold and its calibration scores, from training data only (as its
    teacher's)."""
    return kind_of(det).calibrate_threshold(det, runtime_for(det, graphs), series)


def quality(det: Any, graphs: dict[str, bytes], series: Series) -> dict[str, float | None]:
    """F1 / PR-AUC of a variant on the test rows its kind is judged on (the ensemble: the held-back second half)."""
    scores = runtime_for(det, graphs).score_series(series.test[series.metrics].to_numpy())
    scores, y = kind_of(det).judged_rows(series, scores)
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
    kind = kind_named(bundle.kind)
    skipped = [v for v in variants if v not in kind.compressions]
    if skipped:
        variants = tuple(v for v in variants if v in kind.compressions)
        progress(f"{kind.name}: {', '.join(skipped)} skipped (not applicable to this kind); {', '.join(variants)} only")
    if "fp16" in variants and not torch.cuda.is_available():
        variants = tuple(v for v in variants if v != "fp16")
        progress("fp16 skipped: no GPU in this process")
    # a fleet model (detect/fleet.py) has no series of its own to be judged on: its variants keep its FP32 graph
    own = {entity: det for entity, det in bundle.detectors.items() if not is_fleet_key(entity)}
    series = {s.name: s for s in load_benchmark(data_dir, list(own))}
    graphs: dict[str, dict[str, dict[str, bytes]]] = {"fp32": {}}
    thresholds: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    per_entity: dict[str, dict[str, dict[str, Any]]] = {}
    for i, (entity, det) in enumerate(own.items(), 1):
        s = series[entity]
        # compacted like every variant, so sizes compare fairly whichever code exported the FP32 graph
        fp32 = {name: compact_graph(g) for name, g in (bundle.graphs.get(entity) or export_graphs(det)).items()}
        graphs["fp32"][entity] = fp32
        per_entity[entity] = {"fp32": quality(det, fp32, s)}
        for variant in variants:
            g = variant_graphs(variant, kind, det, fp32, s, student, num_workers)
            graphs.setdefault(variant, {})[entity] = g
            thresholds.setdefault(variant, {})[entity] = calibrate(det, g, s)
            per_entity[entity][variant] = quality(det, g, s)
        progress(
            f"[{i}/{len(own)}] {entity}: "
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
    with mlflow.start_run(run_name=f"compress-{kind.name}-v{version}") as run:
        mlflow.set_tags({"raywatch.model": kind.name, "raywatch.kind": "compress", "source_version": version})
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
        "model": kind.name,
        "source_version": version,
        "summary": summary,
        "decisions": decisions,
        "per_entity": per_entity,
        "graphs": graphs,
    }


def _variant_bundle(
    bundle: ModelBundle,
    graphs: dict[str, dict[str, bytes]],
    thresholds: dict[str, tuple[float, np.ndarray]],
    variant: str,
    source_version: str,
) -> ModelBundle:
    detectors = {}
    for entity, det in bundle.detectors.items():
        clone = copy.copy(det)
        if entity in thresholds:  # its own threshold and served SPOT; a fleet model keeps its FP32 graph's
            clone.threshold_, clone.calibration_scores_ = thresholds[entity]
        detectors[entity] = clone
    graphs = {**{e: g for e, g in bundle.graphs.items() if e not in graphs}, **graphs}
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
