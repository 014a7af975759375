"""The `raywatch` command line: thin commands over the library functions. It prints for people.

Each command imports the stage it runs inside its function: the stages pull in torch, Ray and MLflow
(seconds of import time), and `raywatch --help` or `raywatch models` should not pay for all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from detect.data import TelemetryError
from detect.kinds import DETECTOR_KINDS


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
    progress = _progress(n_entities * len(detectors))
    report = evaluate(data_dir, detectors, entities, progress=progress, jobs=args.jobs)
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


def cmd_train(args: argparse.Namespace) -> int:
    from train.pipeline import parse_sets, train_model

    overrides = parse_sets(args.set)
    if args.epochs:
        overrides["epochs"] = args.epochs
    use_gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    if args.fleet:
        return _train_fleet(args, overrides, use_gpu)
    if not args.model:
        raise ValueError("--model is required (or --fleet)")
    if args.source and args.data:
        raise ValueError("--data and --source are alternatives: pass one")
    if args.source:
        print(f"reading the last {args.since} of {args.source} from Prometheus", file=sys.stderr)
    print(f"training {args.model} on Ray Train ({args.num_workers} worker(s), GPU: {args.gpu})", file=sys.stderr)
    result = train_model(
        args.model,
        args.data,
        args.entities.split(",") if args.entities else None,
        overrides,
        num_workers=args.num_workers,
        use_gpu=use_gpu,
        use_tuned=not args.no_tuned,
        register=not args.no_register,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        source=args.source,
        since=args.since,
    )
    print(f"config: {result['config_source']}")
    for key, value in result["summary"].items():
        print(f"  mean {key}: {value:.3f}")
    if result["version"]:
        promoted = " and promoted to champion (first version)" if result.get("promoted") else ""
        print(f"registered {result['model']} version {result['version']}{promoted} (MLflow run {result['run_id']})")
    return 0


def _train_fleet(args: argparse.Namespace, overrides: dict, use_gpu: bool | None) -> int:
    from train.fleet import FLEET_KIND, train_fleet

    if args.source:
        raise ValueError("--fleet learns from --data (a benchmark folder); --source is not supported with it")
    if args.model not in (None, FLEET_KIND):
        raise ValueError(f"--fleet trains the {FLEET_KIND}'s fleet model; drop --model {args.model}")
    print(f"training fleet models ({FLEET_KIND}, one per metric schema) on Ray Train", file=sys.stderr)
    result = train_fleet(
        args.data,
        args.entities.split(",") if args.entities else None,
        overrides,
        num_workers=args.num_workers,
        use_gpu=use_gpu,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    for key, figures in result["schemas"].items():
        print(f"{key}: {len(figures['entities'])} entities, {figures['metrics']} metrics, {figures['fit_seconds']} s")
    print(f"registered {result['model']} version {result['version']} with the fleet models and promoted it to champion")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import signal
    import time

    from ingest.prometheus import load_source
    from ingest.watch import Watcher

    source = load_source(args.source)
    settings: dict[str, object] = {}
    for flag, key in (
        ("serve_url", "serve_url"),
        ("exporter_port", "exporter_port"),
        ("exporter_host", "exporter_host"),
        ("detectors", "detectors"),
        ("delay", "delay"),
        ("backfill", "backfill"),
    ):
        value = getattr(args, flag)
        if value is not None:
            settings[key] = value
    alerts: dict[str, object] = {}
    for flag, key in (("alertmanager", "alertmanager"), ("alert_for", "for"), ("resolve_after", "resolve_after")):
        value = getattr(args, flag)
        if value is not None:
            alerts[key] = value
    if args.webhook:
        alerts["webhooks"] = args.webhook

    def say(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    watcher = Watcher(source, settings, alerts, on_event=say)
    exporter = watcher.settings.exporter_port
    say(
        f"watching {source.name} ({len(source.metrics)} metrics, step {source.step:g}s) from {source.url}; "
        f"scoring through {watcher.settings.serve_url}"
        + (f"; metrics on http://{watcher.settings.exporter_host}:{exporter}/metrics" if exporter else "")
        + (f"; alerts to {watcher.alert_settings.alertmanager}" if watcher.alert_settings.alertmanager else "")
    )
    signal.signal(signal.SIGTERM, lambda *_: watcher.request_stop())
    reported = 0
    sent = 0

    def report() -> None:
        nonlocal reported, sent
        fresh = min(watcher.notifier.sent_total - sent, len(watcher.notifier.sent))
        for change in watcher.notifier.sent[len(watcher.notifier.sent) - fresh :]:
            labels = change.get("labels") or change["alerts"][0]["labels"]
            say(
                f"alert {change['status']} -> {change['target']}: {labels['alertname']} {labels['entity']} {labels['detector']}"
            )
        sent = watcher.notifier.sent_total
        if watcher.scored_rows - reported >= args.report_every:
            reported = watcher.scored_rows
            say(f"scored {watcher.scored_rows} rows; firing: {len(watcher.notifier.firing())}")

    try:
        if args.once:
            result = watcher.poll_once()
            report()
            print(json.dumps(result))
            return 0
        watcher.run(duration_s=args.duration, after_poll=report)
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()
        say(f"stopped after {watcher.polls} polls, {watcher.scored_rows} rows scored")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from train.registry import promote

    out = promote(args.model, args.version)
    print(f"{out['model']}: champion = version {out['champion']} (previous = {out['previous']})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from train.registry import rollback

    out = rollback(args.model)
    print(f"{out['model']}: rolled back, champion = version {out['champion']} (previous = {out['previous']})")
    return 0


def _api_url(given: str | None) -> str:
    """The Serve API: --url, else the port `raywatch up` recorded here, else port 8000."""
    from cluster.lifecycle import read_state

    if given:
        return given.rstrip("/")
    state = read_state() or {}
    return f"http://127.0.0.1:{state.get('serve_port', 8000)}"


def _describe_rollout(state: dict | None) -> str:
    if not state:
        return "no rollout"
    line = f"version {state['version']}: {state['status']} at {state['percent']:g}% (step {state['step'] + 1}"
    return line + f" of {len(state['plan']['steps'])}): {state['reason']}"


def _describe_step(step: dict, state: dict) -> str:
    return f"{step['action']} at {step['percent']:g}% (step {step['step'] + 1} of {len(state['plan']['steps'])}): {step['reason']}"


def cmd_rollout(args: argparse.Namespace) -> int:
    """Start, follow or abort a canary rollout through the API's admin routes (serve/rollout.py)."""
    import time

    import httpx

    from serve.auth import admin_keys
    from serve.rollout import IN_PROGRESS

    url, keys = _api_url(args.url), admin_keys()
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    if args.abort or args.version:
        if not keys:
            print("raywatch rollout: no admin key (RAYWATCH_ADMIN_KEYS_FILE or RAYWATCH_ADMIN_KEYS)", file=sys.stderr)
            return 2
        if args.abort:
            route, body = "/v1/admin/rollout/abort", {"model": args.model}
        else:
            plan = json.loads(Path(args.plan).read_text()) if args.plan else {}
            if args.steps:
                plan["steps"] = [float(x) for x in args.steps.split(",")]
            plan.update({k: v for k, v in (("min_hold_s", args.hold_s), ("min_requests", args.min_requests)) if v})
            route, body = "/v1/admin/rollout", {"model": args.model, "version": args.version, "plan": plan}
        answer = httpx.post(url + route, json=body, headers=headers, timeout=60)
        if answer.status_code != 200:
            print(f"raywatch rollout: {answer.status_code} {answer.json().get('detail')}", file=sys.stderr)
            return 1
        print(f"{args.model} {_describe_rollout(answer.json())}")
        if args.abort or not args.wait:
            return 0
    last, steps_shown = None, 0
    while True:
        state = httpx.get(url + "/v1/models", timeout=60).json()["models"][args.model].get("rollout")
        # every step's verdict from the rollout's history: a step shorter than the poll is not missed
        history = (state or {}).get("history", [])
        for step in history[steps_shown:]:
            print(f"{args.model} version {state['version']}: {_describe_step(step, state)}", flush=True)
        steps_shown = len(history)
        line = f"{args.model} {_describe_rollout(state)}"
        if line != last:
            print(line, flush=True)
            last = line
        if not args.wait or not state or state["status"] not in IN_PROGRESS:
            return 0 if not state or state["status"] != "rolled_back" else 1
        time.sleep(2)


