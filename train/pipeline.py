"""Training pipeline: train a detector for every entity on Ray Train, track it in MLflow, register it.

Runnable as a Ray job: `ray job submit --working-dir . -- python -m train.pipeline --model lstm`.

Sequence detectors learn from each entity's unlabelled train series. The ensemble is supervised: it
learns from the first half of each labelled test series and is evaluated on the second half, in
time order. The evaluation figures logged with a version use test labels only for reporting;
thresholds come from training data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from detect.bundle import entity_folder
from detect.data import load_benchmark
from detect.kinds import DETECTOR_KINDS
from ingest.prometheus import prometheus_series
from train import registry
from train.assemble import fitted_bundle
from train.jobs import init_ray
from train.kinds import kind_named
from train.retrain import main as retrain_main

log = logging.getLogger(__name__)

BEST_CONFIG_DIR = Path(".raywatch") / "best_config"


def best_config_path(model: str) -> Path:
    return Path(os.environ.get("RAYWATCH_HOME", ".")) / BEST_CONFIG_DIR / f"{model}.json"


def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """`--set key=value` overrides (of `raywatch train` and this job entry point); values parsed as JSON
    when they can be (numbers, lists), else kept as strings. The kind's config checks the keys."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def resolve_config(
    model: str, overrides: dict[str, Any] | None = None, use_tuned: bool = True
) -> tuple[dict[str, Any], str]:
    """Defaults < best config recorded by `raywatch tune` < explicit overrides. Returns (config, source)."""
    config: dict[str, Any] = {}
    source = "defaults"
    path = best_config_path(model)
    if use_tuned and path.exists():
        config.update(json.loads(path.read_text())["config"])
        source = f"tuned ({path})"
    config.update(overrides or {})
    return config, source


def register_fitted(
    kind: str,
    detectors: dict[str, Any],
    metrics: dict[str, list[str]],
    fitted_on: dict[str, np.ndarray],
    promote: bool = True,
    run_name: str | None = None,
    rows_per_day: dict[str, int | None] | None = None,
) -> str:
    """Register detectors fitted elsewhere (in-process, small) as one version, with the drift references
    and ONNX graphs a trained version has (`rows_per_day`: each entity's samples per day, where its name
    does not say); the first version (or `promote`) becomes champion."""
    bundle = fitted_bundle(kind, detectors, metrics, fitted_on, rows_per_day=rows_per_day)
    registry.setup()
    with mlflow.start_run(run_name=run_name or f"register-{kind}") as run:
        version = registry.register_bundle(bundle, run.info.run_id)
    if promote:
        registry.promote(kind, version)
    return version


