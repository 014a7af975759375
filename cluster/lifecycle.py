"""Local lifecycle: `raywatch up` / `status` / `down`.

`up` starts a local Ray head (`ray start --head` with the dashboard and job server, on Ray's default
ports when they are free; it creates the cluster token when there is none) or joins $RAY_ADDRESS,
trains small models if the registry has none, deploys the Serve app, starts the drift monitors and
prints where everything is. What it started is recorded in
./.raywatch/up.json, so `down` stops exactly that and nothing else (a joined cluster, or
any other Ray on the machine, is left alone). A head that `up` starts also gets ./.raywatch/env, the
shell exports Ray's own CLIs need (`source .raywatch/env`); `down` removes it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.auth_token import require_token
from cluster.local import RAY_DASHBOARD_PORT, RAY_GCS_PORT, LocalHead, group_alive, preferred_port
from detect.kinds import DETECTOR_KINDS, traits_of
from detect.state import state_dir

APP = "raywatch"
HIGH_THROUGHPUT_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def _raywatch_dir() -> Path:
    path = Path(os.environ.get("RAYWATCH_HOME", ".")) / ".raywatch"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_file() -> Path:
    """Where `up` records what it started: ./.raywatch/up.json (the registry and state it used are in it)."""
    return _raywatch_dir() / "up.json"


def client_env_file() -> Path:
    """./.raywatch/env: `source` it for `ray`, `serve` and `ray job submit` against the head `up` started."""
    return _raywatch_dir() / "env"


def _cluster_to_join() -> str | None:
    """$RAY_ADDRESS, unless it is raywatch's own head exported by .raywatch/env (then it is dropped here:
    this process connects to the head through the recorded state, and a stale one must not win)."""
    address = os.environ.get("RAY_ADDRESS")
    if address and address == os.environ.get("RAYWATCH_HEAD"):
        os.environ.pop("RAY_ADDRESS")
        return None
    return address


def read_state() -> dict[str, Any] | None:
    path = _state_file()
    return json.loads(path.read_text()) if path.exists() else None


def _connect(state: dict[str, Any]) -> str | None:
    """Connect this process to the cluster; returns its dashboard URL when Ray reports one."""
    import ray  # deferred here and below: Ray, torch (train, serve) and MLflow load in seconds; `status --help` should not

    if ray.is_initialized():
        return state.get("dashboard")
    context = ray.init(address=state["address"], log_to_driver=False, namespace="raywatch")
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and "://" not in url else url


def up(
    data_dir: str | None = None,
    entities: list[str] | None = None,
    port: int = 8000,
    mode: str = "high-throughput",
    epochs: int | None = None,
    monitor: dict[str, Any] | None = None,
    progress: Callable[[str], None] = print,
    source: str | None = None,
    since: str = "6h",
    watch: dict[str, Any] | None = None,
    ray_port: int = RAY_GCS_PORT,
    dashboard_port: int = RAY_DASHBOARD_PORT,
) -> dict[str, Any]:
    """Start (or join) Ray, make sure every model has a champion, deploy the app and the monitors.

    With `source` (a Prometheus source config) missing models learn from its last `since` of history
    (the unsupervised ones: Prometheus has no incident labels) and the watcher starts as a detached
    Ray actor that scores the source live through the app (`ingest.watch`)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read once per process, before ray is imported
    if mode == "high-throughput":
        for key, value in HIGH_THROUGHPUT_ENV.items():
            os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    os.environ.setdefault("RAYWATCH_STATE_DIR", str(state_dir()))
    state = read_state()
    joining = _cluster_to_join()
    if joining:
        where = require_token(joining)
        state = {"address": joining, "started_head": False, "dashboard": None}
        progress(f"joining the Ray cluster at {joining} (cluster token: {where})")
    elif state and state.get("started_head") and group_alive(state.get("pgid")):
        progress(f"reusing the local Ray head started by an earlier `raywatch up` ({state['address']})")
    else:
        progress("starting a local Ray head (ray start --head, token authentication on)")
        head, notes = LocalHead.on_preferred_ports(
            ray_port,
            dashboard_port,
            num_cpus=os.cpu_count() or 2,
            log_path=state_dir() / "ray-head.log",
            client_env=client_env_file(),
        )
        port, moved = preferred_port(port, avoid=[head.port, head.dashboard_port])
        notes += [f"the Serve port you asked for is taken: the API listens on {port}"] if moved else []
        for note in notes:
            progress(note)
        head.start(
            env=HIGH_THROUGHPUT_ENV if mode == "high-throughput" else {"RAY_SERVE_ENABLE_HA_PROXY": "0"},
            progress=progress,
        )
        progress(f"Ray head {head.address}, dashboard {head.dashboard_url}; shell setup: source {head.client_env}")
        state = {
            "address": head.address,
            "dashboard": head.dashboard_url,
            "port": head.port,
            "pgid": head.process.pid,
            "started_head": True,
            "client_env": str(head.client_env),
            "temp_dir": str(head.temp_dir),
        }
    state.update(serve_port=port, mode=mode, state_dir=str(state_dir()), tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    _state_file().write_text(json.dumps(state, indent=2))  # written now: `down` can clean up a failed `up`
    dashboard = _connect(state)
    from ray import serve  # deferred (Ray, torch, MLflow): see _connect

    from monitoring import monitor as monitors
    from serve.app import build_app
    from train import registry

    state["dashboard"] = state.get("dashboard") or dashboard
    for model in DETECTOR_KINDS:
        if registry.alias_version(model, registry.CHAMPION) is None:
            if source and traits_of(model).learns_from_labels:
                progress(f"no {model} champion: not trained from a Prometheus source (it needs incident labels)")
                continue
            progress(f"no {model} champion in {registry.tracking_uri()}: training one")
            from train.pipeline import train_model  # torch: only when a model is trained here

            overrides = {"epochs": epochs} if epochs else {}
            train_model(model, data_dir, entities, overrides, progress=progress, source=source, since=since)
    progress(f"deploying the Serve app on 127.0.0.1:{port} ({mode} mode)")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {"reload_interval_s": 1.0, "state_dir": str(state_dir()), "monitor": monitor or {}}
    serve.run(build_app(app_args), name=APP, route_prefix="/")
    for model in DETECTOR_KINDS:
        monitors.get_or_create(model, (monitor or {}).get("config"), str(state_dir()))
    if source:
        import ray  # deferred: see _connect

        from ingest.watch import start_actor

        settings = {"serve_url": f"http://127.0.0.1:{port}", **(watch or {})}
        state["watcher"], actor = start_actor(source, settings, state_dir_path=str(state_dir()))
        exporter = ray.get(actor.status.remote(), timeout=60)["exporter_port"]
        if exporter:
            state["watch_metrics"] = f"http://127.0.0.1:{exporter}/metrics"
        progress(f"watching {source} live: actor {state['watcher']}")
    _state_file().write_text(json.dumps(state, indent=2))
    return state


def urls(state: dict[str, Any]) -> dict[str, str]:
    base = f"http://127.0.0.1:{state['serve_port']}"
    return {
        "api": f"{base}/v1/score",
        "docs": f"{base}/docs",
        "dashboard": state.get("dashboard") or "(the cluster's dashboard)",
        "mlflow": f"mlflow ui --backend-store-uri {state['tracking_uri']}",
        **({"watch": state["watch_metrics"]} if state.get("watch_metrics") else {}),
    }


def state_name(state: Any) -> str:
    """A Serve status enum as its value ("HEALTHY", "RUNNING"), not its repr ("DeploymentStatus.HEALTHY")."""
    return str(getattr(state, "value", state))


def status() -> dict[str, Any]:
    """Deployments and replicas, model versions, recent drift events, jobs."""
    state = read_state()
    if state is None:
        raise RuntimeError(f"raywatch is not up here (no {_state_file()}); run `raywatch up`")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ["MLFLOW_TRACKING_URI"] = state["tracking_uri"]
    _connect(state)
    from ray import serve  # deferred (Ray, MLflow): see _connect

    from monitoring.events import DriftEventStore
    from serve.rollout import RolloutStore
    from train import jobs, registry  # not train.pipeline: torch is not needed to list versions

    out: dict[str, Any] = {"state": state}
    try:
        app = serve.status().applications.get(APP)
        out["deployments"] = (
            {
                name: {
                    "status": state_name(d.status),
                    "replicas": {state_name(k): n for k, n in d.replica_states.items()},
                }
                for name, d in app.deployments.items()
            }
            if app
            else {}
        )
    except Exception as exc:
        out["deployments"] = {"error": str(exc)}
    out["models"] = {m: registry.versions(m) for m in DETECTOR_KINDS}
    out["drift_events"] = DriftEventStore(Path(state["state_dir"]) / "drift.db").events(only_drift=True, limit=10)
    rollouts = RolloutStore(Path(state["state_dir"]) / "traffic.db")
    out["rollouts"] = {m: rollouts.get(m) for m in DETECTOR_KINDS}
    if state.get("watcher"):
        import ray  # deferred: see _connect

        from ingest.watch import NAMESPACE as WATCH_NAMESPACE

        try:
            actor = ray.get_actor(state["watcher"], namespace=WATCH_NAMESPACE)
            out["watcher"] = ray.get(actor.status.remote(), timeout=30)
        except Exception as exc:
            out["watcher"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        out["jobs"] = jobs.list_jobs(state.get("dashboard"))
    except Exception as exc:
        out["jobs"] = [{"error": str(exc)}]
    return out


def down(progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Stop what `up` started: the Serve app, the monitors, and the local head if `up` started it."""
    state = read_state()
    if state is None:
        progress("nothing to stop: raywatch is not up here")
        return {"stopped": []}
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    stopped = []
    head_alive = state.get("started_head") and group_alive(state.get("pgid"))
    if head_alive or not state.get("started_head"):
        try:
            _connect(state)
            import ray  # deferred: see _connect
            from ray import serve

            from monitoring import monitor as monitors

            if state.get("watcher"):
                from ingest.watch import stop_actor

                if stop_actor(state["watcher"]):
                    stopped.append(state["watcher"])
            serve.shutdown()
            stopped.append("serve")
            stopped += monitors.stop_all()
            ray.shutdown()
        except Exception as exc:
            progress(f"could not reach the cluster to stop Serve: {exc}")
    if head_alive:
        temp_dir = Path(state["temp_dir"]) if state.get("temp_dir") else None
        began = time.monotonic()
        LocalHead(port=state["port"], pgid=state["pgid"], temp_dir=temp_dir).stop()
        stopped.append(f"ray head {state['address']} in {time.monotonic() - began:.1f} s")
    if state.get("client_env"):
        Path(state["client_env"]).unlink(missing_ok=True)
        progress(f"removed {state['client_env']}")
    _state_file().unlink(missing_ok=True)
    for item in stopped:
        progress(f"stopped {item}")
    return {"stopped": stopped}
