"""The retraining job: train a challenger on recent served data, compare it with the champion on the
same recent window, register it, and promote it only if it is better by a margin.

This module is the one home of retraining's logic and entry point. The drift monitors' trigger
(`monitoring/trigger.py`) submits its command (`train.jobs.retrain_entrypoint`) through Ray's job
submission API; a person runs the same one:

    ray job submit -- python -m train.retrain --model autoencoder --entities asd/omi-2

(`python -m train.pipeline --model M --retrain ...`, the older spelling, forwards here.)

Recent data is what serving saw (`detect.state` observations, in arrival order); with `since_id`
(the first row of the drifted window, passed by the monitor) only what came after the drift began.
Per entity, the older part (`fit_fraction`, default 60%) trains the challenger and the newer part
is the evaluation window, which neither model has learned from. Both models score the whole recent series (so windows
have their context) and are compared on the evaluation window:

- with feedback labels of both classes in it: PR-AUC (F1 at each model's own threshold is reported);
- otherwise (no labels, or only normal ones, which is what a drifted but healthy fleet produces):
  specificity, 1 - the share of rows the model flags, over the rows not labelled as incidents.

The challenger is promoted when, averaged over the retrained entities, its PR-AUC is at least
(1 + margin) times the champion's, or its specificity (a rate) is at least `margin` higher in
absolute terms (margin default 0.02: 2%, or 2 points of specificity). Entities without enough recent data keep the
champion's detector inside the challenger version. The decision and its figures are logged to
MLflow (tags on the run and the version) and stored in `detect.state` for `/v1/models`.
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
from typing import Any

import mlflow
import numpy as np

from detect import metrics as M
from detect.bundle import ModelBundle
from detect.drift import drift_reference
from detect.kinds import DETECTOR_KINDS
from detect.state import ServingStore
from train import registry
from train.jobs import init_ray
from train.kinds import export_graphs, kind_named

log = logging.getLogger(__name__)

MIN_ROWS = 300  # fewest recent rows of an entity worth retraining on


def evaluate_window(scores: np.ndarray, threshold: float, labels: np.ndarray) -> dict[str, Any]:
    """Figures of one model on the evaluation window; labels: 1, 0 or -1 (no feedback)."""
    known = labels >= 0
    flags = scores >= threshold
    out: dict[str, Any] = {"rows": int(len(scores)), "labelled": int(known.sum()), "alert_rate": float(flags.mean())}
    y = labels[known]
    if known.any() and 0 < y.sum() < len(y):
        out["metric"] = "pr_auc"
        out["pr_auc"] = M.pr_auc(y, scores[known])
        out["f1"] = M.f1_at(y, scores[known], threshold)
        out["value"] = out["pr_auc"]
    else:
        normal = labels != 1
        out["metric"] = "specificity"
        out["value"] = float(1.0 - flags[normal].mean()) if normal.any() else None
    return out


def _fit_challenger(
    model: str, champion: Any, rows: np.ndarray, labels: np.ndarray, metrics: list[str], options: dict[str, Any]
) -> Any:
    kind = kind_named(model)
    overrides = kind.checked_config({"epochs": options["epochs"]} if options.get("epochs") else {})
    det = kind.new(champion.config, **overrides)
    return kind.fit_on_ray(det, rows, labels, metrics, cpus_per_worker=options.get("cpus_per_worker"))


def retrain(
    model: str,
    entities: list[str] | None = None,
    margin: float = 0.02,
    fit_fraction: float = 0.6,
    recent_rows: int = 5000,
    since_id: int | None = None,
    epochs: int | None = None,
    cpus_per_worker: float | None = None,
    job_id: str | None = None,
    progress: Callable[[str], None] = lambda m: log.info(m),
) -> dict[str, Any]:
    """Train, compare, register, and promote or keep; returns the decision with its figures."""
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    store = ServingStore()
    champion, champion_version = registry.load_bundle(model, registry.CHAMPION)
    observed = store.observed_entities(model)
    wanted = entities or sorted(observed)
    unknown = [e for e in wanted if e not in champion.detectors]
    if unknown:
        raise ValueError(
            f"{model} champion v{champion_version} has no entity {unknown}; it serves {sorted(champion.detectors)}"
        )
    init_ray()
    registry.setup()
    detectors = dict(champion.detectors)
    references, reference_scores = dict(champion.references), dict(champion.reference_scores)
    graphs = {e: champion.graphs[e] for e in champion.graphs}
    figures: dict[str, Any] = {}
    with mlflow.start_run(run_name=f"retrain-{model}") as run:
        mlflow.set_tags(
            {"raywatch.model": model, "raywatch.retrain.job_id": job_id or "", "raywatch.champion": champion_version}
        )
        mlflow.log_params(
            {"model": model, "entities": ",".join(wanted), "margin": margin, "fit_fraction": fit_fraction}
        )
        for entity in wanted:
            obs = store.observations(model, entity, after_id=max((since_id or 0) - 1, 0), limit=recent_rows)
            n = len(obs["ids"])
            if n < MIN_ROWS:
                figures[entity] = {"skipped": f"{n} recent rows (< {MIN_ROWS})"}
                progress(f"{entity}: skipped, {n} recent rows")
                continue
            rows, labels = obs["values"], store.labels(entity, obs["timestamps"])
            cut = int(n * fit_fraction)
            old = champion.detectors[entity]
            t0 = time.perf_counter()
            try:
                new = _fit_challenger(
                    model,
                    old,
                    rows[:cut],
                    labels[:cut],
                    champion.metrics[entity],
                    {"epochs": epochs, "cpus_per_worker": cpus_per_worker},
                )
            except ValueError as exc:
                figures[entity] = {"skipped": str(exc)}
                progress(f"{entity}: skipped, {exc}")
                continue
            champ_fig = evaluate_window(old.score(rows)[cut:], old.threshold_, labels[cut:])
            chal_fig = evaluate_window(new.score(rows)[cut:], new.threshold_, labels[cut:])
            figures[entity] = {
                "champion": champ_fig,
                "challenger": chal_fig,
                "fit_rows": cut,
                "fit_seconds": round(time.perf_counter() - t0, 1),
            }
            detectors[entity] = new
            references[entity], reference_scores[entity] = drift_reference(new, rows[:cut])
            graphs[entity] = export_graphs(new)
            for side, fig in (("champion", champ_fig), ("challenger", chal_fig)):
                mlflow.log_metrics({f"{entity}/{side}_{k}": v for k, v in fig.items() if isinstance(v, float)})
            progress(
                f"{entity}: {champ_fig['metric']} champion {champ_fig['value']:.3f}, challenger {chal_fig['value']:.3f}"
            )
        compared = [f for f in figures.values() if "challenger" in f and f["champion"]["value"] is not None]
        if not compared:
            skipped = "; ".join(f"{e}: {f['skipped']}" for e, f in figures.items() if "skipped" in f)
            decision = {
                "promoted": False,
                "reason": f"no challenger trained ({skipped or 'no recent data'})",
                "challenger": None,
            }
        else:
            champ = float(np.mean([f["champion"]["value"] for f in compared]))
            chal = float(np.mean([f["challenger"]["value"] for f in compared]))
            metric = compared[0]["champion"]["metric"]
            # PR-AUC: a relative margin; specificity is a rate near 0 or 1, so its margin is in points
            if metric == "specificity":
                better = chal >= champ + margin
            else:
                better = chal >= champ * (1 + margin) and chal > champ
            reason = (
                f"challenger {metric} {chal:.3f} vs champion {champ:.3f}: "
                + ("better" if better else "not better")
                + f" by the {margin:.0%} margin"
            )
            bundle = ModelBundle(
                model,
                detectors,
                dict(champion.metrics),
                references,
                {"retrain": figures},
                info={
                    "run_id": run.info.run_id,
                    "variant": "fp32",
                    "retrained_from": champion_version,
                    "job_id": job_id,
                    "trained_at": time.time(),
                    "config": champion.info.get("config", {}),
                },
                graphs=graphs,
                reference_scores=reference_scores,
            )
            with tempfile.TemporaryDirectory() as folder:
                bundle.save(folder)
                mlflow.log_artifacts(folder, "model")
            tags = {
                "raywatch.retrain.decision": "promoted" if better else "kept champion",
                "retrained_from": champion_version,
            }
            version = registry.register_bundle(bundle, run.info.run_id, tags)
            registry.set_alias(model, registry.CHALLENGER, version)
            if better:
                registry.promote(model, version)
            decision = {
                "promoted": better,
                "reason": reason,
                "challenger": version,
                "metric": metric,
                "champion_value": champ,
                "challenger_value": chal,
            }
        mlflow.set_tags(
            {"raywatch.retrain.promoted": str(decision["promoted"]), "raywatch.retrain.reason": decision["reason"]}
        )
        mlflow.log_dict(figures, "retrain_figures.json")
    decision.update(
        model=model, champion_before=champion_version, margin=margin, entities=figures, run_id=run.info.run_id
    )
    decision["champion_after"] = registry.alias_version(model, registry.CHAMPION)
    store.add_decision(
        model,
        job_id,
        decision["promoted"],
        champion_version,
        decision.get("challenger"),
        decision["reason"],
        {k: v for k, v in decision.items() if k not in ("reason", "promoted", "challenger")},
    )
    progress(("promoted" if decision["promoted"] else "kept champion") + f": {decision['reason']}")
    return decision


def job_id_from_env() -> str | None:
    """The Ray job's submission id when this runs as one (Ray passes it in the job config's metadata)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=DETECTOR_KINDS, required=True)
    parser.add_argument("--entities", help="comma-separated entities (default: every one serving observed)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--margin", type=float, default=0.02, help="relative improvement needed to promote")
    parser.add_argument("--recent-rows", type=int, default=5000, help="newest served rows per entity to use")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per Ray Train worker (fractional allowed)")
    parser.add_argument("--since-id", type=int, help="learn only from served rows from this observation id on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    decision = retrain(
        args.model,
        args.entities.split(",") if args.entities else None,
        margin=args.margin,
        recent_rows=args.recent_rows,
        since_id=args.since_id,
        epochs=args.epochs,
        cpus_per_worker=args.cpus_per_worker,
        job_id=job_id_from_env(),
        progress=print,
    )
    print(json.dumps({k: v for k, v in decision.items() if k != "entities"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
