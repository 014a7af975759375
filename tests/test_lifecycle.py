"""`raywatch up` / `status` / `down` as a new user runs them, on a machine where Ray never ran: an empty
HOME, no cluster token anywhere, separate processes, a cluster of their own. `up` creates the token
and `.raywatch/env`; after `source .raywatch/env`, every `ray job submit` line of the README's job block
runs as written (short flags appended), and `serve status`, `ray status` and `ray job list` work.
`down` stops exactly what `up` started and removes `.raywatch/env`."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from detect.data import load_series

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# Flags appended to each README job line to keep it short; a README line that matches none fails the test,
# so a new entry point in the README gets its short settings here.
SHORT_FLAGS = {
    "-m train.pipeline": "--epochs 1 --entities asd/omi-2",
    "-m tune.search": "--num-samples 2 --max-epochs 1 --entities asd/omi-2",
    "-m train.compress": "--variants int8",
    "-m train.retrain": "--epochs 1 --entities asd/omi-2",
}


def readme_job_lines() -> list[str]:
    """The `ray job submit` lines of the README's block "Every long step is also a Ray job entry point"."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"Every long step is also a Ray job entry point.*?```bash\n(.*?)```", text, re.S)
    assert block, "README: the job block is missing"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line.startswith("ray job submit")]


def short(line: str) -> str:
    flags = [extra for module, extra in SHORT_FLAGS.items() if module in line]
    assert flags, f"no short settings for the README line {line!r}: add them to SHORT_FLAGS"
    return f"{line} {flags[0]}"


