"""The retraining job's promotion rule: a challenger replaces the champion only when it detects incidents
better than the champion at the same alert budget, by a win that a paired test finds significant.

Why not "fewer alerts wins": without labels, a model that flags fewer rows looks more specific, so a
challenger that never alerts would always win. Here neither model can win by being quiet or loud:

1. **What the challenger learns from.** The recent rows believed normal: neither labelled as incidents
   nor flagged by the champion at the threshold it serves with (`suspected_anomalies`, `training_rows`),
   so that incidents are not learnt as normal.
2. **The same alert budget.** Each model's threshold is the quantile of its own scores on the evaluation
   window's rows not labelled as incidents that flags `budget` of them (default 1%, the share the
   detectors' stored thresholds flag on their training data: `Detector.threshold_quantile`). The
   champion's own flags stay in this set: leaving them out would drop only the champion's highest
   scores, lower its threshold and let it flag more than the budget, a head start the challenger lacks.
3. **Incidents to find.** The labelled incidents of the evaluation window when there are enough for the
   test to reach its level (`PromotionRule.min_incidents`); otherwise incidents in the synthetic
   generator's shapes (`detect.synthetic.inject_incidents`) injected into copies of the evaluation window's
   real rows. Both models score the same rows. Per incident, the figure is the share of its rows flagged
   at the model's budget threshold.
4. **A paired test.** One-sided Wilcoxon signed-rank test (scipy) of challenger against champion over
   the incidents of every compared entity. Promoted when p < alpha (0.05) and the mean gain is at least
   `margin`; otherwise the champion is kept, with the reason and the figures.
   A champion that **floods** (`flooding`: at the threshold it serves with it flags
   `max_normal_alert_rate` or more of the recent normal rows, the bound that refuses an always-alerting
   challenger; a persistent shift leaves a static model there) needs the same win: the flood does not
   lower the bar. The decision says that it floods (`train/retrain.py`).
5. **Refusals.** A challenger is refused on an entity, whatever the test says, when at the threshold it
   would serve with it flags no incident row (it never alerts), flags `max_normal_alert_rate` or more of
   the rows not labelled as incidents (it always alerts), or when its scores tie so that no threshold holds it to
   the budget. The champion's detector stays on a refused entity.

Pure numpy and scipy over anything with `score(X)` and `threshold_` (every raywatch detector): no Ray,
no MLflow, so the rule is tested without a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy import stats

from detect import metrics as M
from detect.base import Detector
from detect.fleet import named
from detect.synthetic import inject_incidents

METRIC = "incident_recall_at_budget"  # the per-incident figure both models are compared on
TEST = "one-sided Wilcoxon signed-rank over paired incidents"
ROWS_PER_INJECTED = 500  # one injected incident per this many evaluation rows in each copy (at least one)


class Scorer(Protocol):
    """What the rule needs of a model: scores per row (higher = more anomalous) and its serving threshold."""

    threshold_: float

    def score(self, X: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PromotionRule:
    """The rule's parameters; none is fitted to any entity."""

    budget: float = round(1 - Detector.threshold_quantile, 6)  # share of non-incident rows each model flags
    alpha: float = 0.05  # level of the paired test
    margin: float = 0.02  # smallest mean gain in per-incident recall worth a promotion
    injected: int = 30  # injected incidents per entity when the labels hold too few
    max_suspect_share: float = 0.1  # most of the recent rows the champion's flags may withhold from learning
    max_normal_alert_rate: float = 0.5  # at its own threshold: at or above this, a challenger always alerts
    max_budget_overshoot: float = 2.0  # flagging more than this x budget at the budget threshold: ties
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("budget", "alpha", "max_suspect_share", "max_normal_alert_rate"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.injected < self.min_incidents:
            raise ValueError(
                f"injected={self.injected} incidents cannot reach alpha={self.alpha} (need {self.min_incidents})"
            )

    @property
    def min_incidents(self) -> int:
        """Fewest paired incidents with which a one-sided signed-rank test can reach `alpha` at all
        (its smallest p-value is 0.5 ** n): fewer labelled ones than this, and incidents are injected."""
        return math.ceil(math.log(1 / self.alpha, 2))


def suspected_anomalies(
    champion_scores: np.ndarray, champion_threshold: float, labels: np.ndarray, max_share: float
) -> np.ndarray:
    """Rows not believed normal: labelled incidents (label 1) and the rows the champion flags.

    The champion's flags are capped at its `max_share` highest-scoring rows: past that its threshold no
    longer fits the recent data (a flood after a shift), and learning that shifted normal is what the
    retraining is for; its most anomalous rows are still withheld.
    """
    scores = np.asarray(champion_scores, dtype=np.float64)
    flagged = scores >= champion_threshold
    if flagged.mean() > max_share:
        flagged = scores >= np.quantile(scores, 1 - max_share, method="higher")
    return flagged | (np.asarray(labels) == 1)


def training_rows(
    rows: np.ndarray, labels: np.ndarray, suspected: np.ndarray, learns_from_labels: bool
) -> tuple[np.ndarray, np.ndarray]:
    """What the challenger learns from. A kind that learns normal behaviour from unlabelled rows gets only
    the rows believed normal, so that incidents are not learnt as normal. A kind that learns from labels
    keeps every row: it learns labelled incidents as incidents and ignores unlabelled rows, and its
    features need each row's history."""
    if learns_from_labels:
        return rows, labels
    keep = ~np.asarray(suspected, dtype=bool)
    return rows[keep], labels[keep]


def budget_threshold(normal_scores: np.ndarray, budget: float) -> float:
    """The threshold that flags `budget` of the given rows (a score itself, so at least one row)."""
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1 - budget, method="higher"))


