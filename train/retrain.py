"""The retraining job: a challenger from recent served rows, promoted only on a significant win at equal budget.

It trains a challenger on the recent served rows believed normal, compares it with the champion at the
same alert budget on incidents in the recent window, registers it, and promotes it only on a win that a
paired test finds significant.

This module is the one home of retraining's logic and entry point. The drift monitors' trigger
(`monitoring/trigger.py`) submits its command (`train.jobs.retrain_entrypoint`) through Ray's job
submission API; a person runs the same one:

    ray job submit -- python -m train.retrain --model autoencoder --entities asd/omi-2

(`python -m train.pipeline --model M --retrain ...`, the older spelling, forwards here.)

Recent data is what serving saw (`detect.state` observations, in arrival order); with `since_id`
(the first row of the drifted window, passed by the monitor) only what came after the drift began.
Per entity, the older part (`fit_fraction`, default 60%) trains the challenger and the newer part
is the evaluation window, which neither model has learned from. The rule is `train/promotion.py`'s:

- the challenger learns only from rows believed normal: rows labelled as incidents and rows the champion
  flags are left out (for the label-learning ensemble: its labels, incidents learnt as incidents);
- the challenger is fitted afresh; with `--warm-start` the autoencoder and the LSTM continue from the
  champion's weights and spreads, with the recent rows' means (`SequenceDetector.prepare_continued`).
  Measured in `benchmarks/replay.py` on smd/machine-1-6 (README, "Does the loop help?"), a warm-started
  challenger beat the champion on injected incidents and was promoted, and the served PR-AUC fell from
  0.851 to 0.384: hence opt-in;
- each model's threshold is set to flag the same share (`budget`, default 1%) of the evaluation window's
  rows not labelled as incidents, so that neither wins by being quiet;
- both are scored on the window's labelled incidents when there are enough for the test, otherwise on
  incidents in the synthetic generator's shapes injected into copies of the window's real rows; per
  incident, the share of its rows flagged at the budget;
- promoted when a one-sided Wilcoxon signed-rank test over those paired incidents (all entities) gives
  p < alpha (default 0.05) and the mean gain is at least `margin` (default 0.02); otherwise kept;
- new entities served by a fleet model (the monitors' graduation jobs, up to `graduates_per_job` of them
  at once) are each judged alone by that test against the fleet model (`decide_each`): the version holds
  the own models of the winners only, and the others stay on the fleet model;
- a kept champion that floods on an entity (at its own threshold it flags half the evaluation window's
  normal rows or more: a persistent shift) is still kept; the decision names the entities (`flooding`)
  and its reason says so;
- with `--recalibrate` (`recalibrate_kept`; off by default) a kept champion is recalibrated
  (`recalibrate`): on each entity with a model of its own, its operational threshold (the DSPOT it serves,
  and its stored threshold) is fitted again on its scores of every recent row believed normal (those the
  challenger may learn from, in time order), and that version, the same networks, is promoted as a
  challenger would be (`promote_via`). Offline it lifted the F1 after the replay's shift on the shipped
  entities and on held-out synthetic fleets; through the platform it lifted two SMD machines and cut
  smd/machine-1-6's from 0.946 to 0.271, where unlabelled incidents in the recent rows raised the bar
  (docs/experiments/recalibration-dspot.md): hence opt-in;
- a challenger that never alerts on an incident, or alerts on half the normal rows or more, at the
  threshold it would serve with (or whose tied scores cannot be held to the budget) is refused on that
  entity, which keeps the champion's detector inside the challenger version, as an entity without
  enough recent data does.

The decision and its figures (test, p-value, budget, evidence, refusals) are logged to MLflow (tags on
the run and the version) and stored in `detect.state` for `/v1/models`.
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
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np

from detect.drift import RETRAIN_MIN_ROWS
from detect.fleet import is_fleet_key
from detect.kinds import DETECTOR_KINDS
from detect.state import ServingStore
from detect.thresholds import threshold_from_state
from train import registry
from train.assemble import fitted_bundle, with_recalibrated, with_unchanged_entities
from train.jobs import init_ray
from train.kinds import kind_named
from train.promotion import (
    TEST,
    PromotionRule,
    compare_entity,
    decide,
    decide_each,
    flooding,
    suspected_anomalies,
    training_rows,
)

log = logging.getLogger(__name__)


def fit_challengers(model: str, recent: dict[str, Recent], options: dict[str, Any]) -> dict[str, Any | ValueError]:
    """Each entity's challenger, a new detector configured as the champion's detector that serves it, fitted
    on its rows believed normal (`DetectorKind.fit_many_on_ray`: one Ray Train run for a graduation job's
    new entities, where the kind can); with `warm_start`, each continues from the champion's detector. An
    entity that cannot be fitted gets the ValueError that says why."""
    kind = kind_named(model)
    overrides = kind.checked_config({"epochs": options["epochs"]} if options.get("epochs") else {})
    fits = {
        entity: (kind.new(data.champion.config, **overrides), data.fit_rows, data.fit_labels, data.metrics)
        for entity, data in recent.items()
    }
    start_from = {entity: data.champion for entity, data in recent.items()} if options.get("warm_start") else None
    return kind.fit_many_on_ray(fits, start_from, cpus_per_worker=options.get("cpus_per_worker"))


@dataclass(frozen=True)
class RecentWindow:
    """Which served rows a job reads per entity, and where it splits them: the older `fit_fraction`
    trains the challenger, the newer part is the evaluation window."""

    fit_fraction: float = 0.6
    recent_rows: int = 5000
    since_id: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.fit_fraction < 1:
            raise ValueError(f"fit_fraction must be in (0, 1), got {self.fit_fraction}")


def retrain(
    model: str,
    entities: list[str] | None = None,
    margin: float = 0.02,
    fit_fraction: float = 0.6,
    recent_rows: int = 5000,
    since_id: int | None = None,
    epochs: int | None = None,
    cpus_per_worker: float | None = None,
    warm_start: bool = False,
    job_id: str | None = None,
    alpha: float = 0.05,
    budget: float | None = None,
    promote_via: str = "rollout",
    recalibrate_kept: bool = False,
    progress: Callable[[str], None] = lambda m: log.info(m),
) -> dict[str, Any]:
    """Train, compare, register, and promote or keep; returns the decision with its figures. A promotion
    goes through a canary rollout (`promote_via="rollout"`, serve/rollout.py) or at once ("direct"). With
    `recalibrate_kept`, a kept champion's threshold is fitted again on the recent rows (`recalibrate`)."""
    window = RecentWindow(fit_fraction, recent_rows, since_id)
    rule = PromotionRule(margin=margin, alpha=alpha, **({"budget": budget} if budget is not None else {}))
    fit_options = {"epochs": epochs, "cpus_per_worker": cpus_per_worker, "warm_start": warm_start}
    store = ServingStore()
    champion, champion_version = registry.load_bundle(model, registry.CHAMPION)
    current = entity_models(champion, champion_version, store, model, entities)
    init_ray()
    registry.setup()
    with mlflow.start_run(run_name=f"retrain-{model}") as run:
        log_job(model, job_id, champion_version, list(current), window, rule)
        figures: dict[str, Any] = {}
        fitted: dict[str, tuple[Any, np.ndarray]] = {}
        normal_scores: dict[str, np.ndarray] = {}  # per entity with a model of its own: the champion's scores
        recent: dict[str, Recent] = {}
        for entity, key in current.items():
            data = recent_data(model, champion, key, entity, store, window, rule)
            if isinstance(data, Recent):
                recent[entity] = data
            else:
                figures[entity] = {"skipped": data}
                progress(f"{entity}: skipped, {data}")
        t0 = time.perf_counter()
        if recent:
            progress(f"fitting {len(recent)} challenger(s) on Ray Train")
        challengers = fit_challengers(model, recent, fit_options) if recent else {}
        fit_seconds = round((time.perf_counter() - t0) / max(len(recent), 1), 1)
        for entity, data in recent.items():
            figures[entity], new = challenge(entity, data, challengers[entity], rule, fit_seconds, progress)
            if new is not None:
                fitted[entity] = new
            if current[entity] == entity:
                normal_scores[entity] = data.normal_scores
        decision = decide_and_register(
            model, champion, champion_version, current, figures, fitted, rule, run.info.run_id, job_id
        )
        if decision["promoted"]:
            decision["reason"] += promote(model, decision["challenger"], promote_via)
        elif recalibrate_kept:
            recalibrated = recalibrate(model, champion, champion_version, normal_scores, run.info.run_id, job_id)
            if recalibrated:
                decision |= recalibrated
                decision["reason"] += "; " + recalibration_reason(recalibrated, normal_scores)
                decision["reason"] += promote(model, recalibrated["recalibrated_version"], promote_via)
        log_decision(decision, figures, rule)
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


