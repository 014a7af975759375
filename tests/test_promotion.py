"""The promotion rule (train/promotion.py) without a cluster: silence and noise cannot win, a detector
that finds more incidents at the same alert budget does, and retraining learns only rows believed normal.
The last test runs the retraining job itself (train.retrain.retrain) with Ray's fit replaced by an
in-process one, against a real MLflow store and serving state."""

from __future__ import annotations

import numpy as np
import pytest

from train.promotion import (
    PromotionRule,
    compare_entity,
    decide,
    decide_each,
    flooding,
    paired_p_value,
    suspected_anomalies,
    training_rows,
)

ROWS, CUT, METRICS = 2000, 1200, 6


class ZScoreModel:
    """A detector stand-in: the largest |z| over the columns it watches, plus optional noise."""

    def __init__(
        self, columns: list[int], threshold: float = 3.5, noise: float = 0.0, seed: int = 0, centre: float = 0.0
    ) -> None:
        self.columns, self.threshold_, self.noise, self.seed = columns, threshold, noise, seed
        self.centre = np.zeros(METRICS)
        self.centre[0] = centre  # the level of metric 0 it learnt as normal

    def score(self, X: np.ndarray) -> np.ndarray:
        z = np.abs(X[:, self.columns] - self.centre[self.columns]).max(axis=1)
        return z + self.noise * np.random.default_rng(self.seed).normal(size=len(X))


class ConstantModel:
    """Scores that carry no information: the same value for every row."""

    def __init__(self, threshold: float) -> None:
        self.threshold_ = threshold

    def score(self, X: np.ndarray) -> np.ndarray:
        return np.zeros(len(X))


