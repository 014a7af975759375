"""Ray Train entry point for the autoencoder and the LSTM: `TorchTrainer` around the shared loop.

GPU and bfloat16 mixed precision when the cluster has GPUs, CPU otherwise; a checkpoint every
epoch; `FailureConfig` restarts a failed worker group from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from detect.sequence import SEQUENCE_DETECTORS, SequenceConfig, SequenceDetector, train_epochs

log = logging.getLogger(__name__)

_STATE = "state.pt"


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. Shards the training windows by rank; rank 0 checkpoints."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    kind, cfg = config["kind"], SequenceConfig.from_dict(config["model_config"])
    train_np, val_np = ray.get(config["data_ref"])
    train_w = torch.from_numpy(np.ascontiguousarray(train_np[rank::world]))
    val_w = torch.from_numpy(val_np)
    torch.manual_seed(cfg.seed)
    network = SEQUENCE_DETECTORS[kind].network_class.build(train_np.shape[2], cfg)

    start_epoch, resumed_from, opt_state, history = 0, -1, None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, _STATE), weights_only=True)
        network.load_state_dict(state["model"])
        opt_state, resumed_from, history = state["optimizer"], int(state["epoch"]), state["history"]
        start_epoch = resumed_from + 1
        log.warning("resuming from checkpoint", extra={"rank": rank, "epoch": start_epoch})
    elif config.get("initial_weights_ref") is not None:  # a warm start: continue from a fitted model
        weights = ray.get(config["initial_weights_ref"])
        network.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})

    model = ray.train.torch.prepare_model(network)  # device placement, DDP when world > 1
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if opt_state:
        optimizer.load_state_dict(opt_state)
    device = ray.train.torch.get_device()

    def on_epoch(
        epoch: int, metrics: dict[str, float], model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        metrics = {**metrics, "resumed_from": resumed_from, "world_size": world}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                state = {
                    "model": inner.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                }
                torch.save(state, os.path.join(folder, _STATE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)

    train_epochs(
        model,
        train_w,
        val_w,
        cfg,
        start_epoch=start_epoch,
        optimizer=optimizer,
        on_epoch=on_epoch,
        device=device,
        amp=device.type == "cuda",
    )


def fit_with_ray_train(
    detector: SequenceDetector, X: np.ndarray, metrics: list[str] | None = None, **options: Any
) -> SequenceDetector:
    """Fit a sequence detector on one entity's rows through `TorchTrainer`; returns the fitted detector.
    `options` are `fit_windows_with_ray_train`'s (workers, GPU, storage, run name, failures, CPUs).

    The per-epoch history (train/val loss, rows/s, resume marks) is kept in `detector.history_`.
    """
    train_w, val_w = detector.prepare(X, metrics)
    return fit_windows_with_ray_train(detector, train_w, val_w, **options)


def continue_with_ray_train(
    detector: SequenceDetector, start: SequenceDetector, X: np.ndarray, **options: Any
) -> SequenceDetector:
    """Fit `detector` on recent rows X through `TorchTrainer`, starting from `start`'s weights and
    spreads (`SequenceDetector.prepare_continued`): the retraining job's warm start, which keeps what
    the champion learnt from its long training period and moves it to the recent normal."""
    train_w, val_w = detector.prepare_continued(start, X)
    weights = {k: v.detach().cpu().numpy() for k, v in start.network_.state_dict().items()}
    return fit_windows_with_ray_train(detector, train_w, val_w, initial_weights=weights, **options)


def fit_windows_with_ray_train(
    detector: SequenceDetector,
    train_w: torch.Tensor,
    val_w: torch.Tensor,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    storage_path: str | Path | None = None,
    run_name: str | None = None,
    max_failures: int = 2,
    cpus_per_worker: float | None = None,
    initial_weights: dict[str, np.ndarray] | None = None,
) -> SequenceDetector:
    """Fit a sequence detector through `TorchTrainer` on windows it has prepared (`prepare`, or
    `prepare_fleet` for a fleet model over many entities); returns the fitted detector. With
    `initial_weights` (a state dict as arrays) training starts from them instead of a new network."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    data_ref = ray.put((train_w.numpy(), val_w.numpy()))
    storage = Path(storage_path or Path.cwd() / "runs" / "ray_train").resolve()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "kind": detector.name,
            "model_config": detector.config.__dict__,
            "data_ref": data_ref,
            "initial_weights_ref": ray.put(initial_weights) if initial_weights is not None else None,
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            # fractional CPUs let a retraining job fit beside the Serve replicas on a small cluster
            resources_per_worker={"CPU": cpus_per_worker} if cpus_per_worker else None,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train run {run_name} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, _STATE), weights_only=True)
    network = detector.new_network()
    network.load_state_dict(state["model"])
    # the checkpoint carries every epoch's metrics: Ray's metrics_dataframe keeps only the
    # reports of retained checkpoints (num_to_keep)
    detector.finish(network, val_w, state["history"])
    detector.ray_result_path_ = str(result.path)
    detector.used_gpu_ = bool(use_gpu)
    return detector