def entity_models(
    champion: Any, champion_version: str, store: ServingStore, model: str, entities: list[str] | None
) -> dict[str, str]:
    """Each entity to retrain (`entities`, or every one serving observed) -> the key of its model in the
    champion: its own, or, for a new entity served by a fleet model, that fleet model (its own model is
    then fitted and compared with the fleet model)."""
    wanted = [e for e in (entities or sorted(store.observed_entities(model))) if not is_fleet_key(e)]
    newcomers = {e: fleet_model_of(champion, store, model, e) for e in wanted if e not in champion.detectors}
    unknown = [e for e, key in newcomers.items() if key is None]
    if unknown:
        raise ValueError(
            f"{model} champion v{champion_version} has no entity {unknown} and no fleet model for its served rows; "
            f"it serves {sorted(champion.detectors)}"
        )
    return {e: newcomers.get(e) or e for e in wanted}


@dataclass(frozen=True)
class Recent:
    """One entity's recent served rows as a job uses them: `rows[:cut]` for fitting (of which `fit_rows`
    and `fit_labels` are believed normal), `rows[cut:]` the evaluation window, and the champion's detector
    that serves it, with its scores of every recent row believed normal in time order (`normal_scores`,
    what `recalibrate` fits its threshold on)."""

    champion: Any
    metrics: list[str]
    rows: np.ndarray
    labels: np.ndarray
    cut: int
    fit_rows: np.ndarray
    fit_labels: np.ndarray | None
    normal_scores: np.ndarray