def incident_recall(scores: np.ndarray, incident_labels: np.ndarray, threshold: float) -> np.ndarray:
    """Per incident (run of label 1), the share of its rows at or above the threshold."""
    return np.array([np.mean(scores[a:b] >= threshold) for a, b in M.segments(incident_labels)])


def paired_p_value(challenger: np.ndarray, champion: np.ndarray) -> float:
    """One-sided p-value that the challenger's per-incident figures exceed the champion's (Wilcoxon
    signed-rank, ties dropped); 1.0 when no incident tells the two apart."""
    if not np.any(np.asarray(challenger) != np.asarray(champion)):
        return 1.0
    return float(stats.wilcoxon(challenger, champion, alternative="greater", zero_method="wilcox").pvalue)


@dataclass
class Incidents:
    """Evaluation copies of the recent series and which of their rows are incidents."""

    source: str  # "labelled" or "injected"
    copies: list[tuple[np.ndarray, np.ndarray]]  # (eval-window rows, incident labels), in the window's frame


def incidents_for(window: np.ndarray, window_labels: np.ndarray, rule: PromotionRule) -> Incidents:
    """The window's labelled incidents when they are enough for the test, else injected ones."""
    labelled = (np.asarray(window_labels) == 1).astype(np.int8)
    if len(M.segments(labelled)) >= rule.min_incidents:
        return Incidents("labelled", [(window, labelled)])
    per_copy = max(1, len(window) // ROWS_PER_INJECTED)
    copies = [
        inject_incidents(window, per_copy, seed=rule.seed + k) for k in range(math.ceil(rule.injected / per_copy))
    ]
    return Incidents("injected", copies)


def _scores(model: Scorer, context: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The model's scores of the window's rows, computed with the rows before it as context."""
    return np.asarray(model.score(np.concatenate([context, window])), dtype=np.float64)[len(context) :]


def _model_figures(
    model: Scorer, normal_scores: np.ndarray, scored: Iterator[tuple[np.ndarray, np.ndarray]], rule: PromotionRule
) -> dict[str, Any]:
    """One model's figures: budget threshold, alert rates, per-incident recall at the budget and whether
    its own threshold flags any incident row."""
    threshold = budget_threshold(normal_scores, rule.budget)
    recall, own_hits = [], 0
    for scores, incident_labels in scored:
        recall.append(incident_recall(scores, incident_labels, threshold))
        own_hits += int(np.sum(scores[incident_labels == 1] >= model.threshold_))
    per_incident = np.concatenate(recall)
    return {
        "metric": METRIC,
        "value": float(per_incident.mean()),
        "budget_threshold": threshold,
        "budget_alert_rate": float(np.mean(normal_scores >= threshold)),
        "alert_rate": float(np.mean(normal_scores >= model.threshold_)),  # at its own (serving) threshold
        "incident_rows_flagged": own_hits,
        "per_incident": per_incident.round(4).tolist(),
    }


def refusal(challenger: dict[str, Any], rule: PromotionRule) -> str | None:
    """Why a challenger must not be promoted whatever the test says, or None."""
    if challenger["incident_rows_flagged"] == 0:
        return "never alerts: at its own threshold it flags no row of any incident"
    if challenger["alert_rate"] >= rule.max_normal_alert_rate:
        return f"always alerts: at its own threshold it flags {challenger['alert_rate']:.0%} of the normal rows"
    if challenger["budget_alert_rate"] > rule.max_budget_overshoot * rule.budget:
        return (
            f"always alerts at the budget: its scores tie, so its budget threshold flags "
            f"{challenger['budget_alert_rate']:.1%} of the normal rows (budget {rule.budget:.1%})"
        )
    return None


def compare_entity(
    champion: Scorer,
    challenger: Scorer,
    rows: np.ndarray,
    labels: np.ndarray,
    cut: int,
    rule: PromotionRule,
) -> dict[str, Any]:
    """Both models on one entity's evaluation window `rows[cut:]` (rows before it are context only)."""
    context, window = rows[:cut], rows[cut:]
    normal = np.asarray(labels[cut:]) != 1
    if not normal.any():
        raise ValueError("every row of the evaluation window is labelled as an incident: no budget can be set")
    incidents = incidents_for(window, labels[cut:], rule)
    figures: dict[str, Any] = {"evidence": incidents.source, "rows": int(len(window)), "normal_rows": int(normal.sum())}
    for side, model in (("champion", champion), ("challenger", challenger)):
        clean = _scores(model, context, window)
        scored = ((_scores(model, context, X), y) for X, y in incidents.copies)
        figures[side] = _model_figures(model, clean[normal], scored, rule)
        figures[side]["labelled"] = int((labels[cut:] >= 0).sum())
    figures["incidents"] = len(figures["champion"]["per_incident"])
    figures["refused"] = refusal(figures["challenger"], rule)
    return figures


def flooding(figures: dict[str, Any], rule: PromotionRule) -> bool:
    """Whether the champion, at the threshold it serves with, flags `max_normal_alert_rate` or more of the
    evaluation window's normal rows: the flood a persistent shift leaves, where its alerts tell nothing
    (the bound that refuses an always-alerting challenger)."""
    return figures["champion"]["alert_rate"] >= rule.max_normal_alert_rate


def rule_fields(rule: PromotionRule) -> dict[str, Any]:
    """What every decision states of the rule it was taken by."""
    return {"metric": METRIC, "test": TEST, "alpha": rule.alpha, "budget": rule.budget, "margin": rule.margin}


def decide(compared: dict[str, dict[str, Any]], rule: PromotionRule) -> dict[str, Any]:
    """Promote or keep, from every entity's `compare_entity` figures; the decision carries its evidence."""
    refused = {e: f["refused"] for e, f in compared.items() if f["refused"]}
    usable = [f for e, f in compared.items() if e not in refused]
    decision: dict[str, Any] = rule_fields(rule) | {"refused": refused}
    refusals = "; ".join(f"{e}: {why}" for e, why in refused.items())
    if not usable:
        return decision | {"promoted": False, "reason": f"challenger refused ({refusals})", "p_value": None}
    champion = np.concatenate([f["champion"]["per_incident"] for f in usable])
    challenger = np.concatenate([f["challenger"]["per_incident"] for f in usable])
    p_value, gain = paired_p_value(challenger, champion), float(np.mean(challenger - champion))
    promoted = p_value < rule.alpha and gain >= rule.margin
    evidence = "+".join(sorted({f["evidence"] for f in usable}))
    verdict = (
        "promoted"
        if promoted
        else f"champion kept: not significant at alpha {rule.alpha}"
        if p_value >= rule.alpha
        else f"champion kept: gain below the {rule.margin} margin"
    )
    reason = (
        f"{len(champion)} {evidence} incidents at a {rule.budget:.1%} alert budget: challenger flags "
        f"{challenger.mean():.3f} of their rows vs champion {champion.mean():.3f} (gain {gain:+.3f}), "
        f"Wilcoxon p={p_value:.3g}: {verdict}"
    )
    if refused:
        reason += f"; refused, champion's detector kept on {refusals}"
    return decision | {
        "promoted": promoted,
        "reason": reason,
        "p_value": p_value,
        "incidents": len(champion),
        "evidence": evidence,
        "champion_value": float(champion.mean()),
        "challenger_value": float(challenger.mean()),
        "gain": gain,
    }


def decide_each(compared: dict[str, dict[str, Any]], rule: PromotionRule) -> dict[str, Any]:
    """New entities' own models, each judged alone (`decide` over that entity) against the fleet model
    that serves it: a graduation job's decision. The winners (`graduated`) take over with their own model;
    the others stay on the fleet model. Pooled as `decide` does, one strong entity would carry the others'
    own models in with it. Promoted when any entity won; each one's decision is under `each`."""
    each = {entity: decide({entity: figures}, rule) for entity, figures in compared.items()}
    graduated = sorted(e for e, d in each.items() if d["promoted"])
    stay = sorted(set(each) - set(graduated))
    reason = f"{len(graduated)} of {len(each)} new entities take over with their own model"
    if graduated:
        reason += f" ({named(graduated)})"
    if stay:
        reason += f"; on the fleet model: {named(stay)} ({each[stay[0]]['reason']}{', ...' if len(stay) > 1 else ''})"
    return rule_fields(rule) | {
        "refused": {e: r for d in each.values() for e, r in d["refused"].items()},
        "promoted": bool(graduated),
        "reason": reason,
        "p_value": None,
        "evidence": "+".join(sorted({d["evidence"] for d in each.values() if d.get("evidence")})) or None,
        "graduated": graduated,
        "each": {e: {k: d.get(k) for k in ("promoted", "reason", "p_value", "gain")} for e, d in each.items()},
    }
