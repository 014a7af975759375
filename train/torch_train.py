"""Ray Train entry point for the autoencoder and the LSTM: `TorchTrainer` around the shared loop.

GPU and bfloat16 mixed precision when the cluster has GPUs, CPU otherwise; a checkpoint every
epoch; `FailureConfig` restarts a failed worker group from the last checkpoint.

Many small models (a graduation job's new entities, train/retrain.py) are fitted one after another in one
run (`fit_many_with_ray_train`), a checkpoint per finished model: a run's start and end cost about 8 s on
2 cores, and a new machine's autoencoder fits in under 1 s.
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
_FITTED = "fitted.pt"  # one finished model of a run that fits many


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
    initial_weights: dict[str, np.ndarray] | None = None,
    **options: Any,
) -> SequenceDetector:
    """Fit a sequence detector through `TorchTrainer` on windows it has prepared (`prepare`, or
    `prepare_fleet` for a fleet model over many entities); returns the fitted detector. With
    `initial_weights` (a state dict as arrays) training starts from them instead of a new network.
    `options` are the run's (`_trainer`: workers, GPU, storage, run name, failures, CPUs per worker)."""
    _connect()
    config = {
        "kind": detector.name,
        "model_config": detector.config.__dict__,
        "data_ref": ray.put((train_w.numpy(), val_w.numpy())),
        "initial_weights_ref": ray.put(initial_weights) if initial_weights is not None else None,
    }
    trainer, use_gpu = _trainer(_train_loop_per_worker, config, 2, **options)
    run_name = options.get("run_name")
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train run {run_name} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, _STATE), weights_only=True)
    # the checkpoint carries every epoch's metrics: Ray's metrics_dataframe keeps only the
    # reports of retained checkpoints (num_to_keep)
    return _adopt(detector, state, val_w, result.path, use_gpu)


def _connect() -> None:
    """A local Ray unless this process is connected already (a job's driver, a test's cluster)."""
    if not ray.is_initialized():
        ray.init()


def _adopt(
    detector: SequenceDetector, state: dict[str, Any], val_w: torch.Tensor, run_path: Any, used_gpu: bool
) -> SequenceDetector:
    """`detector` with the weights and epoch history of a checkpoint `state` of the Ray Train run at `run_path`."""
    network = detector.new_network()
    network.load_state_dict(state["model"])
    detector.finish(network, val_w, state["history"])
    detector.ray_result_path_ = str(run_path)
    detector.used_gpu_ = bool(used_gpu)
    return detector


def _trainer(
    loop: Any,
    config: dict[str, Any],
    checkpoints_kept: int | None,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    storage_path: str | Path | None = None,
    run_name: str | None = None,
    max_failures: int = 2,
    cpus_per_worker: float | None = None,
) -> tuple[Any, bool]:
    """A `TorchTrainer` of `loop` with the run options every fit here takes, and whether it uses GPUs (by
    default: when the cluster has them). `checkpoints_kept`: None keeps every checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    storage = Path(storage_path or Path.cwd() / "runs" / "ray_train").resolve()
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
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
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_kept),
        ),
    )
    return trainer, use_gpu


def _fit_many_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a run that fits many models: each in turn, from the one after
    the last checkpoint's; rank 0 reports a checkpoint per finished model, holding that model only (a
    checkpoint of every model so far would write the first one n times)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    items = ray.get(config["items_ref"])
    first, resumed_from = 0, -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resumed_from = int(torch.load(os.path.join(folder, _FITTED), weights_only=True)["index"])
        first = resumed_from + 1
        log.warning("resuming after a checkpoint", extra={"rank": rank, "model": first, "models": len(items)})
    device = ray.train.torch.get_device()
    for index in range(first, len(items)):
        kind, model_config, train_np, val_np = items[index]
        cfg = SequenceConfig.from_dict(model_config)
        torch.manual_seed(cfg.seed)
        model = ray.train.torch.prepare_model(SEQUENCE_DETECTORS[kind].network_class.build(train_np.shape[2], cfg))
        history = train_epochs(
            model,
            torch.from_numpy(np.ascontiguousarray(train_np[rank::world])),
            torch.from_numpy(val_np),
            cfg,
            optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
            device=device,
            amp=device.type == "cuda",
        )
        history = [{**h, "resumed_from": resumed_from, "world_size": world} for h in history]
        metrics = {"model_index": index, **history[-1]}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                state = {"index": index, "model": inner.state_dict(), "history": history}
                torch.save(state, os.path.join(folder, _FITTED))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)


def fit_many_with_ray_train(
    fits: list[tuple[SequenceDetector, torch.Tensor, torch.Tensor]], **options: Any
) -> list[SequenceDetector]:
    """Fit many sequence detectors, each on the windows it has prepared, one after another in one
    `TorchTrainer` run; returns them fitted, in order. `options` are the run's, as for
    `fit_windows_with_ray_train`. A failed worker group restarts after the last finished model (every model's
    checkpoint is kept until the run ends)."""
    _connect()
    items = [(det.name, det.config.__dict__, train_w.numpy(), val_w.numpy()) for det, train_w, val_w in fits]
    trainer, use_gpu = _trainer(_fit_many_loop_per_worker, {"items_ref": ray.put(items)}, None, **options)
    run_name = options.get("run_name")
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train run {run_name} failed: {result.error}") from result.error
    states: dict[int, dict[str, Any]] = {}
    for checkpoint, _ in result.best_checkpoints:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, _FITTED), weights_only=True)
        states[int(state["index"])] = state
    missing = [i for i in range(len(fits)) if i not in states]
    if missing:
        raise RuntimeError(f"Ray Train run {run_name} kept no checkpoint of model(s) {missing} of {len(fits)}")
    return [_adopt(det, states[index], val_w, result.path, use_gpu) for index, (det, _, val_w) in enumerate(fits)]