def recent_data(
    model: str,
    champion: Any,
    key: str,
    entity: str,
    store: ServingStore,
    window: RecentWindow,
    rule: PromotionRule,
) -> Recent | str:
    """`entity`'s recent rows, as the champion's detector `key` sees them, or why it is skipped."""
    after_id = max((window.since_id or 0) - 1, 0)
    obs = store.observations(model, entity, after_id=after_id, limit=window.recent_rows)
    n = len(obs["ids"])
    if n < RETRAIN_MIN_ROWS:
        return f"{n} recent rows (< {RETRAIN_MIN_ROWS})"
    # only authenticated feedback steers what is learnt and what is promoted
    rows, labels = obs["values"], store.labels(entity, obs["timestamps"], trusted_only=True)
    cut = int(n * window.fit_fraction)
    old = champion.detectors[key]
    champion_scores = np.asarray(old.score(rows), dtype=np.float64)
    suspected = suspected_anomalies(champion_scores, old.threshold_, labels, rule.max_suspect_share)
    fit_rows, fit_labels = training_rows(
        rows[:cut], labels[:cut], suspected[:cut], kind_named(model).learns_from_labels
    )
    return Recent(old, champion.metrics[key], rows, labels, cut, fit_rows, fit_labels, champion_scores[~suspected])


