"""ONNX export: a fitted detector as the graphs serving runs.

Training registers these graphs with every version, compression quantizes and distils them, and serving
loads them; this module is the one place that turns a detector into graphs (each kind's plug-in in
`train/kinds.py` picks its builder).

- autoencoder / LSTM: one scoring graph (z-scoring, network, normalised per-metric error; the LSTM also
  its next-row forecast) with a dynamic batch axis;
- ensemble: its members through skl2onnx / onnxmltools (forest, XGBoost, LightGBM) and torch (logistic),
  combined by the weighted vote in detect/runtime.py.
"""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from detect.ensemble import EnsembleDetector
from detect.sequence import CLIP, SequenceDetector

OPSET = 17


# -- export ---------------------------------------------------------------------------------------------
class SequenceScoringGraph(nn.Module):
    """windows in telemetry units -> normalised per-metric error, and the network's own output:
    the autoencoder's reconstruction of the newest row (z-units), the LSTM's forecast of the row
    after the window (telemetry units)."""

    def __init__(self, det: SequenceDetector) -> None:
        super().__init__()
        self.network = copy.deepcopy(det.network_).eval()
        self.register_buffer("mean", torch.tensor(det.scaler_.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(det.scaler_.std, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(det.error_scale_, dtype=torch.float32))

    def forward(self, windows: torch.Tensor):
        z = torch.clamp((windows - self.mean) / self.std, -CLIP, CLIP)
        errors, second = self.network.graph_outputs(z, self.mean, self.std)
        return errors / self.scale, second


def compact_graph(graph: bytes) -> bytes:
    """Drop what ONNX Runtime does not need: node names, doc strings, inferred intermediate shapes,
    and long internal tensor names (graph inputs and outputs keep theirs).

    Applied to every exported graph, FP32 and INT8 alike, so their sizes compare fairly.
    """
    import onnx

    model = onnx.load_from_string(graph)
    g = model.graph
    del g.value_info[:]
    model.doc_string = g.doc_string = ""
    keep = {v.name for v in (*g.input, *g.output)}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return short.setdefault(name, f"t{len(short)}")

    for init in g.initializer:
        init.name = rename(init.name)
    for node in g.node:
        node.name = node.doc_string = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    return model.SerializeToString()


def torch_to_onnx(module: nn.Module, sample: torch.Tensor, input_name: str, output_names: list[str]) -> bytes:
    buffer = io.BytesIO()
    axes = {input_name: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (sample,),
            buffer,
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return compact_graph(buffer.getvalue())


def export_sequence(det: SequenceDetector) -> bytes:
    sample = torch.zeros(2, det.config.window, det.n_metrics_)
    return torch_to_onnx(SequenceScoringGraph(det), sample, "windows", ["errors", det.network_class.second_output])


class LogisticGraph(nn.Module):
    def __init__(self, det: EnsembleDetector) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(det.mean_, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(det.std_, dtype=torch.float32))
        self.register_buffer("w", torch.tensor(det.logistic_[:-1], dtype=torch.float32))
        self.register_buffer("b", torch.tensor(det.logistic_[-1], dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((features - self.mean) / self.std) @ self.w + self.b)


def export_ensemble(det: EnsembleDetector) -> dict[str, bytes]:
    from onnxmltools import convert_lightgbm, convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    n = det.n_features_
    types = [("features", FloatTensorType([None, n]))]
    graphs = {
        "rf": det.export_rf_onnx(),
        # onnxmltools converts boosters up to opset 15
        "xgb": convert_xgboost(det.xgb_, initial_types=types, target_opset=15).SerializeToString(),
        "lgbm": convert_lightgbm(det.lgbm_, initial_types=types, target_opset=15, zipmap=False).SerializeToString(),
        "logistic": torch_to_onnx(LogisticGraph(det), torch.zeros(2, n), "features", ["probability"]),
        **evidence_graphs(det),
    }
    return {name: compact_graph(g) for name, g in graphs.items()}


EVIDENCE_PREFIX = "evidence."  # a stacked ensemble's evidence detectors' graphs: `evidence.<kind>`


def evidence_graphs(det: EnsembleDetector) -> dict[str, bytes]:
    """The sequence graphs of a stacked ensemble's evidence detectors (none over window features)."""
    return {f"{EVIDENCE_PREFIX}{e.name}": export_sequence(e) for e in det.evidence_}
