"""Sequence detectors: a windowed autoencoder and an LSTM forecaster (PyTorch).

Both read (W x metrics) windows built by `detect.features.entity_windows` from z-scored telemetry.
Anomaly score of row t = mean over the last `smooth` rows of sum_m err[t, m] / val_err[m]: the
squared reconstruction (autoencoder) or forecast (LSTM) error of each metric, normalised by that
metric's mean error on the validation tail of the training series. `explain` returns the same
normalised per-metric errors, each held at its recent peak (`detect.attribution`): their ranking is
the root-cause answer.

One training loop (`train_epochs`) serves the in-process fit and Ray Train's TorchTrainer
(train/torch_train.py). Saved state is JSON + npz (weights as arrays): loading never unpickles.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from detect.attribution import HALF_LIFE_ROWS, hold_peaks
from detect.base import Detector
from detect.config import config_dataclass
from detect.features import FeatureSpec, entity_windows
from detect.fleet import MAX_WINDOW, WindowNormaliser
from detect.runtime import smooth_causal

log = logging.getLogger(__name__)

CLIP = 10.0  # z-scores are clipped here: a metric constant in training must not blow up the loss


@config_dataclass
class SequenceConfig:
    """Hyperparameters shared by both sequence detectors (Ray Tune searches these)."""

    window: int = 16  # rows per window (the LSTM forecasts the last from the others)
    hidden: int = 128  # units per layer
    latent: int = 16  # autoencoder bottleneck
    layers: int = 1  # LSTM layers
    lr: float = 1e-3  # Adam
    batch_size: int = 256
    epochs: int = 10
    val_fraction: float = 0.2  # the newest share of the training series: error scale and threshold
    smooth: int = 5  # rows a score is averaged over (causal)
    threshold_quantile: float = 0.99  # of validation scores: the stored operating threshold
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SequenceNetwork(nn.Module):
    """What the sequence detectors, their export and their students need of a network: its estimate of
    each window's newest row, its training loss, and the graph outputs serving reads. Each network
    class is its kind's half of the plug-in; the detector never asks which one it holds."""

    sees_newest_row: bool  # the autoencoder reconstructs the newest row; the forecaster predicts it unseen
    second_output: str  # the scoring graph's second output, after the per-metric errors
    config_fields: tuple[str, ...]  # the SequenceConfig fields that shape it (what Tune searches)

    @classmethod
    def build(cls, n_metrics: int, cfg: SequenceConfig) -> SequenceNetwork:
        raise NotImplementedError

    @staticmethod
    def newest_of(output: torch.Tensor) -> torch.Tensor:
        """The estimate of each window's newest row (z-scored, (n, M)) in the network's output."""
        raise NotImplementedError

    @staticmethod
    def loss_of(output: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """The training loss of an output. Training calls the (possibly DDP-wrapped) module and hands the
        output here, so gradients are synchronised across Ray Train workers."""
        raise NotImplementedError

    def newest_row_estimate(self, windows: torch.Tensor) -> torch.Tensor:
        return self.newest_of(self(windows))

    def per_metric_error(self, windows: torch.Tensor) -> torch.Tensor:
        """Squared error of each window's newest row, per metric: (n, M)."""
        return (self.newest_row_estimate(windows) - windows[:, -1]) ** 2

    def graph_outputs(
        self, z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the ONNX scoring graph, from z-scored windows: (per-metric squared error of the newest row,
        the `second_output`); `mean`/`std` turn a forecast back into telemetry units."""
        estimate = self.newest_row_estimate(z)
        return (estimate - z[:, -1]) ** 2, estimate


class WindowAutoencoder(SequenceNetwork):
    """MLP autoencoder over a flattened (W x M) window."""

    sees_newest_row = True
    second_output = "reconstruction"  # of the newest row, z-units
    config_fields = ("window", "hidden", "latent")

    def __init__(self, n_metrics: int, window: int, hidden: int = 128, latent: int = 16) -> None:
        super().__init__()
        d = n_metrics * window
        self.window, self.n_metrics = window, n_metrics
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))

    @classmethod
    def build(cls, n_metrics: int, cfg: SequenceConfig) -> WindowAutoencoder:
        return cls(n_metrics, cfg.window, cfg.hidden, cfg.latent)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(windows)).view(-1, self.window, self.n_metrics)

    @staticmethod
    def newest_of(output: torch.Tensor) -> torch.Tensor:
        return output[:, -1]

    @staticmethod
    def loss_of(output: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """The autoencoder learns to reconstruct the whole window, not only the row it scores."""
        return ((output - windows) ** 2).mean()


class LSTMForecaster(SequenceNetwork):
    """Reads rows 0..W-2 of a window and forecasts row W-1."""

    sees_newest_row = False
    second_output = "forecast"  # of the row after the window, telemetry units
    config_fields = ("window", "hidden", "layers")

    def __init__(self, n_metrics: int, hidden: int = 64, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_metrics, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, n_metrics)

    @classmethod
    def build(cls, n_metrics: int, cfg: SequenceConfig) -> LSTMForecaster:
        return cls(n_metrics, cfg.hidden, cfg.layers)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(windows[:, :-1])
        return self.head(out[:, -1])

    @staticmethod
    def newest_of(output: torch.Tensor) -> torch.Tensor:
        return output

    @staticmethod
    def loss_of(output: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        return ((output - windows[:, -1]) ** 2).mean()

    def graph_outputs(
        self, z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over [windows; windows shifted by a row]: one LSTM node in the graph, so quantization
        sees each weight once (forward() reads rows 0..W-2 of its input). The second half of the pass is
        the forecast of the row after each window."""
        shifted = torch.cat([z[:, 1:], z[:, -1:]], dim=1)
        out = self(torch.cat([z, shifted], dim=0))
        n = z.shape[0]
        return (out[:n] - z[:, -1]) ** 2, out[n:] * std + mean


@torch.no_grad()
def batched_error(model: SequenceNetwork, windows: torch.Tensor, batch: int = 4096) -> np.ndarray:
    model.eval()
    parts = [model.per_metric_error(windows[i : i + batch]).float().cpu() for i in range(0, len(windows), batch)]
    return torch.cat(parts).numpy().astype(np.float64)


EpochCallback = Callable[[int, dict[str, float], nn.Module, torch.optim.Optimizer], None]


def train_epochs(
    model: nn.Module,
    train_windows: torch.Tensor,
    val_windows: torch.Tensor,
    cfg: SequenceConfig,
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: EpochCallback | None = None,
    device: torch.device | None = None,
    amp: bool = False,
) -> list[dict[str, float]]:
    """The training loop both paths share. Reports train/val loss per epoch through `on_epoch`.

    val_loss is the scoring error (last row of each validation window), comparable across configs.

    `amp` turns on bfloat16 autocast (mixed precision) on GPU; on CPU it stays float32.
    """
    device = device or torch.device("cpu")
    network: SequenceNetwork = getattr(model, "module", model)  # Ray Train wraps it in DDP with 2+ workers
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + start_epoch)  # a resumed or stepped run reshuffles
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(train_windows), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            batch = train_windows[perm[i : i + cfg.batch_size]].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                loss = network.loss_of(model(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        val_loss = float(batched_error(network, val_windows.to(device)).mean()) if len(val_windows) else math.nan
        metrics = {
            "epoch": epoch,
            "train_loss": total / max(seen, 1),
            "val_loss": val_loss,
            "rows_per_s": seen / (time.perf_counter() - t0),
        }
        history.append(metrics)
        log.info("epoch done", extra={"model": type(network).__name__, **metrics})
        if on_epoch:
            on_epoch(epoch, metrics, model, optimizer)
    return history


@dataclass
class Scaler:
    """Per-metric z-scoring with a floor on the std, fitted on training data."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray, floor: float = 1e-3) -> Scaler:
        return cls(X.mean(axis=0), np.maximum(X.std(axis=0), floor))

    def transform(self, X: np.ndarray) -> np.ndarray:
        return np.clip((X - self.mean) / self.std, -CLIP, CLIP)


class SequenceDetector(Detector):
    """Shared fit / score / explain / save / load of the autoencoder and the LSTM."""

    network_class: type[SequenceNetwork]
    attribution_half_life_rows = HALF_LIFE_ROWS
    # set on a fleet model (detect/fleet.py): windows are put in each entity's own units before scaling
    normaliser_: WindowNormaliser | None = None

    def __init__(self, config: SequenceConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        cfg = config if isinstance(config, SequenceConfig) else SequenceConfig.from_dict(config or {})
        self.config = SequenceConfig.from_dict({**asdict(cfg), **overrides})
        self.threshold_quantile = self.config.threshold_quantile

    # -- data preparation shared with Ray Train --------------------------------------------------
    def prepare(self, X: np.ndarray, metrics: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit the scaler and spec on X; return (train, validation) windows, split in time order."""
        X = self._check(X, fitting=True)
        self.n_metrics_ = X.shape[1]
        self.scaler_ = Scaler.fit(X)
        self.spec_ = self._sequence_spec(metrics)
        return self._split_windows(X)

    def prepare_continued(self, start: SequenceDetector, X: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """`prepare` for training that continues from `start`'s weights on recent rows X (the retraining
        job's warm start): X's per-metric means with `start`'s spreads. A level the recent rows settled at
        becomes normal; a spread from a few days of rows is not trusted over the training period's (a
        metric flat for two days would otherwise get a floor-sized spread and alarm on its first move)."""
        if start.normaliser_ is not None:
            raise ValueError("a fleet model's weights do not continue on one entity's rows")
        X = self._check(X, fitting=True)
        if X.shape[1] != start.n_metrics_ or self.config.window != start.config.window:
            raise ValueError(
                f"cannot continue a model of {start.n_metrics_} metrics and window {start.config.window} on "
                f"{X.shape[1]} metrics and window {self.config.window}"
            )
        self.n_metrics_, self.spec_ = X.shape[1], start.spec_
        self.scaler_ = Scaler(X.mean(axis=0), start.scaler_.std.copy())
        return self._split_windows(X)

    def _split_windows(self, X: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled windows of X, split in time order into (train, validation)."""
        windows = torch.from_numpy(entity_windows(self.scaler_.transform(X), self.spec_))
        n_val = int(len(windows) * self.config.val_fraction)
        return windows[: len(windows) - n_val], windows[len(windows) - n_val :]

    def prepare_fleet(
        self, series: list[np.ndarray], metrics: list[str], prior_rows: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A fleet model's `prepare`: many entities' (T, M) series with one metric schema. Each entity's
        windows are normalised by its own rows (`WindowNormaliser`); the newest `val_fraction` of each
        entity's windows validates (error scale and threshold), the rest trains."""
        if self.config.window > MAX_WINDOW:
            raise ValueError(f"a fleet model reads windows of at most {MAX_WINDOW} rows; window={self.config.window}")
        checked = [self._check(X, fitting=True) for X in series]
        self.n_metrics_ = checked[0].shape[1]
        self.spec_ = self._sequence_spec(metrics)
        self.normaliser_ = WindowNormaliser.fit(checked, prior_rows)
        per_entity = [self.normaliser_.series_windows(X, self.spec_) for X in checked]
        newest = np.concatenate([w[:, -1, :] for w in per_entity]).astype(np.float64)
        self.scaler_ = Scaler.fit(newest)
        train, val = [], []
        for windows in per_entity:
            n_val = int(len(windows) * self.config.val_fraction)
            scaled = self.scaler_.transform(windows).astype(np.float32)
            train.append(scaled[: len(scaled) - n_val])
            val.append(scaled[len(scaled) - n_val :])
        return torch.from_numpy(np.concatenate(train)), torch.from_numpy(np.concatenate(val))

    def fit_fleet(self, series: list[np.ndarray], metrics: list[str], **normaliser: int) -> Detector:
        """In-process fleet fit (tests; `raywatch train --fleet` fits on Ray Train)."""
        train_w, val_w = self.prepare_fleet(series, metrics, **normaliser)
        network = self.new_network()
        return self.finish(network, val_w, train_epochs(network, train_w, val_w, self.config))

    def _sequence_spec(self, metrics: list[str] | None) -> FeatureSpec:
        names = tuple(metrics) if metrics else tuple(f"m{i:02d}" for i in range(self.n_metrics_))
        # only `window` matters to the sequence models; the other fields keep history == window
        return FeatureSpec(
            metrics=names, window=self.config.window, lags=(1,), rolling=(self.config.window,), diffs=(1,), rates=(1,)
        )

    def new_network(self) -> nn.Module:
        torch.manual_seed(self.config.seed)
        return self.network_class.build(self.n_metrics_, self.config)

    def finish(self, network: nn.Module, val_windows: torch.Tensor, history: list[dict[str, float]]) -> Detector:
        """Adopt trained weights; calibrate error normalisation and threshold on validation windows."""
        self.network_ = network.cpu().eval()
        self.history_ = history
        val_err = batched_error(self.network_, val_windows)
        self.error_scale_ = np.maximum(val_err.mean(axis=0), 1e-2)
        self.calibrate_on(self._score_from_error(val_err / self.error_scale_))
        return self

    # -- Detector interface --------------------------------------------------------------------------
    def fit(self, X: np.ndarray, metrics: list[str] | None = None) -> Detector:
        train_w, val_w = self.prepare(X, metrics)
        network = self.new_network()
        history = train_epochs(network, train_w, val_w, self.config)
        return self.finish(network, val_w, history)

    def _windows(self, X: np.ndarray) -> torch.Tensor:
        X = self._check(X)
        if self.normaliser_ is not None:  # a fleet model: each window in the entity's own units first
            windows = self.normaliser_.series_windows(X, self.spec_)
            return torch.from_numpy(self.scaler_.transform(windows).astype(np.float32))
        return torch.from_numpy(entity_windows(self.scaler_.transform(X), self.spec_))

    def _normalised_error(self, X: np.ndarray) -> np.ndarray:
        return batched_error(self.network_, self._windows(X)) / self.error_scale_

    def _score_from_error(self, err: np.ndarray) -> np.ndarray:
        return smooth_causal(err.sum(axis=1), self.config.smooth)

    def metric_errors(self, X: np.ndarray) -> np.ndarray:
        """Smoothed normalised per-metric errors of every row (rows, metrics): what `score` sums."""
        return smooth_causal(self._normalised_error(X), self.config.smooth)

    def score(self, X: np.ndarray) -> np.ndarray:
        return self.metric_errors(X).sum(axis=1)

    def context_rows(self) -> int:
        return self.config.window + self.config.smooth - 2

    def explain(self, X: np.ndarray) -> np.ndarray:
        """Per-metric contributions of each row, held over the episode (`detect.attribution`)."""
        return hold_peaks(self.metric_errors(X), self.attribution_half_life_rows)[0]

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"w.{k}": v.detach().cpu().numpy() for k, v in self.network_.state_dict().items()}
        arrays.update(scaler_mean=self.scaler_.mean, scaler_std=self.scaler_.std, error_scale=self.error_scale_)
        if self.normaliser_ is not None:
            arrays.update(self.normaliser_.to_arrays())
        return {"config": asdict(self.config), "spec": self.spec_.to_json(), "history": self.history_}, arrays

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.config = SequenceConfig.from_dict(params["config"])
        self.threshold_quantile = self.config.threshold_quantile
        self.spec_ = FeatureSpec.from_json(params["spec"])
        self.history_ = params.get("history", [])
        self.scaler_ = Scaler(arrays["scaler_mean"], arrays["scaler_std"])
        self.error_scale_ = arrays["error_scale"]
        self.normaliser_ = WindowNormaliser.from_arrays(arrays)
        network = self.network_class.build(self.n_metrics_, self.config)
        network.load_state_dict({k[2:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("w.")})
        self.network_ = network.eval()


class AutoencoderDetector(SequenceDetector):
    name = "autoencoder"
    network_class = WindowAutoencoder


class LSTMDetector(SequenceDetector):
    name = "lstm"
    network_class = LSTMForecaster

    def __init__(self, config: SequenceConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        # a smaller, shorter-trained default than the autoencoder's: an LSTM epoch costs more on CPU
        base = {"hidden": 64, "epochs": 5}
        given = asdict(config) if isinstance(config, SequenceConfig) else dict(config or {})
        super().__init__({**base, **given}, **overrides)

    @torch.no_grad()
    def forecast(self, X: np.ndarray, horizon: int = 5) -> np.ndarray:
        """Forecast the next `horizon` rows after the end of X (in the input's units): (horizon, M)."""
        if horizon < 1:
            raise ValueError("horizon must be >= 1")
        window = self._windows(X)[-1:].clone()  # (1, W, M), z-scored
        out = []
        for _ in range(horizon):
            nxt = self.network_(torch.cat([window[:, 1:], window[:, -1:]], dim=1))  # forecast of the row after
            out.append(nxt[0].numpy())
            window = torch.cat([window[:, 1:], nxt[:, None, :]], dim=1)
        return np.asarray(out) * self.scaler_.std + self.scaler_.mean


SEQUENCE_DETECTORS: dict[str, type[SequenceDetector]] = {cls.name: cls for cls in (AutoencoderDetector, LSTMDetector)}