def challenge(
    entity: str,
    data: Recent,
    new: Any | ValueError,
    rule: PromotionRule,
    fit_seconds: float,
    progress: Callable[[str], None],
) -> tuple[dict[str, Any], tuple[Any, np.ndarray] | None]:
    """One entity's challenger `new` (or the ValueError that kept it from being fitted) compared with the
    champion's detector on the evaluation window: (its figures, (challenger, the rows it learnt from) or
    None when it was skipped or refused)."""
    try:
        if isinstance(new, ValueError):
            raise new
        compared = compare_entity(data.champion, new, data.rows, data.labels, data.cut, rule)
    except ValueError as exc:
        progress(f"{entity}: skipped, {exc}")
        return {"skipped": str(exc)}, None
    for side in ("champion", "challenger"):
        mlflow.log_metrics({f"{entity}/{side}_{k}": v for k, v in compared[side].items() if isinstance(v, float)})
    progress(
        f"{entity}: {compared['incidents']} {compared['evidence']} incidents, share of their rows flagged at "
        f"the budget: champion {compared['champion']['value']:.3f}, challenger {compared['challenger']['value']:.3f}"
        + (f"; refused: {compared['refused']}" if compared["refused"] else "")
    )
    figures = compared | {
        "fit_rows": len(data.fit_rows),
        "withheld_rows": data.cut - len(data.fit_rows),  # labelled incidents and rows the champion flagged
        "fit_seconds": fit_seconds,  # its share of the job's fitting (fitted together where the kind can)
    }
    # a refused challenger leaves the champion's detector in the version
    return figures, None if compared["refused"] else (new, data.fit_rows)


def decide_and_register(
    model: str,
    champion: Any,
    champion_version: str,
    current: dict[str, str],
    figures: dict[str, Any],
    fitted: dict[str, tuple[Any, np.ndarray]],
    rule: PromotionRule,
    run_id: str,
    job_id: str | None,
) -> dict[str, Any]:
    """The rule's decision over every compared entity, or over each one alone where all are new entities
    served by a fleet model (a graduation job, `decide_each`); the challenger version (its fitted detectors,
    only the winners' in a graduation that promotes; the champion's elsewhere) registered whatever the
    decision. The `challenger` alias is left where it was: serving loads what it points to into every
    replica (seconds of slow requests on a small machine, and the memory of a second version), an
    operator's A/B or shadow split or a running canary follows it, and a challenger the rule did not promote
    has no place there. A promoted one becomes the challenger through its canary rollout (`promote`); a kept
    one can still be shadowed by its version (`POST /v1/admin/traffic` with `challenger_version`)."""
    compared = {e: f for e, f in figures.items() if "challenger" in f}
    if not compared:
        skipped = "; ".join(f"{e}: {f['skipped']}" for e, f in figures.items() if "skipped" in f)
        return {
            "promoted": False,
            "reason": f"no challenger trained ({skipped or 'no recent data'})",
            "challenger": None,
        }
    graduation = all(current[e] != e for e in compared)  # new entities, each judged against its fleet model
    decision = decide_each(compared, rule) if graduation else decide(compared, rule)
    if graduation and decision["promoted"]:  # only the winners' own models go into the version
        fitted = {e: fitted[e] for e in decision["graduated"]}
    info = {
        "run_id": run_id,
        "retrained_from": champion_version,
        "job_id": job_id,
        "config": champion.info.get("config", {}),
    }
    detectors = {entity: det for entity, (det, _) in fitted.items()}
    metrics = {entity: champion.metrics[current[entity]] for entity in fitted}
    fitted_on = {entity: rows for entity, (_, rows) in fitted.items()}
    rows_per_day = {entity: champion.rows_per_day(entity) for entity in fitted}  # the series' rate, as recorded
    bundle = with_unchanged_entities(
        fitted_bundle(model, detectors, metrics, fitted_on, {"retrain": figures}, info, rows_per_day), champion
    )
    with tempfile.TemporaryDirectory() as folder:
        bundle.save(folder)
        mlflow.log_artifacts(folder, "model")
    tags = {
        "raywatch.retrain.decision": "promoted" if decision["promoted"] else "kept champion",
        "raywatch.retrain.p_value": str(decision["p_value"]),
        "retrained_from": champion_version,
    }
    decision["challenger"] = registry.register_bundle(bundle, run_id, tags)
    flooded = {e: f for e, f in compared.items() if flooding(f, rule)}
    if flooded and not decision["promoted"]:
        decision["flooding"] = sorted(flooded)
        decision["reason"] += "; " + flooding_notice(flooded)
    return decision