def recent(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Recent rows of a healthy machine (standardised metrics) without feedback labels."""
    return np.random.default_rng(seed).normal(size=(ROWS, METRICS)), np.full(ROWS, -1)


def compare(champion, challenger, rows=None, labels=None, rule=None) -> dict:
    rows, labels = (rows, labels) if rows is not None else recent()
    rule = rule or PromotionRule()
    return compare_entity(champion, challenger, rows, labels, CUT, rule)


ALL = list(range(METRICS))
NARROW = ZScoreModel([0])  # watches one metric: misses incidents elsewhere


def test_a_detector_that_finds_more_injected_incidents_is_promoted():
    figures = compare(NARROW, ZScoreModel(ALL))
    assert figures["evidence"] == "injected" and figures["incidents"] >= PromotionRule().injected
    assert figures["refused"] is None
    decision = decide({"e": figures}, PromotionRule())
    assert decision["promoted"], decision["reason"]
    assert decision["p_value"] < 0.05 and decision["challenger_value"] > decision["champion_value"] + 0.1
    assert decision["test"].startswith("one-sided Wilcoxon") and decision["budget"] == 0.01


def test_both_models_are_held_to_the_same_alert_budget():
    figures = compare(ZScoreModel(ALL, threshold=2.0), ZScoreModel(ALL, threshold=6.0))
    for side in ("champion", "challenger"):
        assert figures[side]["budget_alert_rate"] == pytest.approx(0.01, abs=0.003)
    # their own thresholds differ by far more, and must not decide anything
    assert figures["champion"]["alert_rate"] > 10 * figures["challenger"]["alert_rate"]
    assert figures["champion"]["per_incident"] == figures["challenger"]["per_incident"]
    assert not decide({"e": figures}, PromotionRule())["promoted"]


def test_a_silent_challenger_is_refused_even_when_its_scores_rank_better():
    silent = ZScoreModel(ALL, threshold=np.inf)  # the quiet model the old specificity rule promoted
    figures = compare(NARROW, silent)
    assert figures["refused"].startswith("never alerts")
    assert figures["challenger"]["value"] > figures["champion"]["value"]  # it would have won at the budget
    decision = decide({"e": figures}, PromotionRule())
    assert not decision["promoted"] and "never alerts" in decision["reason"]
    assert decision["refused"] == {"e": figures["refused"]}


@pytest.mark.parametrize(
    ("challenger", "why"),
    [
        (ZScoreModel(ALL, threshold=-np.inf), "always alerts: at its own threshold"),
        (ZScoreModel(ALL, threshold=0.5), "always alerts: at its own threshold"),  # flags most normal rows
        (ConstantModel(threshold=0.0), "always alerts: at its own threshold"),
    ],
)
def test_an_always_alerting_challenger_is_refused(challenger, why):
    figures = compare(NARROW, challenger)
    assert figures["refused"].startswith(why), figures["refused"]
    assert not decide({"e": figures}, PromotionRule())["promoted"]


def test_a_challenger_whose_tied_scores_cannot_meet_the_budget_is_refused():
    class Binary(ZScoreModel):  # 1 on huge deviations, else 0: at its own threshold it looks fine
        def score(self, X):
            return (super().score(X) > 8).astype(float)

    figures = compare(NARROW, Binary(ALL, threshold=0.5))
    assert figures["challenger"]["alert_rate"] == 0.0 and figures["challenger"]["incident_rows_flagged"] > 0
    assert figures["refused"].startswith("always alerts at the budget")
    assert figures["challenger"]["budget_alert_rate"] == 1.0  # every normal row ties at the budget threshold


def shifted(rows: np.ndarray, by: float = 6.0) -> np.ndarray:
    """The recent rows after a persistent level shift on metric 0."""
    moved = rows.copy()
    moved[:, 0] += by
    return moved


def test_a_flooding_champion_is_told_apart_and_still_needs_a_significant_win_to_be_replaced():
    # after a shift the champion flags nearly every recent row at the threshold it serves with
    rows, labels = recent()
    figures = compare(ZScoreModel(ALL), ZScoreModel(ALL, centre=6.0), shifted(rows), labels)
    assert figures["champion"]["alert_rate"] > 0.9 and figures["challenger"]["alert_rate"] < 0.05
    assert flooding(figures, PromotionRule())
    assert not flooding(compare(ZScoreModel(ALL), ZScoreModel(ALL)), PromotionRule())
    # the flood does not lower the bar for a challenger
    decision = decide({"e": figures}, PromotionRule())
    assert decision["gain"] < PromotionRule().margin and not decision["promoted"]


def test_a_win_by_noise_is_kept_out_by_the_significance_gate():
    # the same detector twice with independent noise: any difference is chance
    promoted = 0
    for seed in range(20):
        rule = PromotionRule(margin=0.0, seed=seed)  # the margin off: only the test decides
        rows, labels = recent(seed)
        figures = compare(
            ZScoreModel(ALL, noise=0.5, seed=2 * seed),
            ZScoreModel(ALL, noise=0.5, seed=2 * seed + 1),
            rows,
            labels,
            rule,
        )
        promoted += decide({"e": figures}, rule)["promoted"]
    assert promoted <= 2  # about alpha (5%) of 20 by chance


def test_new_entities_in_one_job_each_take_over_only_on_their_own_win():
    """A graduation job's entities are judged one by one: pooled, one machine's clear win would carry in
    another's own model that is no better than the fleet model serving it."""
    rule = PromotionRule()
    compared = {
        "wins": compare(NARROW, ZScoreModel(ALL)),
        "no-better": compare(ZScoreModel(ALL, noise=0.5, seed=1), ZScoreModel(ALL, noise=0.5, seed=2)),
    }
    assert decide(compared, rule)["promoted"]  # pooled: both would take over
    decision = decide_each(compared, rule)
    assert decision["promoted"] and decision["graduated"] == ["wins"], decision["reason"]
    assert not decision["each"]["no-better"]["promoted"]
    assert decision["reason"].startswith("1 of 2 new entities take over") and "no-better" in decision["reason"]
    assert not decide_each({"no-better": compared["no-better"]}, rule)["promoted"]


def test_the_paired_test_wants_more_than_a_higher_mean():
    champion = np.full(12, 0.5)
    lucky = champion + np.array([0.5, -0.4, 0.45, -0.35, 0.4, -0.3, 0.3, -0.2, 0.2, -0.1, 0.1, -0.05])
    assert lucky.mean() - champion.mean() >= 0.02  # above the margin, by a few lucky incidents
    assert paired_p_value(lucky, champion) > 0.05
    assert paired_p_value(champion, champion) == 1.0  # nothing tells them apart
    assert paired_p_value(champion + 0.1, champion) < 0.001


def test_labelled_incidents_are_the_evidence_when_there_are_enough():
    rows, labels = recent()
    labels[CUT:] = 0
    for start in range(CUT + 50, ROWS - 100, 120):  # 6 labelled incidents on metric 3 in the window
        rows[start : start + 30, 3] += 6.0
        labels[start : start + 30] = 1
    figures = compare(NARROW, ZScoreModel(ALL), rows, labels)
    assert figures["evidence"] == "labelled" and figures["incidents"] == 6
    assert figures["champion"]["value"] < 0.1 and figures["challenger"]["value"] > 0.9
    assert decide({"e": figures}, PromotionRule(margin=0.0))["promoted"]


def test_retraining_data_excludes_flagged_and_labelled_incident_rows():
    rows, labels = recent()
    rows[100:120, 2] += 9.0  # an incident nobody labelled; the champion flags it
    labels[500:540] = 1  # a labelled incident the champion misses (metric 4 is not watched)
    rows[500:540, 4] += 9.0
    champion = ZScoreModel([0, 1, 2])
    suspected = suspected_anomalies(champion.score(rows), champion.threshold_, labels, 0.1)
    assert suspected[100:120].all() and suspected[500:540].all()
    learnt, learnt_labels = training_rows(rows, labels, suspected, learns_from_labels=False)
    assert len(learnt) == ROWS - suspected.sum() and not (learnt_labels == 1).any()
    assert np.abs(learnt[:, [2, 4]]).max() < 6  # neither incident's rows are among them
    # a kind that learns from labels keeps them: incidents are learnt as incidents there
    assert len(training_rows(rows, labels, suspected, learns_from_labels=True)[0]) == ROWS


def test_a_flooding_champion_withholds_only_its_most_anomalous_rows():
    rows, labels = recent()
    rows[:, 1] += 5.0  # a persistent shift: the champion flags every row
    champion = ZScoreModel(ALL)
    scores = champion.score(rows)
    suspected = suspected_anomalies(scores, champion.threshold_, labels, 0.1)
    assert suspected.mean() == pytest.approx(0.1, abs=0.001)
    assert scores[suspected].min() >= scores[~suspected].max()


def test_the_retraining_job_learns_only_rows_believed_normal_and_records_the_test(mlflow_store, monkeypatch):
    """train.retrain.retrain end to end (MLflow registry, serving state), with the fit in-process."""
    from detect.sequence import AutoencoderDetector
    from detect.state import ServingStore
    from detect.synthetic import machine_days
    from train import retrain as job
    from train.pipeline import register_fitted

    monkeypatch.setenv("RAYWATCH_STATE_DIR", str(mlflow_store / "state"))
    entity, metrics, values = machine_days(2, seed=3)
    champion = AutoencoderDetector(epochs=2, hidden=16).fit(values[:1440], metrics)
    # sampled every 2 minutes, as its training series said: the challenger's reference records it too
    rate = {entity: 720}
    register_fitted("autoencoder", {entity: champion}, {entity: metrics}, {entity: values[:1440]}, rows_per_day=rate)

    served = values[1440:2440].copy()
    served[100:130, metrics.index("cpu")] += 40.0  # an unlabelled incident the champion flags
    store = ServingStore()
    store.add_observations(
        "autoencoder", [{"entity": entity, "timestamp": float(i), "values": v} for i, v in enumerate(served.tolist())]
    )
    for i in range(300, 340):  # a labelled incident (its rows look normal: only the label says otherwise)
        store.add_feedback(entity, float(i), 1, "autoencoder", trusted=True)  # an operator's, authenticated
    for i in range(400, 440):  # incident labels sent without a key: stored, but retraining must ignore them
        store.add_feedback(entity, float(i), 1, "autoencoder")

    learnt: list[np.ndarray] = []

    def fit_in_process(model, recent, options):
        learnt.extend(data.fit_rows for data in recent.values())
        return {
            e: AutoencoderDetector(d.champion.config, epochs=2).fit(d.fit_rows, d.metrics) for e, d in recent.items()
        }

    monkeypatch.setattr(job, "init_ray", lambda: None)
    monkeypatch.setattr(job, "fit_challengers", fit_in_process)
    decision = job.retrain("autoencoder", [entity], progress=print)

    labels = np.full(len(served), -1)
    labels[300:340] = 1
    withheld = suspected_anomalies(
        champion.score(served), champion.threshold_, labels, PromotionRule().max_suspect_share
    )
    assert withheld[100:130].any() and withheld[300:340].all()
    fit_part = int(len(served) * 0.6)
    np.testing.assert_array_equal(learnt[0], served[:fit_part][~withheld[:fit_part]])  # rows 400-439 learnt
    incident_rows = {tuple(r) for r in served[100:130][withheld[100:130]]} | {tuple(r) for r in served[300:340]}
    assert not incident_rows & {tuple(r) for r in learnt[0]}

    figures = decision["entities"][entity]
    assert figures["withheld_rows"] == int(withheld[:fit_part].sum())
    assert figures["champion"]["metric"] == "incident_recall_at_budget" and figures["evidence"] == "injected"
    assert decision["test"].startswith("one-sided Wilcoxon") and decision["alpha"] == 0.05
    assert decision["budget"] == 0.01 and decision["challenger"] == "2"
    recorded = store.decisions("autoencoder", 1)[0]
    assert recorded["details"]["p_value"] == decision["p_value"] and recorded["reason"] == decision["reason"]
    from train import registry

    assert registry.load_bundle("autoencoder", "2")[0].rows_per_day(entity) == 720


def test_a_flooding_champion_is_kept_and_named_and_with_recalibrate_kept_its_threshold_is_refitted(
    mlflow_store, monkeypatch
):
    """The retraining job (train.retrain.retrain) on a machine that moved for good: the champion flags most
    recent rows at its own threshold and the challenger does no better at the budget, so the challenger is
    not promoted and the operator is told that the champion floods. By default that is all; with
    `recalibrate_kept` (`--recalibrate`) the champion's own networks are registered again with their
    operational threshold fitted on their scores of the recent rows believed normal, and that version is
    promoted: the same scores, alerting at the tail of the recent rows."""
    from detect.sequence import AutoencoderDetector
    from detect.state import ServingStore
    from detect.synthetic import machine_days
    from detect.thresholds import threshold_from_state
    from train import registry
    from train import retrain as job
    from train.pipeline import register_fitted

    monkeypatch.setenv("RAYWATCH_STATE_DIR", str(mlflow_store / "state"))
    entity, metrics, values = machine_days(2, seed=3)
    champion = AutoencoderDetector(epochs=2, hidden=16).fit(values[:1440], metrics)
    register_fitted("autoencoder", {entity: champion}, {entity: metrics}, {entity: values[:1440]})
    served = values[1440:2440].copy()
    served[:, metrics.index("cpu")] += 8 * values[:1440, metrics.index("cpu")].std()  # a level shift, for good
    ServingStore().add_observations(
        "autoencoder", [{"entity": entity, "timestamp": float(i), "values": v} for i, v in enumerate(served.tolist())]
    )
    monkeypatch.setattr(job, "init_ray", lambda: None)
    monkeypatch.setattr(  # each challenger is its champion's detector: no better
        job, "fit_challengers", lambda model, recent, options: {e: d.champion for e, d in recent.items()}
    )

    kept = job.retrain("autoencoder", [entity], promote_via="direct", progress=print)  # by default: kept as is
    assert not kept["promoted"] and "recalibrated" not in kept and "threshold recalibrated" not in kept["reason"]
    assert registry.alias_version("autoencoder", registry.CHAMPION) == "1" and kept["challenger"] == "2"
    # registered, not served: no replica loads a challenger the rule kept out (what an A/B split would follow)
    assert registry.alias_version("autoencoder", registry.CHALLENGER) is None

    decision = job.retrain("autoencoder", [entity], promote_via="direct", recalibrate_kept=True, progress=print)
    figures = decision["entities"][entity]
    assert figures["champion"]["alert_rate"] >= PromotionRule().max_normal_alert_rate  # it floods
    assert not decision["promoted"] and decision["flooding"] == [entity], decision["reason"]
    notice = f"the kept champion floods (share of the recent normal rows it flags at its own threshold: {entity}"
    assert notice in decision["reason"] and "threshold recalibrated" in decision["reason"]
    assert decision["challenger"] == "3" and decision["recalibrated"] == [entity]
    assert registry.alias_version("autoencoder", registry.CHAMPION) == decision["recalibrated_version"] == "4"
    assert registry.lineage("autoencoder", "4")["derived_from"] == "1"  # the champion it was recalibrated from

    recalibrated = registry.load_bundle("autoencoder", registry.CHAMPION)[0].detectors[entity]
    scores = champion.score(served)
    np.testing.assert_allclose(recalibrated.score(served), scores, rtol=1e-5)  # the same model
    believed_normal = ~suspected_anomalies(
        scores, champion.threshold_, np.full(len(served), -1), PromotionRule().max_suspect_share
    )
    assert np.mean(scores >= champion.threshold_) > 0.5  # the old threshold floods the recent rows
    assert np.mean(scores[believed_normal] >= recalibrated.threshold_) == pytest.approx(0.01, abs=0.005)
    # the DSPOT it serves starts from the recent rows' tail (the champion's validation rows were too few for
    # one: it served its stored threshold)
    assert champion.served_spot() is None
    fresh = threshold_from_state(recalibrated.served_spot())
    assert fresh.threshold_ > champion.threshold_ and np.mean(scores[believed_normal] >= fresh.threshold_) < 0.05
    # the decision says where the bar was and where it is now: raised here, past the flood
    bar = decision["recalibrated_bars"][entity]
    assert bar == {"before": pytest.approx(champion.threshold_), "after": pytest.approx(fresh.threshold_)}
    assert f"bar {bar['before']:.4g} -> {bar['after']:.4g}" in decision["reason"]


@pytest.mark.parametrize("promote_via", ["rollout", "direct"])
def test_a_promotion_by_the_loop_is_a_rollout_request_unless_direct(mlflow_store, monkeypatch, promote_via):
    """A challenger the rule promotes is handed to the serving app's canary rollout (challenger alias and a
    "requested" rollout tag, the champion unchanged), or, with promote_via="direct", made champion at once."""
    from detect.sequence import AutoencoderDetector
    from detect.state import ServingStore
    from detect.synthetic import machine_days
    from train import registry
    from train import retrain as job
    from train.pipeline import register_fitted

    monkeypatch.setenv("RAYWATCH_STATE_DIR", str(mlflow_store / "state"))
    entity, metrics, values = machine_days(2, seed=3)
    champion = AutoencoderDetector(epochs=1, hidden=16).fit(values[:1440], metrics)
    register_fitted("autoencoder", {entity: champion}, {entity: metrics}, {entity: values[:1440]})
    rows = [{"entity": entity, "timestamp": float(i), "values": v} for i, v in enumerate(values[1440:2440].tolist())]
    ServingStore().add_observations("autoencoder", rows)
    monkeypatch.setattr(job, "init_ray", lambda: None)
    monkeypatch.setattr(
        job,
        "fit_challengers",
        lambda model, recent, options: {
            e: AutoencoderDetector(d.champion.config, epochs=1).fit(d.fit_rows, d.metrics) for e, d in recent.items()
        },
    )
    real_decide = job.decide
    monkeypatch.setattr(job, "decide", lambda compared, rule: real_decide(compared, rule) | {"promoted": True})

    decision = job.retrain("autoencoder", [entity], promote_via=promote_via, progress=print)
    assert decision["promoted"] and decision["challenger"] == "2"
    if promote_via == "rollout":
        assert registry.alias_version("autoencoder", registry.CHAMPION) == "1"  # not yet: the canary decides
        assert registry.alias_version("autoencoder", registry.CHALLENGER) == "2"
        request = registry.rollout_request("autoencoder", "2")
        assert request["status"] == "requested" and request["plan"] == {} and request["id"], request
        assert "canary rollout requested" in decision["reason"] and "raywatch models" in decision["reason"]
        registry.mark_rollout("autoencoder", "2", "started")
        assert registry.rollout_request("autoencoder", "2")["status"] == "started"
    else:
        assert registry.alias_version("autoencoder", registry.CHAMPION) == "2"
        assert registry.rollout_request("autoencoder", "2") is None
