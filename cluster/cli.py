"""The `raywatch` command line: thin commands over the library functions. It prints for people."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detect.data import TelemetryError


def _progress(total: int):
    count = {"n": 0}

    def report(message: str) -> None:
        count["n"] += 1
        print(f"[{count['n']}/{total}] {message}", file=sys.stderr, flush=True)

    return report


def cmd_evaluate(args: argparse.Namespace) -> int:
    from detect.data import default_data_dir, list_entities
    from detect.evaluate import evaluate, markdown_table, parse_detectors, write_report

    detectors = parse_detectors(args.detectors)
    data_dir = Path(args.data) if args.data else default_data_dir()
    n_entities = len(args.entities.split(",")) if args.entities else len(list_entities(data_dir))
    entities = args.entities.split(",") if args.entities else None
    report = evaluate(data_dir, detectors, entities, progress=_progress(n_entities * len(detectors)))
    json_path, md_path = write_report(report, args.out)
    print(markdown_table(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from detect.synthetic import generate_fleet

    fleet = generate_fleet(n_machines=args.machines, n_steps=args.steps, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        fleet.frame.to_parquet(out)
    else:
        fleet.frame.to_csv(out, index=False)
    kinds = sorted({i.kind for i in fleet.incidents})
    print(
        f"wrote {len(fleet.frame)} rows, {args.machines} machines, {len(fleet.incidents)} incidents ({', '.join(kinds)}) to {out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raywatch", description="Incident detection for server telemetry on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="score detectors on labelled telemetry and write a JSON + markdown report")
    ev.add_argument(
        "--data", help="benchmark directory (<dataset>/<entity>/...); default $RAYWATCH_DATA or ../shared/data"
    )
    ev.add_argument("--detectors", default="pca,iforest,ecod", help="comma-separated detector names")
    ev.add_argument("--entities", help="comma-separated entities (dataset/entity or entity); default all")
    ev.add_argument("--out", default="evaluation.json", help="JSON report path; the markdown table goes beside it")
    ev.set_defaults(func=cmd_evaluate)

    gen = sub.add_parser("generate", help="write a synthetic fleet with labelled incidents to CSV or Parquet")
    gen.add_argument("--machines", type=int, default=4)
    gen.add_argument("--steps", type=int, default=4320, help="samples per machine (1-minute steps)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="fleet.csv")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (TelemetryError, ValueError, FileNotFoundError) as exc:
        print(f"raywatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