def recalibrate(
    model: str,
    champion: Any,
    champion_version: str,
    normal_scores: dict[str, np.ndarray],
    run_id: str,
    job_id: str | None,
) -> dict[str, Any]:
    """Where the champion is kept: its detectors' operational thresholds fitted again on their scores of
    the recent rows believed normal (`DetectorKind.recalibrated`), registered as a new version (the
    champion's networks, graphs and drift references) for `promote`. The served threshold was fitted on the
    rows the champion was trained on; after the change that made the monitors drift, those say little
    about where its tail now lies. What the decision gains: `recalibrated` (entities),
    `recalibrated_version` and `recalibrated_bars` (per entity, the bar its next served row is judged
    against, `before` and `after`: `served_bar`); nothing where no entity could be recalibrated, or where the
    champion is a compressed variant (its graphs score on their own scale, not that of the FP32 detectors
    scored here)."""
    if champion.variant != "fp32":
        return {}
    kind = kind_named(model)
    detectors = {
        entity: new
        for entity, scores in normal_scores.items()
        if (new := kind.recalibrated(champion.detectors[entity], scores)) is not None
    }
    if not detectors:
        return {}
    info = {"recalibrated_from": champion_version, "recalibrated": sorted(detectors), "job_id": job_id}
    tags = {
        "raywatch.retrain.decision": "champion recalibrated",
        "recalibrated_from": champion_version,
        "retrained_from": champion_version,  # its lineage (`registry.lineage`: derived_from)
    }
    version = registry.register_bundle(with_recalibrated(champion, detectors, info), run_id, tags)
    bars = {
        entity: {"before": served_bar(champion.detectors[entity]), "after": served_bar(new)}
        for entity, new in sorted(detectors.items())
    }
    return {"recalibrated": sorted(detectors), "recalibrated_version": version, "recalibrated_bars": bars}


def served_bar(det: Any) -> float:
    """Where a version starts judging an entity's served rows: the threshold of the DSPOT saved with its
    detector (`served_spot`), or its stored threshold where it has none. Whether a recalibration raised the
    bar (fewer alerts) or lowered it (more) is what its decision records."""
    state = det.served_spot()
    return float(threshold_from_state(state).threshold_ if state else det.threshold_)


def recalibration_reason(recalibrated: dict[str, Any], normal_scores: dict[str, np.ndarray]) -> str:
    bars = recalibrated["recalibrated_bars"]
    rows = ", ".join(
        f"{e} {len(normal_scores[e])} rows, bar {bars[e]['before']:.4g} -> {bars[e]['after']:.4g}"
        for e in recalibrated["recalibrated"]
    )
    return (
        "the champion's threshold recalibrated on its scores of the recent rows believed normal "
        f"({rows}) as v{recalibrated['recalibrated_version']}: the same model, alerting where they put its tail"
    )


def promote(model: str, version: str, promote_via: str) -> str:
    """Hand a promoted version to the serving app's canary rollout, or make it champion at once; what to add
    to the decision's reason."""
    if promote_via == "rollout":
        try:
            registry.request_rollout(model, version)
        except registry.RolloutBusy as busy:  # a running canary keeps its traffic; an operator decides
            return f"; not rolled out: {busy}; once it ends: raywatch rollout {model} {version}"
        return (
            "; canary rollout requested (the serving app starts it, or refuses it with the reason: raywatch models;"
            f" its steps: raywatch rollout {model})"
        )
    registry.promote(model, version)
    return ""


