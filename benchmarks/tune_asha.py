"""ASHA against no early stopping: the same search space, the same number of trials and the same
seeded configs (`tune.search.tune_model(search="random")`), once with ASHA and once with FIFO.

    python benchmarks/tune_asha.py --workdir runs/bench-serve [--model autoencoder] [--num-samples 8]

Reports each run's best validation loss (lower is better) and total trial-epochs; writes
benchmarks/results/tune.json and tune.md. Nothing is recorded as the model's best config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from report import ratio, table
from serving import load_average, local_ray, log, machine, save_tables, use_workdir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench-serve")
    parser.add_argument("--model", choices=["autoencoder", "lstm"], default="autoencoder")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA grace period (raywatch tune: 1)")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA reduction factor (raywatch tune: 3)")
    args = parser.parse_args(argv)
    workdir = use_workdir(args.workdir)
    from train.jobs import TRAIN_POLL_ENV
    from tune.search import DEFAULT_ENTITIES, tune_model

    started, load_start = time.strftime("%Y-%m-%d %H:%M"), load_average()
    results = {}
    with local_ray("tune", workdir, {TRAIN_POLL_ENV: "0.2"}):
        for scheduler in ("asha", "none"):
            results[scheduler] = tune_model(
                args.model,
                num_samples=args.num_samples,
                max_epochs=args.max_epochs,
                scheduler=scheduler,
                seed=args.seed,
                record=False,
                search="random",
                grace_period=args.grace_period,
                reduction_factor=args.reduction_factor,
                progress=log,
            )
            r = results[scheduler]
            log(
                f"{scheduler}: best val_loss {r['best_score']:.5g}, {r['trial_epochs']} trial-epochs, {r['seconds']:.0f} s"
            )
    asha, full = results["asha"], results["none"]
    grace = args.grace_period
    default_asha = args.grace_period == 1 and args.reduction_factor == 3
    same_configs = sorted(json.dumps(t["config"], sort_keys=True) for t in asha["trial_details"]) == sorted(
        json.dumps(t["config"], sort_keys=True) for t in full["trial_details"]
    )
    result = {
        "machine": machine(),
        "date": started,
        "load_average": {"start": load_start, "end": load_average()},
        "setup": (
            f"{args.model} on {', '.join(DEFAULT_ENTITIES)}, {args.num_samples} trials of up to {args.max_epochs} "
            f"epochs, configs sampled from seed {args.seed} (identical in both runs: {same_configs}), "
            f"2 trials at a time, one CPU each; ASHA grace period {grace} epochs, reduction factor "
            f"{args.reduction_factor}{' (as `raywatch tune` sets it up)' if default_asha else ''}; "
            "score: validation loss, lower is better."
        ),
        "asha_best": asha["best_score"],
        "full_best": full["best_score"],
        "asha_trial_epochs": asha["trial_epochs"],
        "full_trial_epochs": full["trial_epochs"],
        "asha_seconds": round(asha["seconds"], 1),
        "full_seconds": round(full["seconds"], 1),
        "same_configs": same_configs,
        "asha": {"grace_period": grace, "reduction_factor": args.reduction_factor, "max_t": args.max_epochs},
        "trials": {"asha": asha["trial_details"], "full": full["trial_details"]},
    }
    rows = [
        {
            "scheduler": "ASHA",
            "best_val_loss": asha["best_score"],
            "trial_epochs": asha["trial_epochs"],
            "seconds": asha["seconds"],
        },
        {
            "scheduler": "none (FIFO)",
            "best_val_loss": full["best_score"],
            "trial_epochs": full["trial_epochs"],
            "seconds": full["seconds"],
        },
        {
            "scheduler": "ASHA / none",
            "best_val_loss": ratio(asha["best_score"], full["best_score"]),
            "trial_epochs": ratio(asha["trial_epochs"], full["trial_epochs"]),
            "seconds": ratio(asha["seconds"], full["seconds"]),
        },
    ]
    per_trial = [
        {"config": json.dumps(a["config"], sort_keys=True), "asha_epochs": a["epochs"], "asha_best": a["best_val_loss"]}
        for a in sorted(asha["trial_details"], key=lambda t: json.dumps(t["config"], sort_keys=True))
    ]
    full_by_config = {json.dumps(t["config"], sort_keys=True): t for t in full["trial_details"]}
    for row in per_trial:
        other = full_by_config.get(row["config"], {})
        row["full_epochs"], row["full_best"] = other.get("epochs"), other.get("best_val_loss")
    md = [
        f"Ray Tune, ASHA against no early stopping, measured on {result['machine']} ({started}).",
        "",
        result["setup"],
        "",
        table(rows),
        "",
        "Per trial:",
        "",
        table(per_trial),
    ]
    save_tables("tune", result, md, show=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
