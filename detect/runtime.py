"""ONNX Runtime scorers: what serving and the compression gates run. No torch, no pickles.

Graph contracts (built by train/compress.py):

- sequence graph `scorer`: input `windows` (N, W, M) float32 in telemetry units -> `errors` (N, M),
  each metric's squared error normalised by its validation mean error (the teacher's and the
  student's graphs share this contract). LSTM graphs add `forecast` (N, M): the row after each window.
- ensemble graphs `rf`, `xgb`, `lgbm`, `logistic`: input `features` (N, F) float32 -> incident
  probability per member; the soft vote is a weighted sum here. A distilled student is one graph
  `student`: features -> `probability` (N, 1). A stacked ensemble's features are its evidence detectors'
  (detect/evidence.py): each of their sequence graphs (`evidence.<kind>`) runs first, then the members.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from detect import evidence as E
from detect.features import FeatureSpec, entity_features, entity_windows, tail_features, tail_windows
from detect.fleet import EntityStats, WindowNormaliser

# rows from which the ensemble's member graphs run in parallel, unless a runtime is given its own
# (serving passes its `parallel_rows` setting)
PARALLEL_ROWS = 256
GROWN_AT_ONCE = 16  # fleet items from which the vectorised path pays
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _member_pool() -> ThreadPoolExecutor | None:
    """One small pool per process for the member graphs (None on a single core)."""
    global _POOL
    workers = min(4, os.cpu_count() or 1)
    if workers < 2:
        return None
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raywatch-onnx")
    return _POOL


def session(graph: bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])


def smooth_causal(values: np.ndarray, k: int) -> np.ndarray:
    """Causal mean over the last k rows along axis 0 (fewer at the start)."""
    if k <= 1:
        return values
    csum = np.cumsum(np.concatenate([np.zeros((1, *values.shape[1:])), values]), axis=0)
    idx = np.arange(len(values))
    lo = np.maximum(0, idx - k + 1)
    count = (idx + 1 - lo).reshape(-1, *([1] * (values.ndim - 1)))
    return (csum[idx + 1] - csum[lo]) / count


class SequenceRuntime:
    """Autoencoder / LSTM scoring through one ONNX graph. A fleet model's runtime (`normaliser` set,
    detect/fleet.py) puts each window in its entity's own units before the graph; its items may come from
    many entities, scored in one call."""

    def __init__(
        self,
        graph: bytes,
        spec: FeatureSpec,
        smooth: int,
        threshold: float,
        threads: int = 1,
        normaliser: WindowNormaliser | None = None,
    ) -> None:
        self.session = session(graph, threads)
        self.spec, self.smooth, self.threshold, self.normaliser = spec, smooth, threshold, normaliser
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _series_windows(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if self.normaliser is not None:
            return self.normaliser.series_windows(X, self.spec)
        return entity_windows(X, self.spec)

    def _tail_windows(self, rows: np.ndarray, k: int, place: tuple[EntityStats, int] | None) -> np.ndarray:
        if self.normaliser is not None:
            stats, offset = place if place is not None else (None, 0)
            return self.normaliser.tail_windows(rows, self.spec, k, stats, offset)
        return tail_windows(rows, self.spec, k, self.spec.window)

    def errors(self, windows: np.ndarray) -> np.ndarray:
        """(N, W, M) windows -> (N, M) normalised per-metric errors."""
        return self.session.run(["errors"], {"windows": np.ascontiguousarray(windows, dtype=np.float32)})[0]

    def graph_inputs(self, X: np.ndarray) -> np.ndarray:
        """What the graph reads for every row of a series: its windows."""
        return self._series_windows(X)

    def run_graphs(self, inputs: np.ndarray) -> np.ndarray:
        """The ONNX work alone, on `graph_inputs` (what benchmarks time against the served path)."""
        return self.errors(inputs)

    def forecast_next(self, windows: np.ndarray) -> np.ndarray:
        if "forecast" not in self.outputs:
            raise ValueError("this graph has no forecast output (only the LSTM forecasts)")
        return self.session.run(["forecast"], {"windows": np.ascontiguousarray(windows, dtype=np.float32)})[0]

    def score_tails(self, items: list[tuple]) -> tuple[np.ndarray, None, np.ndarray]:
        """(scores, no probability, per-metric contributions) of each item's last n rows, items being
        (rows, n) oldest first, stacked into one ONNX Runtime call; the same windows as the batch path.
        A fleet model's items may come from many entities and carry a third part: the entity's statistics
        and the row of its life the item's rows start at (`detect.fleet.EntityStats`, offset), or None
        when the rows start at the entity's first."""
        grown = self._grown(items)
        if len(grown) >= GROWN_AT_ONCE:  # many grown entities of a fleet model (a snapshot): vectorised
            taken = set(grown)
            rest = [i for i in range(len(items)) if i not in taken]
            fast = self._score_grown([items[i] for i in grown])
            slow = self.score_tails([items[i] for i in rest]) if rest else None
            contributions = np.empty((len(items), fast.shape[1]))
            contributions[grown] = fast
            if slow is not None:
                contributions[rest] = slow[2]
            return contributions.sum(axis=1), None, contributions
        smooth = self.smooth
        # each item needs the errors of its last n + smooth - 1 rows (fewer at a series' start)
        spans = [min(item[1] + smooth - 1, len(item[0])) for item in items]
        windows = np.concatenate(
            [self._tail_windows(item[0], k, item[2] if len(item) > 2 else None) for item, k in zip(items, spans)]
        )
        errors = self.errors(windows).astype(np.float64)
        parts, at = [], 0
        for k, (_, n, *_baseline) in zip(spans, items):
            parts.append(smooth_causal(errors[at : at + k], smooth)[-n:])
            at += k
        contributions = np.concatenate(parts)
        return contributions.sum(axis=1), None, contributions

    @property
    def grown_rows(self) -> int | None:
        """The rows of a grown item (`_grown`): the context and its new row; None for a model without
        per-entity statistics (not a fleet model)."""
        return None if self.normaliser is None else self.spec.window + self.smooth - 1

    def _grown(self, items: list[tuple]) -> list[int]:
        """Indices of the fleet items that `_score_grown` takes: one new row after exactly the context, and
        one set of statistics for all its windows (an entity past its checkpoints)."""
        rows = self.grown_rows
        if rows is None:
            return []
        return [
            i
            for i, item in enumerate(items)
            if item[1] == 1
            and len(item[0]) == rows
            and len(item) > 2
            and item[2] is not None
            and len(item[2][0].rows) == 1
        ]

    def _score_grown(self, items: list[tuple]) -> np.ndarray:
        """`score_tails`' per-metric contributions for `_grown` items (`score_grown` of them stacked)."""
        return self.score_grown(
            np.stack([item[0] for item in items]),
            np.stack([item[2][0].values[0, 0] for item in items]),
            np.stack([item[2][0].values[0, 1] for item in items]),
            np.array([item[2][0].rows[0] for item in items]),
        )

    def score_grown(self, rows: np.ndarray, centre: np.ndarray, spread: np.ndarray, counted: np.ndarray) -> np.ndarray:
        """Per-metric contributions of the new row of k grown entities given as columns: `rows` (k,
        `grown_rows`, M) each one's context and new row, `centre` and `spread` (k, M) its frozen statistics,
        measured on `counted` (k,) rows. The `smooth` windows ending at each new row, normalised, go in one
        ONNX call; their mean is the causal smoothing of the newest row."""
        window, smooth = self.spec.window, self.smooth
        stacked = np.asarray(rows, dtype=np.float64)  # (k, window + smooth - 1, M)
        windows = np.lib.stride_tricks.sliding_window_view(stacked, window, axis=1).transpose(0, 1, 3, 2)
        scale = self.normaliser.scale(spread, counted)
        z = ((windows - centre[:, None, None, :]) / scale[:, None, None, :]).astype(np.float32)
        errors = self.errors(z.reshape(-1, window, z.shape[-1])).astype(np.float64)
        return errors.reshape(len(stacked), smooth, -1).mean(axis=1)

    def explain_series(self, X: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Smoothed per-metric errors for every row of one entity's series (T, M)."""
        windows = self._series_windows(X)
        errs = np.concatenate([self.errors(windows[i : i + batch]) for i in range(0, len(windows), batch)])
        return smooth_causal(errs.astype(np.float64), self.smooth)

    def score_series(self, X: np.ndarray) -> np.ndarray:
        return self.explain_series(X).sum(axis=1)


class EnsembleRuntime:
    """The ensemble's four member graphs and the weighted soft vote (or one distilled student graph),
    over the window features or, stacked, over its evidence detectors' (`evidence`: their runtimes and
    scales, detect/evidence.py)."""

    def __init__(
        self,
        graphs: dict[str, bytes],
        spec: FeatureSpec,
        weights: dict[str, float] | None,
        threshold: float,
        threads: int = 1,
        parallel_rows: int | None = None,
        explain: tuple[np.ndarray, np.ndarray] | None = None,
        evidence: list[tuple[SequenceRuntime, float]] | None = None,
    ) -> None:
        """`explain`: (feature means, |importance| / std), for per-metric contributions of served rows over
        window features (the stacked ensemble's come from its evidence)."""
        self.spec, self.threshold, self.parallel_rows, self.explain = spec, threshold, parallel_rows, explain
        self.evidence = evidence or []
        self.scales = [scale for _, scale in self.evidence]
        self.sessions = {name: session(g, threads) for name, g in graphs.items()}
        self.weights = weights or {}
        if "student" not in self.sessions and set(self.weights) != set(self.sessions):
            raise ValueError(f"vote weights {sorted(self.weights)} do not match graphs {sorted(self.sessions)}")

    def member_probabilities(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Each member graph's incident probability. From PARALLEL_ROWS rows on, the members run side by
        side on a small thread pool (ONNX Runtime releases the GIL while a graph runs): a 1,000-row batch
        takes about half the wall time on 2 cores; single rows stay on the calling thread."""
        F = np.ascontiguousarray(features, dtype=np.float32)

        def run(item: tuple[str, Any]) -> np.ndarray:
            name, sess = item
            result = sess.run(None, {sess.get_inputs()[0].name: F})
            probs = np.asarray(result[-1] if name in ("rf", "xgb", "lgbm") else result[0])
            return probs[:, 1] if probs.ndim == 2 and probs.shape[1] == 2 else probs.reshape(-1)

        items = list(self.sessions.items())
        big = PARALLEL_ROWS if self.parallel_rows is None else self.parallel_rows
        pool = _member_pool() if len(F) >= big and len(items) > 1 else None
        probs = list(pool.map(run, items)) if pool else [run(item) for item in items]
        return dict(zip(self.sessions, probs))

    def probability(self, features: np.ndarray) -> np.ndarray:
        members = self.member_probabilities(features)
        if "student" in members:
            return members["student"].astype(np.float64)
        return sum(self.weights[name] * members[name].astype(np.float64) for name in self.weights)

    def graph_inputs(self, X: np.ndarray) -> np.ndarray:
        """What the graphs read for every row of a series: its evidence, or its engineered features."""
        if self.evidence:
            return E.evidence_features([rt.explain_series(X) for rt, _ in self.evidence], self.scales)
        return entity_features(np.asarray(X, dtype=np.float64), self.spec).astype(np.float32)

    def run_graphs(self, inputs: np.ndarray) -> np.ndarray:
        """The ONNX work alone, on `graph_inputs`."""
        return self.probability(inputs)

    def score_series(self, X: np.ndarray) -> np.ndarray:
        return self.probability(self.graph_inputs(X))

    def score_tails(self, items: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, incident probability (the same), per-metric contributions) of each item's last n rows."""
        if self.evidence:
            return self._score_evidence_tails(items)
        features = np.concatenate([tail_features(rows, self.spec, n) for rows, n in items])
        probability = self.probability(features)
        return probability, probability, self.contributions(features)

    def _score_evidence_tails(self, items: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stacked: each evidence graph scores every item's last n + CONTEXT rows (fewer at a series' start)
        in one call, then the evidence features of each item's last n rows go to the members."""
        spans = [min(n + E.CONTEXT, len(rows)) for rows, n in items]
        errors = [rt.score_tails([(rows, k) for (rows, _), k in zip(items, spans)])[2] for rt, _ in self.evidence]
        features, contributions, at = [], [], 0
        for (_, n), k in zip(items, spans):
            own = [err[at : at + k] for err in errors]
            features.append(E.evidence_features(own, self.scales)[-n:])
            contributions.append(E.contributions(own, self.scales)[-n:])
            at += k
        probability = self.probability(np.concatenate(features))
        return probability, probability, np.concatenate(contributions)

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """Per metric: the sum over its features of |standardised value| x the feature's importance."""
        if self.explain is None:
            raise ValueError("this runtime was built without the detector's feature importances")
        mean, weights = self.explain
        z = features - mean
        np.abs(z, out=z)
        z *= weights
        return z.reshape(len(features), -1, len(self.spec.metrics)).sum(axis=1)