def log_job(
    model: str,
    job_id: str | None,
    champion_version: str,
    entities: list[str],
    window: RecentWindow,
    rule: PromotionRule,
) -> None:
    mlflow.set_tags(
        {"raywatch.model": model, "raywatch.retrain.job_id": job_id or "", "raywatch.champion": champion_version}
    )
    mlflow.log_params(
        {
            "model": model,
            "entities": ",".join(entities),
            "margin": rule.margin,
            "fit_fraction": window.fit_fraction,
            "alpha": rule.alpha,
            "budget": rule.budget,
        }
    )


def log_decision(decision: dict[str, Any], figures: dict[str, Any], rule: PromotionRule) -> None:
    mlflow.set_tags(
        {
            "raywatch.retrain.promoted": str(decision["promoted"]),
            "raywatch.retrain.reason": decision["reason"],
            "raywatch.retrain.test": TEST,
            "raywatch.retrain.p_value": str(decision.get("p_value")),
            "raywatch.retrain.alpha": str(rule.alpha),
            "raywatch.retrain.budget": str(rule.budget),
            "raywatch.retrain.evidence": str(decision.get("evidence")),
        }
    )
    mlflow.log_dict(figures, "retrain_figures.json")


def flooding_notice(flooded: dict[str, dict[str, Any]]) -> str:
    """What a kept champion that floods (`train.promotion.flooding`) means for the operator."""
    rates = ", ".join(f"{e} {f['champion']['alert_rate']:.0%}" for e, f in sorted(flooded.items()))
    return (
        f"the kept champion floods (share of the recent normal rows it flags at its own threshold: {rates}); "
        "no challenger beat it at the same alert budget, so its alerts there say little until a challenger "
        "does or its served SPOT threshold catches up"
    )


def fleet_model_of(champion: Any, store: ServingStore, model: str, entity: str) -> str | None:
    """The key of the champion's fleet model that served `entity` (one with the width of its stored rows;
    None when there is none, or more than one of that width)."""
    rows = store.observations(model, entity, limit=1)["values"]
    if not len(rows):
        return None
    width = np.asarray(rows).shape[1]
    keys = [k for k in champion.detectors if is_fleet_key(k) and len(champion.metrics[k]) == width]
    return keys[0] if len(keys) == 1 else None


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
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="the autoencoder and the LSTM continue from the champion's weights (see the README: it can "
        "win on injected incidents and lose on real ones)",
    )
    parser.add_argument(
        "--margin", type=float, default=0.02, help="smallest mean gain in the share of incident rows flagged to promote"
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="level of the paired test a promotion must pass")
    parser.add_argument("--budget", type=float, help="share of non-incident rows each model flags (default 0.01)")
    parser.add_argument("--recent-rows", type=int, default=5000, help="newest served rows per entity to use")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per Ray Train worker (fractional allowed)")
    parser.add_argument("--since-id", type=int, help="learn only from served rows from this observation id on")
    parser.add_argument(
        "--promote-via",
        choices=["rollout", "direct"],
        default="rollout",
        help="a promoted challenger goes through a canary rollout (default) or becomes champion at once",
    )
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="where the champion is kept, fit its threshold again on its scores of the recent rows believed "
        "normal and promote that version (see the README: it helped two replayed machines and hurt a third)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    decision = retrain(
        args.model,
        args.entities.split(",") if args.entities else None,
        margin=args.margin,
        recent_rows=args.recent_rows,
        since_id=args.since_id,
        epochs=args.epochs,
        warm_start=args.warm_start,
        cpus_per_worker=args.cpus_per_worker,
        job_id=job_id_from_env(),
        alpha=args.alpha,
        budget=args.budget,
        promote_via=args.promote_via,
        recalibrate_kept=args.recalibrate,
        progress=print,
    )
    print(json.dumps({k: v for k, v in decision.items() if k != "entities"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