def cmd_models(args: argparse.Namespace) -> int:
    """Each model's versions with their aliases, and what became of the rollouts the retraining loop asked
    for (the version's rollout tag: requested, started, or refused with the serving app's reason)."""
    from train.registry import MODEL_NAMES, tracking_uri, versions

    print(f"MLflow: {tracking_uri()}")
    for model in MODEL_NAMES:
        rows = versions(model)
        print(f"{MODEL_NAMES[model]}: " + (", ".join(_describe_version(r) for r in rows) or "no versions"))
    return 0


def _describe_version(row: dict) -> str:
    from train.registry import rollout_request_in

    line = f"v{row['version']}" + (f" [{','.join(row['aliases'])}]" if row["aliases"] else "")
    request = rollout_request_in(row["tags"])
    if request:
        line += f" (rollout {request.get('status')}" + (f": {request['reason']}" if request.get("reason") else "") + ")"
    return line


def cmd_lineage(args: argparse.Namespace) -> int:
    """What a served answer came from: per detector, the version, its MLflow run and training data hash."""
    from serve.schemas import served_models
    from train.registry import lineage

    if bool(args.version) != bool(args.model):
        print("raywatch lineage: --model and --version go together", file=sys.stderr)
        return 2
    if args.version:
        refs = {"given": {"detector": args.model, "version": args.version}}
    else:
        source = sys.stdin if args.response == "-" else open(args.response)  # closed by the `with` below
        with source:
            refs = served_models(json.load(source))
    found = [lineage(ref["detector"], ref["version"]) for ref in refs.values()]
    print(json.dumps(found, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from tune.search import tune_model

    result = tune_model(
        args.model,
        args.data,
        args.entities.split(",") if args.entities else None,
        num_samples=args.num_samples,
        max_epochs=args.max_epochs,
        scheduler=args.scheduler,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(
        f"best {args.model} config ({result['metric']} = {result['best_score']:.4f}): {json.dumps(result['best_config'])}"
    )
    print(
        f"recorded in {result['path']} (used by `raywatch train --model {args.model}`) and MLflow run {result['run_id']}"
    )
    print(f"trials: {result['trials']}, trial-epochs: {result['trial_epochs']}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from train.compress import main as compress_main

    return compress_main(args.passed_on, prog="raywatch compress")


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import time

    from cluster.lifecycle import HIGH_THROUGHPUT_ENV

    if args.mode == "high-throughput":
        # read at import time by Ray Serve and inherited by the controller and replicas: set before ray.init
        for key, value in HIGH_THROUGHPUT_ENV.items():
            os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from serve.app import build_app

    attached = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app({"reload_interval_s": 1.0}), name="raywatch", route_prefix="/")
    base = f"http://{args.host}:{args.port}"
    print(f"raywatch API: {base}/v1/score   docs: {base}/docs   mode: {args.mode}")
    if attached or args.detach:
        print("deployed on the running cluster; `serve shutdown` removes it")
        return 0
    print("serving on a local Ray started by this command; Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.lifecycle import up, urls

    state = up(
        args.data,
        args.entities.split(",") if args.entities else None,
        args.port,
        args.mode,
        args.epochs,
        source=args.source,
        since=args.since,
        ray_port=args.ray_port,
        dashboard_port=args.dashboard_port,
    )
    for name, url in urls(state).items():
        print(f"{name:10s} {url}")
    if state.get("client_env"):
        print(f"for ray, serve and ray job submit in this shell: source {_relative(state['client_env'])}")
    print("status: raywatch status    stop: raywatch down")
    return 0


def _relative(path: str) -> str:
    """A path as a person would type it from here."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _describe_deployment(dep: dict[str, Any]) -> str:
    """'HEALTHY, replicas: 2 RUNNING' from `cluster.lifecycle.status`'s entry for a deployment."""
    replicas = ", ".join(f"{n} {state}" for state, n in dep["replicas"].items()) or "no replicas"
    return f"{dep['status']}, replicas: {replicas}"


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.lifecycle import status

    out = status()
    print(f"Ray: {out['state']['address']}  dashboard: {out['state'].get('dashboard')}")
    for name, dep in out["deployments"].items():
        print(f"  deployment {name}: " + (_describe_deployment(dep) if isinstance(dep, dict) else str(dep)))
    for model, rows in out["models"].items():
        listed = ", ".join(f"v{r['version']}" + (f"[{','.join(r['aliases'])}]" if r["aliases"] else "") for r in rows)
        print(f"  {model}: {listed or 'no versions'}")
    watcher = out.get("watcher")
    if watcher:
        if "error" in watcher:
            print(f"watcher: {watcher['error']}")
        else:
            print(
                f"watcher {watcher['source']} ({watcher['prometheus']}): {len(watcher['entities'])} entities, "
                f"{watcher['scored_rows']} rows scored, firing {len(watcher['firing'])}"
                + (f", last error: {watcher['last_error']}" if watcher.get("last_error") else "")
            )
    for model, rollout in out.get("rollouts", {}).items():
        if rollout:
            print(f"  rollout {model}: {_describe_rollout(rollout)}")
    print(f"recent drift events: {len(out['drift_events'])}")
    for e in out["drift_events"][:5]:
        print(f"  #{e['id']} {e['model']} {e['entity']} {e['detector']} p={e['p_value']} {e['drifted_features']}")
    print("jobs:")
    for job in out["jobs"][-5:]:
        print(f"  {job}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from cluster.lifecycle import down

    down()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.demo import run_demo

    run_demo(args.data, args.workdir, args.port, ray_port=args.ray_port, dashboard_port=args.dashboard_port)
    return 0


REGISTERED_MODEL_HELP = "autoencoder, lstm, ensemble (or raywatch-<model>)"  # promote's and rollback's MODEL


def _add_mode_argument(parser: argparse.ArgumentParser) -> None:
    """`--mode`, the Serve mode, as `serve` and `up` both take it."""
    parser.add_argument(
        "--mode",
        choices=["high-throughput", "default"],
        default="high-throughput",
        help="high-throughput: Ray 2.60's HAProxy ingress and gRPC between replicas",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raywatch", description="Incident detection for server telemetry on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="score detectors on labelled telemetry and write a JSON + markdown report")
    ev.add_argument(
        "--data", help="benchmark directory (<dataset>/<entity>/...); default $RAYWATCH_DATA or the shipped data/"
    )
    ev.add_argument("--detectors", default="pca,iforest,ecod", help="comma-separated detector names")
    ev.add_argument("--entities", help="comma-separated entities (dataset/entity or entity); default all")
    ev.add_argument("--out", default="evaluation.json", help="JSON report path; the markdown table goes beside it")
    ev.add_argument(
        "--jobs",
        type=int,
        default=1,
        help=(
            "(entity, detector) pairs evaluated at once, each in a process of its own with its share of the cores; "
            "torch fits with fewer threads can differ in the last digits (README)"
        ),
    )
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser("train", help="train a detector per entity on Ray Train, log to MLflow, register a version")
    tr.add_argument("--model", choices=DETECTOR_KINDS, help="required unless --fleet")
    tr.add_argument(
        "--fleet",
        action="store_true",
        help="train one autoencoder per metric schema across the entities (scores new entities from their first row)",
    )
    tr.add_argument("--data", help="benchmark directory; default $RAYWATCH_DATA or the shipped data/")
    tr.add_argument("--entities", help="comma-separated entities; default all")
    tr.add_argument("--epochs", type=int, help="epochs (autoencoder, lstm; the ensemble's evidence detectors)")
    tr.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    tr.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="auto: GPU when the cluster has one")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    tr.add_argument("--no-tuned", action="store_true", help="ignore the best config recorded by `raywatch tune`")
    tr.add_argument("--no-register", action="store_true", help="track in MLflow but register no version")
    tr.add_argument("--source", help="a Prometheus source config (YAML): learn from its history instead of --data")
    tr.add_argument("--since", default="6h", help="with --source: how much history to read, e.g. 6h, 2d")
    tr.set_defaults(func=cmd_train)

    wa = sub.add_parser("watch", help="score live Prometheus metrics through the Serve app; export scores; send alerts")
    wa.add_argument("--source", required=True, help="the Prometheus source config (YAML)")
    wa.add_argument("--serve-url", help="the Serve app (default: watch.serve_url, else http://127.0.0.1:8000)")
    wa.add_argument("--exporter-port", type=int, help="port of the /metrics exporter (0: none; default 9110)")
    wa.add_argument("--exporter-host", help="address the exporter listens on (default 127.0.0.1)")
    wa.add_argument("--detectors", help="comma-separated detectors (default: every one with a champion)")
    wa.add_argument("--delay", help="score a grid point once it is this old (e.g. 2s)")
    wa.add_argument("--backfill", help="a new entity starts this far back (default: from now)")
    wa.add_argument("--alertmanager", help="Alertmanager base URL (POST /api/v2/alerts)")
    wa.add_argument("--webhook", action="append", help="a JSON webhook for chat tools (repeatable)")
    wa.add_argument("--for", dest="alert_for", help="flagged this long before an alert fires (e.g. 1m)")
    wa.add_argument("--resolve-after", help="quiet this long before it resolves (e.g. 2m)")
    wa.add_argument("--once", action="store_true", help="one poll, then exit (prints what it did)")
    wa.add_argument("--duration", type=float, help="stop after this many seconds")
    wa.add_argument("--report-every", type=int, default=600, help="print a progress line every N scored rows")
    wa.set_defaults(func=cmd_watch)

    tu = sub.add_parser("tune", help="Ray Tune search (ASHA + Optuna); records the best config for `train`")
    tu.add_argument("--model", required=True, choices=DETECTOR_KINDS, help="the detector kind to search for")
    tu.add_argument("--data", help="telemetry directory (default: $RAYWATCH_DATA or the shipped data/)")
    tu.add_argument("--entities", help="entities whose training series the search uses; default asd/omi-1")
    tu.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    tu.add_argument("--max-epochs", type=int, default=8, help="most epochs a trial trains (default 8)")
    tu.add_argument(
        "--scheduler", choices=["asha", "none"], default="asha", help="asha stops poor trials early (default)"
    )
    tu.set_defaults(func=cmd_tune)

    # its options are train.compress's own (`raywatch compress --help` prints them): one parser for both commands
    co = sub.add_parser(
        "compress", add_help=False, help="ONNX export, INT8 quantization, distillation; register variants that pass"
    )
    co.set_defaults(func=cmd_compress)

    sv = sub.add_parser(
        "serve", help="deploy the Serve app (serve/config.yaml's app) on the current or a local cluster"
    )
    _add_mode_argument(sv)
    sv.add_argument("--host", default="127.0.0.1", help="the address the HTTP API listens on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="the HTTP API's port (default 8000)")
    sv.add_argument("--detach", action="store_true", help="return after deploying (with RAY_ADDRESS it always does)")
    sv.set_defaults(func=cmd_serve)

    pr = sub.add_parser("promote", help="set the champion alias (the old champion becomes `previous`)")
    pr.add_argument("model", help=REGISTERED_MODEL_HELP)
    pr.add_argument("version", help="the registered version to make champion (`raywatch models` lists them)")
    pr.set_defaults(func=cmd_promote)

    rb = sub.add_parser("rollback", help="restore the previous champion")
    rb.add_argument("model", help=REGISTERED_MODEL_HELP)
    rb.set_defaults(func=cmd_rollback)

    ro = sub.add_parser(
        "rollout",
        help="roll a version out as a canary (5%% -> 25%% -> 100%%), rolled back by itself on a breached guard",
        description="With VERSION: start a rollout (admin key from RAYWATCH_ADMIN_KEYS_FILE or RAYWATCH_ADMIN_KEYS). "
        "Without: print the model's rollout. Steps, guards and the test: README, 'Rollouts'.",
    )
    ro.add_argument("model", choices=DETECTOR_KINDS, help="the detector kind")
    ro.add_argument("version", nargs="?", help="the version to roll out (omit it to print the current rollout)")
    ro.add_argument("--steps", help="challenger shares in %%, comma-separated, ending at 100 (default 5,25,100)")
    ro.add_argument("--hold-s", type=float, help="least time each step is held (default 60)")
    ro.add_argument("--min-requests", type=int, help="least canary calls before a step advances (default 200)")
    ro.add_argument("--plan", help="a JSON file with any field of the plan (serve/rollout.py RolloutPlan)")
    ro.add_argument("--wait", action="store_true", help="follow the rollout until it ends (exit 1 if rolled back)")
    ro.add_argument("--abort", action="store_true", help="stop the rollout: all traffic back to the champion")
    ro.add_argument("--url", help="the Serve API (default: the one `raywatch up` started here, else :8000)")
    ro.set_defaults(func=cmd_rollout)

    md = sub.add_parser(
        "models", help="list registered versions, their aliases and the rollout requests of the retraining loop"
    )
    md.set_defaults(func=cmd_models)

    li = sub.add_parser(
        "lineage", help="resolve a served answer (a saved /v1/score response) to its versions, runs and data hashes"
    )
    li.add_argument(
        "response", nargs="?", default="-", help="a /v1/score or /v1/score/batch response (JSON); - reads stdin"
    )
    li.add_argument("--model", choices=DETECTOR_KINDS, help="with --version: one version instead of a response")
    li.add_argument("--version", help="with --model: the version to resolve")
    li.set_defaults(func=cmd_lineage)

    gen = sub.add_parser("generate", help="write a synthetic fleet with labelled incidents to CSV or Parquet")
    gen.add_argument("--machines", type=int, default=4, help="machines in the fleet (default 4)")
    gen.add_argument("--steps", type=int, default=4320, help="samples per machine (1-minute steps)")
    gen.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same fleet")
    gen.add_argument("--out", default="fleet.csv", help="output file; .parquet writes Parquet, else CSV")
    gen.set_defaults(func=cmd_generate)

    u = sub.add_parser("up", help="start a local Ray head (or join RAY_ADDRESS), train if needed, serve, monitor")
    u.add_argument("--data", help="training data when the registry has no champion (default: the shipped sets)")
    u.add_argument("--entities", help="comma-separated entities to train on (default: all)")
    u.add_argument("--port", type=int, default=8000, help="the Serve API (a free port if this one is taken)")
    u.add_argument("--ray-port", type=int, default=6379, help="the Ray head's GCS (a free port if this one is taken)")
    u.add_argument(
        "--dashboard-port", type=int, default=8265, help="the Ray dashboard and job server (a free port if taken)"
    )
    _add_mode_argument(u)
    u.add_argument("--epochs", type=int, help="epochs for models trained by `up`")
    u.add_argument(
        "--source", help="a Prometheus source config: train from its history, and start the watcher (a Ray actor)"
    )
    u.add_argument("--since", default="6h", help="with --source: history to train from when a model is missing")
    u.set_defaults(func=cmd_up)
    st = sub.add_parser("status", help="deployments, replicas, model versions, drift events and jobs")
    st.set_defaults(func=cmd_status)
    dn = sub.add_parser("down", help="stop what `raywatch up` started, and nothing else")
    dn.set_defaults(func=cmd_down)
    de = sub.add_parser("demo", help="the whole platform on this machine: evaluate, up, replay with drift, retrain")
    de.add_argument("--data", help="the shipped benchmark sets (default $RAYWATCH_DATA or the shipped data/)")
    de.add_argument("--workdir", default="runs/demo", help="the demo's own registry, state and data (recreated)")
    de.add_argument("--port", type=int, default=8000, help="the Serve API (a free port if this one is taken)")
    de.add_argument("--ray-port", type=int, default=6379, help="the Ray head's GCS (a free port if this one is taken)")
    de.add_argument("--dashboard-port", type=int, default=8265, help="the Ray dashboard and job server (ditto)")
    de.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, passed_on = parser.parse_known_args(argv)
    if passed_on and args.command != "compress":  # only compress hands its options on (to train.compress)
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    args.passed_on = passed_on
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (TelemetryError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"raywatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
