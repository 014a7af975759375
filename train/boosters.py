"""XGBoost and LightGBM members of the ensemble, trained data-parallel by Ray Train's trainers.

Ray 2.60's `XGBoostTrainer` / `LightGBMTrainer` run a `train_loop_per_worker` and set up the
collective communication between workers; each worker trains on its rank's shard of the feature
matrix (passed once through the object store). Our callbacks report every REPORT_EVERY rounds and
checkpoint the finished booster; Ray's `RayTrainReportCallback` reports every round, and each report
waits for the controller's poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray

from detect.ensemble import EnsembleConfig, lgbm_params, xgb_params

REPORT_EVERY = 50  # boosting rounds between reports: each report waits for the controller's poll
_MODEL_FILE = {"xgb": "model.json", "lgbm": "model.txt"}


def _report(metrics: dict[str, float], model_bytes: bytes | None = None, filename: str = "") -> None:
    """Every worker reports the same number of times; rank 0 attaches the finished booster."""
    import ray.train

    if model_bytes is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, filename).write_bytes(model_bytes)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _xgb_loop(config: dict[str, Any]) -> None:
    import ray.train
    import xgboost as xgb

    class Report(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
            if (epoch + 1) % REPORT_EVERY == 0 and epoch + 1 < config["rounds"]:
                _report({"round": epoch + 1, "train_aucpr": float(evals_log["train"]["aucpr"][-1])})
            return False

    features, target = ray.get(config["data_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dtrain = xgb.DMatrix(features[rank::world], label=target[rank::world])
    log: dict = {}
    booster = xgb.train(
        config["params"],
        dtrain,
        num_boost_round=config["rounds"],
        evals=[(dtrain, "train")],
        evals_result=log,
        verbose_eval=False,
        callbacks=[Report()],
    )
    _report(
        {"round": config["rounds"], "train_aucpr": float(log["train"]["aucpr"][-1])},
        bytes(booster.save_raw("json")),
        _MODEL_FILE["xgb"],
    )


def _lgbm_loop(config: dict[str, Any]) -> None:
    import lightgbm as lgb
    import ray.train
    from ray.train.lightgbm import get_network_params

    def report(env: Any) -> None:
        done = env.iteration + 1
        if done % REPORT_EVERY == 0 and done < config["rounds"]:
            _, metric, value, _ = env.evaluation_result_list[0]
            _report({"round": done, f"train_{metric}": float(value)})

    features, target = ray.get(config["data_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    params = dict(config["params"])
    if world > 1:
        params.update(tree_learner="data_parallel", pre_partition=True, **get_network_params())
    shard = lgb.Dataset(features[rank::world], label=target[rank::world])
    log: dict = {}
    booster = lgb.train(
        params,
        shard,
        num_boost_round=config["rounds"],
        valid_sets=[shard],
        valid_names=["train"],
        callbacks=[report, lgb.record_evaluation(log)],
    )
    metric, values = next(iter(log["train"].items()))
    _report(
        {"round": config["rounds"], f"train_{metric}": float(values[-1])},
        booster.model_to_string().encode(),
        _MODEL_FILE["lgbm"],
    )


def _fit(
    trainer_cls: Any,
    loop: Any,
    data_ref: Any,
    params: dict[str, Any],
    rounds: int,
    num_workers: int,
    storage_path: str | Path | None,
    name: str | None,
) -> bytes:
    """Run one booster trainer; returns the finished booster as saved in its final checkpoint."""
    from ray.train import RunConfig, ScalingConfig

    storage = str(Path(storage_path or Path.cwd() / "runs" / "ray_train").resolve())
    result = trainer_cls(
        loop,
        train_loop_config={"data_ref": data_ref, "params": params, "rounds": rounds},
        scaling_config=ScalingConfig(num_workers=num_workers),
        run_config=RunConfig(name=name, storage_path=storage),
    ).fit()
    kind = "xgb" if loop is _xgb_loop else "lgbm"
    with result.checkpoint.as_directory() as folder:
        return Path(folder, _MODEL_FILE[kind]).read_bytes()


def _put(features: np.ndarray, target: np.ndarray) -> Any:
    if not ray.is_initialized():
        ray.init()
    return ray.put((np.ascontiguousarray(features, dtype=np.float32), np.asarray(target, dtype=np.float32)))


def train_boosters_with_ray(
    features: np.ndarray,
    target: np.ndarray,
    cfg: EnsembleConfig,
    num_workers: int = 1,
    storage_path: str | Path | None = None,
    run_name: str = "ensemble",
) -> dict[str, Any]:
    """{"xgb": xgboost.Booster, "lgbm": lightgbm.Booster}, trained through Ray Train."""
    import lightgbm as lgb
    import xgboost as xgb
    from ray.train.lightgbm import LightGBMTrainer
    from ray.train.xgboost import XGBoostTrainer

    pos_weight, n = float((len(target) - target.sum()) / max(target.sum(), 1)), features.shape[1]
    data_ref = _put(features, target)
    # (trainer, its loop, params with one thread per worker, rounds) for each booster
    plans = {
        "xgb": (XGBoostTrainer, _xgb_loop, {**xgb_params(cfg, pos_weight, n), "nthread": 1}, cfg.xgb_rounds),
        "lgbm": (LightGBMTrainer, _lgbm_loop, {**lgbm_params(cfg, pos_weight, n), "num_threads": 1}, cfg.lgbm_rounds),
    }
    xgb_file, lgbm_file = (
        _fit(trainer, loop, data_ref, params, rounds, num_workers, storage_path, f"{run_name}-{name}")
        for name, (trainer, loop, params, rounds) in plans.items()
    )
    xgb_booster = xgb.Booster()
    xgb_booster.load_model(bytearray(xgb_file))
    return {"xgb": xgb_booster, "lgbm": lgb.Booster(model_str=lgbm_file.decode())}


def train_lgbm_with_ray(
    features: np.ndarray,
    target: np.ndarray,
    params: dict[str, Any],
    rounds: int,
    num_workers: int = 1,
    storage_path: str | Path | None = None,
    run_name: str | None = None,
) -> Any:
    """One LightGBM model trained through Ray Train's `LightGBMTrainer` (used for distilled students)."""
    import lightgbm as lgb
    from ray.train.lightgbm import LightGBMTrainer

    model_file = _fit(
        LightGBMTrainer,
        _lgbm_loop,
        _put(features, target),
        {**params, "num_threads": 1},
        rounds,
        num_workers,
        storage_path,
        run_name,
    )
    return lgb.Booster(model_str=model_file.decode())
