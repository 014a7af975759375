"""Fleet models: one autoencoder per metric schema, trained on Ray Train across many entities, registered
inside the autoencoder's champion version beside the per-entity models (`detect/fleet.py` has the how).

Serving scores an entity that has no model of its own with the fleet model of its metrics, from its first
row; the retraining job (`train/retrain.py`) later fits the entity's own model, which takes over when it
wins by the promotion rule. Adding a fleet model changes no entity's model, so the version that carries
it becomes champion at once.

    raywatch train --fleet [--data DIR] [--entities ...]
    ray job submit --working-dir . -- python -m train.fleet --data data
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow

from detect import metrics as M
from detect.data import Series, load_benchmark
from detect.fleet import FLEET_PREFIX, fleet_key, own_thresholds
from train import registry
from train.assemble import fitted_bundle, with_unchanged_entities
from train.jobs import init_ray
from train.kinds import kind_named
from train.pipeline import resolve_config
from train.torch_train import fit_windows_with_ray_train

log = logging.getLogger(__name__)

FLEET_KIND = "autoencoder"  # reconstructs what it reads: nothing about an entity's future or its labels


def schemas(series_list: list[Series]) -> dict[str, tuple[list[str], list[Series]]]:
    """The entities grouped by metric schema: fleet key -> (the first entity's metric order, its series)."""
    groups: dict[str, tuple[list[str], list[Series]]] = {}
    for series in series_list:
        key = fleet_key(series.metrics)
        metrics, members = groups.setdefault(key, (list(series.metrics), []))
        members.append(series)
    return groups


def cold_start_figures(det: Any, members: list[Series], metrics: list[str]) -> dict[str, Any]:
    """The fleet model on each entity's labelled test split, scored from its first row as a new entity would be."""
    figures = {}
    for s in members:
        if not len(s.test) or not s.labels.any():
            continue
        scores = det.score(s.test[metrics].to_numpy())
        figures[s.name] = {
            "pr_auc": M.pr_auc(s.labels, scores),
            "f1_operational": M.f1_at(s.labels, scores, det.threshold_),  # the fleet model's threshold throughout
            # as served: the entity's own threshold once its first scores give it (no label is read)
            "f1_operational_own": M.f1_at(s.labels, scores, own_thresholds(scores, det.threshold_)),
        }
    return figures


def train_fleet(
    data_dir: str | Path | None = None,
    entities: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    promote: bool = True,
    progress: Callable[[str], None] = lambda message: log.info(message),
) -> dict[str, Any]:
    """Train a fleet model per metric schema of the entities in `data_dir` and register them in a new
    autoencoder version: the champion's entities plus the fleet models (replacing older ones of the
    same schemas). Returns the version and per schema its entities, fit time and cold-start figures."""
    kind = kind_named(FLEET_KIND)
    config, config_source = resolve_config(FLEET_KIND, overrides)
    config = kind.checked_config(config)
    series_list = load_benchmark(data_dir, entities)
    groups = schemas(series_list)
    init_ray()
    registry.setup()
    detectors, metrics_of, report = {}, {}, {}
    with mlflow.start_run(run_name="train-fleet") as run:
        mlflow.set_tags(
            {"raywatch.model": FLEET_KIND, "raywatch.fleet": "true", "raywatch.config_source": config_source}
        )
        mlflow.log_params({"entities": ",".join(s.name for s in series_list), "schemas": ",".join(groups)})
        for key, (metrics, members) in groups.items():
            progress(f"{key}: fleet model over {len(members)} entities, {len(metrics)} metrics, on Ray Train")
            t0 = time.perf_counter()
            det = kind.new(config)
            train_w, val_w = det.prepare_fleet([s.train[metrics].to_numpy() for s in members], metrics)
            det = fit_windows_with_ray_train(
                det,
                train_w,
                val_w,
                num_workers=num_workers,
                use_gpu=use_gpu,
                # a run of its own per schema: Ray Train resumes a run of the same name from its checkpoint
                run_name=f"fleet-{key.removeprefix(FLEET_PREFIX)}-{run.info.run_id[:8]}",
            )
            seconds = time.perf_counter() - t0
            figures = cold_start_figures(det, members, metrics)
            report[key] = {
                "entities": [s.name for s in members],
                "metrics": len(metrics),
                "windows": len(train_w) + len(val_w),
                "fit_seconds": round(seconds, 1),
                "threshold": float(det.threshold_),
                "cold_start": figures,
            }
            mlflow.log_metrics({f"{key}/fit_seconds": seconds, f"{key}/windows": float(len(train_w) + len(val_w))})
            for entity, values in figures.items():
                mlflow.log_metrics({f"{key}/{entity}/{k}": v for k, v in values.items() if v is not None})
            detectors[key], metrics_of[key] = det, metrics
            mean_auc = [f["pr_auc"] for f in figures.values() if f["pr_auc"] is not None]
            progress(
                f"{key}: trained in {seconds:.1f} s on {len(train_w) + len(val_w)} windows"
                + (
                    f"; PR-AUC on these entities' test splits, scored from their first row: "
                    f"mean {sum(mean_auc) / len(mean_auc):.3f}"
                    if mean_auc
                    else ""
                )
            )
        mlflow.log_dict(report, "fleet.json")
        bundle = fitted_bundle(
            FLEET_KIND, detectors, metrics_of, {}, {"fleet": report}, {"run_id": run.info.run_id, "config": config}
        )
        champion = registry.alias_version(FLEET_KIND, registry.CHAMPION)
        if champion is not None:
            base, _ = registry.load_bundle(FLEET_KIND, champion)
            bundle = with_unchanged_entities(bundle, base)
            # the per-entity models' config and variant stay theirs
            bundle.info.update(config=base.info.get("config", config), variant=base.variant)
        with tempfile.TemporaryDirectory() as folder:
            bundle.save(folder)
            mlflow.log_artifacts(folder, "model")
        version = registry.register_bundle(bundle, run.info.run_id, {"raywatch.fleet": ",".join(groups)})
    if promote:
        registry.promote(FLEET_KIND, version)
    return {"model": FLEET_KIND, "version": version, "promoted": promote, "based_on": champion, "schemas": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--data")
    parser.add_argument("--entities")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train_fleet(
        args.data,
        args.entities.split(",") if args.entities else None,
        {"epochs": args.epochs} if args.epochs else {},
        num_workers=args.num_workers,
        progress=print,
    )
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
