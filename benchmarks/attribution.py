"""Root-cause attribution benchmark: HitRate@100% and @150% of the sequence detectors with each metric's
contribution held at its recent peak (detect/attribution.py), for several half-lives side by side, the
control being 0 (each row explained on its own, what `explain` did before).

Two sets of entities, the same models for every half-life (trained once per entity, default config):

- `shipped`: the six shipped entities (data/), trained on `train` and judged on the labelled rows of
  every interpreted segment of `test`, as `raywatch evaluate` judges them. The default half-life was
  looked at on these, so their figures flatter it.
- `synthetic`: two fleets of 3 machines (`generate_fleet`, seeds 101 and 202, 6 days of one-minute rows,
  8 incidents a machine), trained on the incident-free counterfactual of their first 3 days and judged on
  the last 3, whose incidents record the metrics they move: data the half-life was not chosen on.

    python benchmarks/attribution.py [--data DIR] [--half-lives 0,15,30,60,120,240,480]   # make bench-attribution

Writes benchmarks/results/attribution.json (records: entities, detector, half_life_rows, hitrate_100,
hitrate_150, per-entity values) and attribution.md. Under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import numpy as np
from serving import log, save_tables

from detect import metrics as M
from detect.attribution import HALF_LIFE_ROWS, hold_peaks
from detect.data import list_entities, load_series
from detect.evaluate import detector_factories
from detect.synthetic import generate_fleet

DETECTORS = ("autoencoder", "lstm")
SYNTHETIC_SEEDS, MACHINES, DAY = (101, 202), 3, 1440


def unheld_contributions(name: str, train: np.ndarray, test: np.ndarray, metrics: list[str]) -> np.ndarray:
    """The detector's per-metric contributions of every test row, each row on its own (no hold)."""
    detector = detector_factories()[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector.fit(train, metrics)
    detector.attribution_half_life_rows = 0
    return detector.explain(test)


def shipped_cases(data: str | None) -> list[dict[str, Any]]:
    cases = []
    for dataset, entity in list_entities(data):
        series = load_series(dataset, entity, data)
        cases.append(
            {
                "entity": f"{dataset}/{entity}",
                "train": series.train[series.metrics].to_numpy(),
                "test": series.test[series.metrics].to_numpy(),
                "labels": series.labels,
                "interpretation": series.interpretation,
                "metrics": list(series.metrics),
            }
        )
    return cases


def synthetic_cases(seeds: tuple[int, ...] = SYNTHETIC_SEEDS) -> list[dict[str, Any]]:
    cases = []
    for seed in seeds:
        clean = generate_fleet(n_machines=MACHINES, n_steps=6 * DAY, incidents=False, seed=seed)
        fleet = generate_fleet(n_machines=MACHINES, n_steps=6 * DAY, incidents_per_machine=8, seed=seed)
        metrics = fleet.metrics
        for entity in sorted(fleet.frame.entity.unique()):
            rows = fleet.frame[fleet.frame.entity == entity]
            start = 3 * DAY
            cases.append(
                {
                    "entity": f"synthetic-{seed}/{entity}",
                    "train": clean.frame[clean.frame.entity == entity][metrics].to_numpy()[:start],
                    "test": rows[metrics].to_numpy()[start:],
                    "labels": rows.label.to_numpy()[start:],
                    "interpretation": [
                        (i.start - start, i.stop - 1 - start, [metrics.index(m) for m in i.metrics])
                        for i in fleet.incidents
                        if i.entity == entity and i.start >= start
                    ],
                    "metrics": metrics,
                }
            )
    return cases


def measure(cases: list[dict[str, Any]], label: str, half_lives: list[int]) -> list[dict[str, Any]]:
    hits: dict[tuple[str, int, int], list[float]] = {}
    for k, case in enumerate(cases, 1):
        for name in DETECTORS:
            log(f"[{label} {k}/{len(cases)}] {case['entity']}: {name}")
            unheld = unheld_contributions(name, case["train"], case["test"], case["metrics"])
            for half_life in half_lives:
                held = hold_peaks(unheld, half_life)[0]
                for percent in (100, 150):
                    value = M.hitrate(held, case["interpretation"], case["labels"], percent)
                    hits.setdefault((name, half_life, percent), []).append(value)
    records = []
    for name in DETECTORS:
        for half_life in half_lives:
            per_entity = {p: hits[(name, half_life, p)] for p in (100, 150)}
            records.append(
                {
                    "entities": label,
                    "detector": name,
                    "half_life_rows": half_life,
                    "hitrate_100": round(float(np.nanmean(per_entity[100])), 3),
                    "hitrate_150": round(float(np.nanmean(per_entity[150])), 3),
                    "hitrate_150_per_entity": dict(
                        zip([c["entity"] for c in cases], [round(float(v), 3) for v in per_entity[150]])
                    ),
                }
            )
    return records


def tables(records: list[dict[str, Any]], half_lives: list[int], seconds: float) -> list[str]:
    md = [
        "# Root-cause attribution: HitRate with each metric held at its recent peak",
        "",
        f"`python benchmarks/attribution.py`: the sequence detectors' contributions held over H rows "
        f"(detect/attribution.py; H = 0: each row on its own, the control; the default is {HALF_LIFE_ROWS}). "
        f"Mean over entities. {seconds:.0f} s on {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    for percent in (150, 100):
        md += [
            f"HitRate@{percent}%:",
            "",
            "| entities | detector | " + " | ".join(f"H = {h}" for h in half_lives) + " |",
            "|---|---|" + "---|" * len(half_lives),
        ]
        for label in dict.fromkeys(r["entities"] for r in records):
            for name in DETECTORS:
                row = {
                    r["half_life_rows"]: r[f"hitrate_{percent}"]
                    for r in records
                    if (r["entities"], r["detector"]) == (label, name)
                }
                md.append(f"| {label} | {name} | " + " | ".join(f"{row[h]:.3f}" for h in half_lives) + " |")
        md.append("")
    md += [
        "`shipped`: the six shipped entities, judged as `raywatch evaluate` judges them (the default half-life was",
        "looked at on these). `synthetic`: two synthetic fleets (seeds 101, 202; 3 machines each) trained on their",
        "incident-free first 3 days and judged on 3 days with 8 incidents a machine, data the half-life was not",
        "chosen on.",
    ]
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the shipped entities' folder (default: data/)")
    parser.add_argument("--half-lives", default="0,15,30,60,120,240,480", help="rows, comma-separated; 0 = no hold")
    args = parser.parse_args(argv)
    half_lives = [int(h) for h in args.half_lives.split(",")]
    if 0 not in half_lives:
        half_lives.insert(0, 0)  # the control
    started = time.perf_counter()
    records = measure(shipped_cases(args.data), "shipped", half_lives) + measure(
        synthetic_cases(), "synthetic", half_lives
    )
    seconds = time.perf_counter() - started
    save_tables(
        "attribution",
        {"records": records, "seconds": round(seconds, 1)},
        tables(records, half_lives, seconds),
        show=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
