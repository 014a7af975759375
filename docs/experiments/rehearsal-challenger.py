"""Offline: a challenger fitted on the champion's last training days plus the recent rows believed normal
(rehearsal) against one fitted on the recent rows alone, after the replay's shift."""

import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import importlib.util  # noqa: E402

import detect.metrics as M  # noqa: E402
from detect.alerting import online_alerts  # noqa: E402
from detect.drift import drift_window_rows  # noqa: E402
from detect.sequence import AutoencoderDetector  # noqa: E402
from detect.synthetic import inject_mean_shift  # noqa: E402
from detect.thresholds import threshold_from_state  # noqa: E402
from train.promotion import PromotionRule, compare_entity, decide, suspected_anomalies  # noqa: E402

spec = importlib.util.spec_from_file_location("rd", ROOT / "docs/experiments/recalibration-dspot.py")
rd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rd)
which = sys.argv[1] if len(sys.argv) > 1 else "shipped"
cases = rd.cases_shipped(str(ROOT / "data")) if which == "shipped" else rd.cases_synthetic()
rule = PromotionRule()
for name, champ, train, test, labels, metrics, day, half in rd.fitted(cases):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = half + 2 * drift_window_rows(day)
        rows = inject_mean_shift(test, metrics, half)[0]
        recent = rows[half:job]
        no_labels = np.full(len(recent), -1)
        cut = int(len(recent) * 0.6)
        sus = suspected_anomalies(champ.score(recent), champ.threshold_, no_labels, rule.max_suspect_share)
        fit_rows = recent[:cut][~sus[:cut]]
        fresh = AutoencoderDetector(epochs=3, hidden=32).fit(fit_rows, metrics)
        keep = min(len(train), 3 * day)
        rehearsal = AutoencoderDetector(epochs=3, hidden=32).fit(np.concatenate([train[-keep:], fit_rows]), metrics)
    scores_c = champ.score(rows)
    static, _ = online_alerts(scores_c, threshold_from_state(champ.served_spot()))
    out = {"static": M.f1_at(labels[half:], scores_c[half:], static[half:])}
    for nm, ch in (("fresh", fresh), ("rehearsal", rehearsal)):
        fig = compare_entity(champ, ch, recent, no_labels, cut, rule)
        d = decide({"e": fig}, rule)
        s = ch.score(rows)
        st = ch.served_spot()
        served_ch, _ = (
            online_alerts(s[job:], threshold_from_state(st)) if st else (np.full(len(s) - job, ch.threshold_), None)
        )
        if d["promoted"]:
            thr = np.concatenate([static[:job], served_ch])
            sc = np.concatenate([scores_c[:job], s[job:]])
        else:
            thr, sc = static, scores_c
        f1_if = M.f1_at(
            labels[half:],
            np.concatenate([scores_c[:job], s[job:]])[half:],
            np.concatenate([static[:job], served_ch])[half:],
        )
        out[nm] = (
            round(M.f1_at(labels[half:], sc[half:], thr[half:]), 3),
            d["promoted"],
            round(fig["champion"]["value"], 3),
            round(fig["challenger"]["value"], 3),
            fig["refused"] and fig["refused"][:20],
            round(f1_if, 3),
        )
    print(name, out, flush=True)