def in_raywatch_shell(command: str, env_file: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`command` in a bash that ran `source .raywatch/env`, from the project root (what `--working-dir .` uploads)."""
    script = f"source {shlex.quote(str(env_file))} && {command}"
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def fresh_user_env(home: Path) -> dict[str, str]:
    """This machine's environment as a new user has it: an empty HOME (the package-installer configuration
    aside), no Ray address, no cluster token anywhere, no raywatch venv on PATH."""
    drop = {"RAYWATCH_JOB_ADDRESS", "RAY_ADDRESS", "RAYWATCH_HEAD", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop and k != "RAY_AUTH_MODE"}
    venv = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv)
    env["HOME"] = str(home)
    return env


def test_up_on_a_fresh_machine_then_ray_tools_as_typed(data_dir, mlflow_store, tmp_path_factory):
    from serving_fixtures import register_small_models

    from cluster.local import free_ports
    from train import registry

    register_small_models(load_series("asd", "omi-2", data_dir))  # every model has a champion: up trains nothing
    home = tmp_path_factory.mktemp("empty-home")
    env = fresh_user_env(home)
    cli = os.path.join(os.path.dirname(sys.executable), "raywatch")
    port, ray_port, dashboard_port = free_ports(3)  # three distinct ones (asked one by one, two were the same)
    ports = ["--port", str(port), "--ray-port", str(ray_port), "--dashboard-port", str(dashboard_port)]
    up = subprocess.run([cli, "up", *ports], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads((mlflow_store / ".raywatch" / "up.json").read_text())
    try:
        token_file = home / ".ray" / "auth_token"
        assert token_file.is_file(), "raywatch up did not create the cluster token"
        token = token_file.read_text().strip()
        assert len(token) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert f"cluster token: created in {token_file}" in up.stdout
        assert token not in up.stdout + up.stderr, "the token itself was printed"
        env_file = mlflow_store / ".raywatch" / "env"
        exports = env_file.read_text()
        assert "RAY_AUTH_MODE=token" in exports and os.path.dirname(sys.executable) in exports
        assert token not in exports
        assert "source .raywatch/env" in up.stdout
        assert f"http://127.0.0.1:{port}/docs" in up.stdout and "mlflow ui" in up.stdout
        assert state["started_head"] and state["pgid"]
        os.killpg(state["pgid"], 0)  # the head is running in its own process group
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["detectors"]["autoencoder"] is True

        jobs = readme_job_lines()
        assert len(jobs) >= 4, jobs
        for line in jobs:
            ran = in_raywatch_shell(short(line), env_file, env, timeout=600)
            assert ran.returncode == 0, f"{line}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
            assert "succeeded" in ran.stdout + ran.stderr, ran.stdout[-2000:]
        assert len(registry.versions("lstm")) >= 2  # the README's train job registered into up's registry
        serve_status = in_raywatch_shell("serve status", env_file, env, timeout=120)
        assert serve_status.returncode == 0 and "raywatch:" in serve_status.stdout, serve_status.stderr[-2000:]
        assert "RUNNING" in serve_status.stdout
        ray_status = in_raywatch_shell("ray status", env_file, env, timeout=120)
        assert ray_status.returncode == 0 and "Active:" in ray_status.stdout, ray_status.stderr[-2000:]
        job_list = in_raywatch_shell("ray job list", env_file, env, timeout=120)
        assert job_list.returncode == 0 and job_list.stdout.count("SUCCEEDED") >= len(jobs), job_list.stderr[-2000:]

        status = subprocess.run([cli, "status"], env=env, capture_output=True, text=True, timeout=300)
        assert status.returncode == 0, status.stderr[-3000:]
        assert "AutoencoderDetector" in status.stdout and "v1[champion]" in status.stdout
        assert "deployment RaywatchAPI: HEALTHY, replicas: 1 RUNNING" in status.stdout, status.stdout  # no enum reprs
    finally:
        down = subprocess.run([cli, "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "stopped ray head" in down.stdout and "raywatch-drift-autoencoder" in down.stdout
    # Ray 2.60's head drains its node for 30 s on SIGTERM unless told not to (cluster.local.DRAIN_ON_STOP_ENV)
    head_stop_s = float(re.search(r"stopped ray head \S+ in ([\d.]+) s", down.stdout).group(1))
    assert head_stop_s < 20, down.stdout
    assert not env_file.exists(), "raywatch down left .raywatch/env behind"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(state["pgid"], 0)
            time.sleep(0.5)
        except ProcessLookupError:
            break
    else:
        pytest.fail("processes of the head that `up` started are still running")
    assert not (mlflow_store / ".raywatch" / "up.json").exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_joining_a_cluster_without_a_token_says_where_to_put_it(tmp_path):
    env = fresh_user_env(tmp_path)
    env["RAY_ADDRESS"] = "127.0.0.1:1"  # nothing is there; the token check comes first
    cli = os.path.join(os.path.dirname(sys.executable), "raywatch")
    joined = subprocess.run([cli, "up"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert joined.returncode == 2
    assert "needs its token" in joined.stderr and str(tmp_path / ".ray" / "auth_token") in joined.stderr
    assert not (tmp_path / ".ray").exists(), "joining a cluster must never create a token"


def test_stopping_the_head_stops_what_left_its_process_group(tmp_path):
    """`ray start --head` runs as a session leader; Ray's workers move to process groups of their own and
    Serve's HAProxy is a worker's child. `killpg` of the head's group alone once left an HAProxy behind
    after `raywatch down`, holding its fixed ports (9101, 8404) so that the next `raywatch up` failed. A
    stand-in head here: a session leader whose child moved to a group of its own."""
    from cluster.local import LocalHead, session_pids

    spawn = "import subprocess, sys, time; print(subprocess.Popen(['sleep', '300'], process_group=0).pid, flush=True); time.sleep(300)"
    leader = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True, start_new_session=True)
    straggler = int(leader.stdout.readline())
    assert os.getpgid(straggler) != leader.pid and os.getsid(straggler) == leader.pid  # left the group, not the session
    assert set(session_pids(leader.pid)) == {leader.pid, straggler}
    LocalHead(pgid=leader.pid, process=leader).stop(timeout_s=10)
    assert session_pids(leader.pid) == []  # neither runs (an exited one may linger unreaped: not running)


def test_a_head_gets_distinct_ports_and_refuses_one_port_for_two():
    """Ports asked for one at a time can come back equal (a CI run once gave a head's GCS and dashboard the
    same one, and `ray start` refused): a head's ports are chosen apart, and one port for both is refused
    before Ray is asked."""
    from cluster.local import LocalHead, free_ports

    taken = free_ports(20)
    assert len(set(taken)) == 20
    assert not set(free_ports(20, avoid=taken)) & set(taken)
    for _ in range(20):
        head = LocalHead(port=taken[0])
        assert head.dashboard_port not in (None, taken[0])
        head = LocalHead(dashboard_port=taken[1])
        assert head.port not in (None, taken[1])
    with pytest.raises(ValueError, match=f"two ports, got {taken[0]} for both"):
        LocalHead(port=taken[0], dashboard_port=taken[0])