def train_model(
    model: str,
    data_dir: str | Path | None = None,
    entities: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    use_tuned: bool = True,
    register: bool = True,
    promote_first: bool = True,
    progress: Callable[[str], None] = lambda message: log.info(message),
    tags: dict[str, str] | None = None,
    source: str | Path | None = None,
    since: str | float = "6h",
) -> dict[str, Any]:
    """Train `model` for every entity on Ray Train, log everything to MLflow, register a version.

    With `source` (a Prometheus source config, `ingest.prometheus`), the entities and their history
    (the last `since`) come from Prometheus instead of `data_dir`; that data has no incident labels,
    so only the unsupervised detectors learn from it and no test figures are computed."""
    kind = kind_named(model)  # an unknown model fails here, named
    config, config_source = resolve_config(model, overrides, use_tuned)
    config = kind.checked_config(config)  # a bad --set fails here, named, before Ray starts
    if source is not None:
        if kind.learns_from_labels:
            unsupervised = [k for k in DETECTOR_KINDS if not kind_named(k).learns_from_labels]
            raise ValueError(
                f"the {model} learns from labelled incidents; a Prometheus source has none (use {' or '.join(unsupervised)})"
            )
        series_list = prometheus_series(source, since, entities)
    else:
        series_list = load_benchmark(data_dir, entities)
    init_ray()
    registry.setup()
    detectors, metrics_by_entity, fitted_on, evaluation = {}, {}, {}, {}
    with mlflow.start_run(run_name=f"train-{model}") as run:
        run_id = run.info.run_id
        mlflow.set_tags(
            {
                "raywatch.model": model,
                "raywatch.config_source": config_source,
                **({"raywatch.source": str(source), "raywatch.since": str(since)} if source is not None else {}),
                **(tags or {}),
            }
        )
        mlflow.log_params(
            {
                "model": model,
                "entities": ",".join(s.name for s in series_list),
                "num_workers": num_workers,
                **{f"config.{k}": v for k, v in config.items()},
            }
        )
        for i, series in enumerate(series_list, 1):
            key = series.name
            t0 = time.perf_counter()
            run_name = f"{model}-{entity_folder(key)}-{run_id[:8]}"
            rows, labels = kind.training_data(series)
            normal = kind.normal_rows(series)
            det = kind.fit_on_ray(
                kind.new(config),
                rows,
                labels,
                series.metrics,
                num_workers=num_workers,
                use_gpu=use_gpu,
                run_name=run_name,
                **({} if normal is None else {"normal": normal}),
            )
            steps, artifacts = kind.fit_records(det)
            for step, figures in steps:
                mlflow.log_metrics({f"{key}/{k}": v for k, v in figures.items()}, step=step)
            for name, content in artifacts.items():
                mlflow.log_dict(content, f"{name}/{entity_folder(key)}.json")
            evaluation[key] = kind.evaluate(series, det)
            evaluation[key]["fit_seconds"] = round(time.perf_counter() - t0, 1)
            mlflow.log_metrics(
                {f"{key}/{k}": v for k, v in evaluation[key].items() if isinstance(v, (int, float)) and v is not None}
            )
            detectors[key], metrics_by_entity[key], fitted_on[key] = det, series.metrics, rows
            progress(
                f"[{i}/{len(series_list)}] {key}: "
                + ", ".join(f"{k}={v:.3f}" for k, v in evaluation[key].items() if isinstance(v, float))
            )
        summary = _summary(evaluation)
        mlflow.log_metrics({f"mean/{k}": v for k, v in summary.items()})
        mlflow.log_dict(evaluation, "evaluation.json")
        info = {"run_id": run_id, "config": config, "config_source": config_source}
        rows_per_day = {series.name: series.rows_per_day for series in series_list}
        bundle = fitted_bundle(model, detectors, metrics_by_entity, fitted_on, evaluation, info, rows_per_day)
        with tempfile.TemporaryDirectory() as folder:  # FeatureSpec, scaler, threshold per entity, browsable
            bundle.save(folder)
            mlflow.log_artifacts(folder, "model")
        version = registry.register_bundle(bundle, run_id, tags) if register else None
    result = {
        "model": model,
        "run_id": run_id,
        "version": version,
        "summary": summary,
        "evaluation": evaluation,
        "config_source": config_source,
    }
    if version and promote_first and registry.alias_version(model, registry.CHAMPION) is None:
        registry.promote(model, version)
        result["promoted"] = True
    return result


def _summary(evaluation: dict[str, dict[str, Any]]) -> dict[str, float]:
    keys = {k for e in evaluation.values() for k, v in e.items() if isinstance(v, float)}
    out = {}
    for k in sorted(keys):
        vals = [e[k] for e in evaluation.values() if isinstance(e.get(k), float)]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--retrain" in argv:  # the older spelling of `python -m train.retrain`, kept for submitted jobs
        return retrain_main([a for a in argv if a != "--retrain"])
    parser = argparse.ArgumentParser(prog="python -m train.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=DETECTOR_KINDS, required=True)
    parser.add_argument("--data")
    parser.add_argument("--source", help="a Prometheus source config (YAML): learn from its history instead of --data")
    parser.add_argument("--since", default="6h", help="with --source: how much history to learn from (e.g. 6h)")
    parser.add_argument("--entities")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    entities = args.entities.split(",") if args.entities else None
    overrides = parse_sets(args.set)
    if args.epochs:
        overrides["epochs"] = args.epochs
    result = train_model(
        args.model,
        args.data,
        entities,
        overrides,
        num_workers=args.num_workers,
        progress=print,
        source=args.source,
        since=args.since,
    )
    print(json.dumps({k: result[k] for k in ("model", "version", "run_id", "summary")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
