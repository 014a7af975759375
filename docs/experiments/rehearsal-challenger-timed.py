"""Offline, with the platform's job days: rehearsal challengers (last 3 training days + recent rows believed
normal), decided by (a) the shipped equal-budget rule, (b) served F1 per injected incident (judge), (c) always."""

import copy
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]
import detect.metrics as M  # noqa: E402
from detect.alerting import online_alerts  # noqa: E402
from detect.data import load_series, rows_per_day  # noqa: E402
from detect.sequence import AutoencoderDetector  # noqa: E402
from detect.synthetic import inject_mean_shift  # noqa: E402
from detect.thresholds import threshold_from_state  # noqa: E402
from train.promotion import (  # noqa: E402
    PromotionRule,
    compare_entity,
    decide,
    incidents_for,
    paired_p_value,
    suspected_anomalies,
)

rule = PromotionRule()


def incident_stretches(labels):
    runs = M.segments(labels)
    cuts = [0] + [(e + st) // 2 for (_, e), (st, _) in zip(runs, runs[1:])] + [len(labels)]
    return list(zip(cuts, cuts[1:]))


JOBS = {"machine-1-6": [7, 14], "machine-2-1": [7, 14], "machine-3-3": [10]}
MODE = sys.argv[1]  # budget | judge | always
REHEARSE = sys.argv[2] == "rehearsal"


def spot(det):
    st = det.served_spot()
    return threshold_from_state(st) if st else float(det.threshold_)


def served_run(scores, thr):
    if isinstance(thr, float):
        return np.full(len(scores), thr)
    return online_alerts(scores, thr)[0]


def stretch_f1(scores, labels, bars):
    return np.array([M.f1_at(labels[a:b], scores[a:b], bars[a:b]) for a, b in incident_stretches(labels)])


def judge(champ, champ_thr_state, chal, recent, cut):
    context, window = recent[:cut], recent[cut:]
    inc = incidents_for(window, np.full(len(window), -1), rule)
    cs = champ.score(context)
    warm = copy.deepcopy(champ_thr_state)
    if not isinstance(warm, float):
        online_alerts(cs, warm)
    a, b = [], []
    for X, y in inc.copies:
        s1 = champ.score(np.concatenate([context, X]))[len(context) :]
        s2 = chal.score(np.concatenate([context, X]))[len(context) :]
        a.append(stretch_f1(s1, y, served_run(s1, copy.deepcopy(warm))))
        b.append(stretch_f1(s2, y, served_run(s2, spot(chal))))
    a, b = np.concatenate(a), np.concatenate(b)
    p, g = paired_p_value(b, a), float(np.mean(b - a))
    return p < rule.alpha and g >= rule.margin, round(a.mean(), 3), round(b.mean(), 3), p


res = {}
for name, days in JOBS.items():
    s = load_series("smd", name, str(ROOT / "data"))
    train, test, labels = s.train[s.metrics].to_numpy(float), s.test[s.metrics].to_numpy(float), s.labels.astype(int)
    day = rows_per_day("smd")
    half = len(test) // 2
    rows = inject_mean_shift(test, s.metrics, half)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        champ = AutoencoderDetector(epochs=3, hidden=32).fit(train, s.metrics)
    serving, start, pieces = champ, 0, []
    thr_state = spot(champ)
    for d in days:
        job = d * day
        recent = rows[max(0, job - 5000) : job]
        cut = int(len(recent) * 0.6)
        sus = suspected_anomalies(
            serving.score(recent), serving.threshold_, np.full(len(recent), -1), rule.max_suspect_share
        )
        fit_rows = recent[:cut][~sus[:cut]]
        if REHEARSE:
            fit_rows = np.concatenate([train[-3 * day :], fit_rows])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chal = AutoencoderDetector(epochs=3, hidden=32).fit(fit_rows, s.metrics)
        fig = compare_entity(serving, chal, recent, np.full(len(recent), -1), cut, rule)
        if MODE == "budget":
            won = decide({"e": fig}, rule)["promoted"]
            info = (fig["champion"]["value"], fig["challenger"]["value"])
        elif MODE == "judge":
            won, *info = judge(serving, thr_state, chal, recent, cut)
        else:
            won, info = True, ()
        print(name, "day", d, "promoted" if won else "kept", info, flush=True)
        if won:
            pieces.append((start, job, serving, thr_state))
            serving, start, thr_state = chal, job, spot(chal)
    pieces.append((start, len(rows), serving, thr_state))
    # served flags: each model serves its span with its own online threshold (the static champion's carries on)
    flags = np.zeros(len(rows), bool)
    scores_all = np.zeros(len(rows))
    for a, b, det, thr in pieces:
        sc = det.score(rows)[a:b] if a == 0 else det.score(rows[max(0, a - 200) : b])[a - max(0, a - 200) :]
        bars = served_run(sc, copy.deepcopy(thr)) if a == 0 else served_run(sc, thr)
        flags[a:b] = sc >= bars
    sc0 = champ.score(rows)
    static = sc0 >= served_run(sc0, spot(champ))
    f_loop = M.f1_at(labels[half:], flags[half:].astype(float), 0.5)
    f_static = M.f1_at(labels[half:], static[half:].astype(float), 0.5)
    res[name] = (round(f_loop, 3), round(f_static, 3))
    print(name, "F1 after shift loop / static", res[name], flush=True)
print(
    MODE,
    sys.argv[2],
    "mean loop",
    round(np.mean([v[0] for v in res.values()]), 3),
    "static",
    round(np.mean([v[1] for v in res.values()]), 3),
)
