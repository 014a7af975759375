"""The cluster configs (ray-cluster.yaml, KubeRay RayService and RayJob) and their validators: pure file parsing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import manifests as configs

GPU_NODE = "ray.worker.gpu"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _launcher_problems(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> list[str]:
    doc = copy.deepcopy(_load(configs.CLUSTER_LAUNCHER))
    change(doc)
    return configs.validate_cluster_launcher(_write(tmp_path, doc))


def _rayservice_problems(
    tmp_path: Path,
    change: Callable[[dict[str, Any]], None] = lambda doc: None,
    serve: Callable[[dict[str, Any]], None] | None = None,
) -> list[str]:
    doc = copy.deepcopy(_load(configs.RAYSERVICE))
    if serve is not None:
        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        serve(serve_config)
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config, sort_keys=False)
    change(doc)
    return configs.validate_rayservice(_write(tmp_path, doc), configs.SERVE_CONFIG)


def _rayjob_problems(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> list[str]:
    doc = copy.deepcopy(_load(configs.RAYJOB))
    change(doc)
    return configs.validate_rayjob(_write(tmp_path, doc))


def _mentions(problems: list[str], *words: str) -> bool:
    return any(all(w in p for w in words) for p in problems)


# --- the shipped files ----------------------------------------------------------------------------------------------


def test_shipped_cluster_launcher_config_is_valid():
    assert configs.CLUSTER_LAUNCHER.is_file()
    assert configs.validate_cluster_launcher(configs.CLUSTER_LAUNCHER) == []


def test_shipped_rayservice_is_valid():
    assert configs.validate_rayservice(configs.RAYSERVICE, configs.SERVE_CONFIG) == []


def test_shipped_rayjob_is_valid():
    assert configs.validate_rayjob(configs.RAYJOB) == []


def test_check_command_passes_on_shipped_files(capsys):
    assert configs.main(["check"]) == 0
    assert capsys.readouterr().out.count(": ok") == 3


def test_shipped_launcher_has_cpu_head_and_autoscaling_gpu_workers():
    doc = _load(configs.CLUSTER_LAUNCHER)
    assert doc["cluster_name"] == "raywatch" and doc["provider"]["type"] == "aws"
    head = doc["available_node_types"][doc["head_node_type"]]
    gpu = doc["available_node_types"][GPU_NODE]
    assert "GPU" not in head["resources"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] > 0
    start = " ".join(doc["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start and "serve deploy" in start


def test_rayservice_embeds_serve_config_applications():
    doc = _load(configs.RAYSERVICE)
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    shipped = _load(configs.SERVE_CONFIG)
    apps = [{k: v for k, v in app.items() if k != "runtime_env"} for app in embedded["applications"]]
    assert apps == shipped["applications"]
    assert embedded["applications"][0]["import_path"] == "serve.app:build_app"
    assert doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_serve_config_command_binds_all_interfaces(tmp_path):
    out = tmp_path / "cluster-serve.yaml"
    argv = ["serve-config", str(configs.SERVE_CONFIG), "--host", "0.0.0.0", "--out", str(out)]
    assert configs.main(argv) == 0
    written, shipped = _load(out), _load(configs.SERVE_CONFIG)
    assert written["http_options"]["host"] == "0.0.0.0"
    assert written["applications"] == shipped["applications"]


# --- ray-cluster.yaml: what the validator must catch -----------------------------------------------------------------


def test_launcher_missing_required_field(tmp_path):
    problems = _launcher_problems(tmp_path, lambda d: d.pop("provider"))
    assert _mentions(problems, "'provider' is a required property")


def test_launcher_node_type_without_resources(tmp_path):
    problems = _launcher_problems(tmp_path, lambda d: d["available_node_types"][GPU_NODE].pop("resources"))
    assert _mentions(problems, GPU_NODE, "'resources' is a required property")


def test_launcher_gpu_worker_without_gpu_resource(tmp_path):
    problems = _launcher_problems(tmp_path, lambda d: d["available_node_types"][GPU_NODE].update(resources={"CPU": 4}))
    assert _mentions(problems, f"available_node_types['{GPU_NODE}'].resources.GPU", "g5.xlarge")


def test_launcher_unknown_schema_field(tmp_path):
    problems = _launcher_problems(tmp_path, lambda d: d["available_node_types"][GPU_NODE].update(gpus=1))
    assert _mentions(problems, GPU_NODE, "'gpus' was unexpected")


def test_launcher_max_workers_below_min_workers(tmp_path):
    def change(d):
        d["max_workers"] = 1
        d["available_node_types"][GPU_NODE]["min_workers"] = 2

    assert _mentions(_launcher_problems(tmp_path, change), "max_workers")


def test_launcher_command_with_missing_python_module(tmp_path):
    def change(d):
        d["head_start_ray_commands"][2] = d["head_start_ray_commands"][2].replace("cluster.manifests", "cluster.nope")

    assert _mentions(_launcher_problems(tmp_path, change), "head_start_ray_commands[2]", "cluster.nope")


def test_launcher_command_with_arguments_the_module_rejects(tmp_path):
    def change(d):
        d["head_start_ray_commands"][2] = d["head_start_ray_commands"][2].replace("--host", "--hots")

    assert _mentions(_launcher_problems(tmp_path, change), "head_start_ray_commands[2]", "--hots")


def test_launcher_ray_start_with_unknown_option(tmp_path):
    def change(d):
        d["head_start_ray_commands"][1] = d["head_start_ray_commands"][1].replace("--dashboard-host", "--dash-host")

    assert _mentions(_launcher_problems(tmp_path, change), "`ray start` has no option --dash-host")


def test_launcher_missing_file_mount_source(tmp_path):
    problems = _launcher_problems(tmp_path, lambda d: d["file_mounts"].update({"~/extra": "no/such/dir"}))
    assert _mentions(problems, "file_mounts['~/extra']", "no/such/dir")


def test_launcher_local_mlflow_store(tmp_path):
    def change(d):
        d["setup_commands"] = [
            c.replace("http://mlflow.raywatch.internal:5000", "sqlite:///mlflow.db") for c in d["setup_commands"]
        ]

    assert _mentions(_launcher_problems(tmp_path, change), "MLFLOW_TRACKING_URI=sqlite:///mlflow.db")


def test_launcher_image_of_another_ray_version(tmp_path):
    problems = _launcher_problems(tmp_path, lambda d: d["docker"].update(worker_image="rayproject/ray:2.40.0-gpu"))
    assert _mentions(problems, "docker.worker_image", "2.40.0")


# --- RayService ------------------------------------------------------------------------------------------------------

RAYSERVICE_GPU_GROUP = "spec.rayClusterConfig.workerGroupSpecs[1]"


def test_rayservice_missing_serve_config(tmp_path):
    problems = _rayservice_problems(tmp_path, lambda d: d["spec"].pop("serveConfigV2"))
    assert _mentions(problems, "spec.serveConfigV2: missing")


def test_rayservice_wrong_kind(tmp_path):
    problems = _rayservice_problems(tmp_path, lambda d: d.update(kind="RayCluster"))
    assert _mentions(problems, "kind", "RayService")


def test_rayservice_import_path_attribute_missing(tmp_path):
    problems = _rayservice_problems(
        tmp_path, serve=lambda c: c["applications"][0].update(import_path="serve.app:build_everything")
    )
    assert _mentions(problems, "applications[0].import_path", "defines no 'build_everything'")


def test_rayservice_import_path_module_missing(tmp_path):
    problems = _rayservice_problems(
        tmp_path, serve=lambda c: c["applications"][0].update(import_path="serve.missing:build_app")
    )
    assert _mentions(problems, "applications[0].import_path", "no module 'serve.missing'")


def test_rayservice_serve_config_drift(tmp_path):
    problems = _rayservice_problems(
        tmp_path, serve=lambda c: c["applications"][0]["deployments"][1].update(max_ongoing_requests=3)
    )
    assert _mentions(problems, "applications[0].deployments[1].max_ongoing_requests", "differs from config.yaml")


def test_rayservice_serve_schema_violation(tmp_path):
    def change(config):
        config["applications"][0]["deployments"][1]["max_ongoing_requests"] = "many"

    problems = _rayservice_problems(tmp_path, serve=change)
    assert _mentions(problems, "deployments[1].max_ongoing_requests", "valid integer")


def test_rayservice_proxies_on_localhost(tmp_path):
    problems = _rayservice_problems(tmp_path, serve=lambda c: c["http_options"].update(host="127.0.0.1"))
    assert _mentions(problems, "http_options.host", "127.0.0.1")


def test_rayservice_gpu_worker_without_gpu(tmp_path):
    def change(d):
        resources = d["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0][
            "resources"
        ]
        for kind in ("limits", "requests"):
            resources[kind].pop("nvidia.com/gpu")

    problems = _rayservice_problems(tmp_path, change)
    assert _mentions(problems, f"{RAYSERVICE_GPU_GROUP}.template.spec.containers[0].resources.limits.nvidia.com/gpu")


def test_rayservice_head_without_image(tmp_path):
    def change(d):
        d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image")

    problems = _rayservice_problems(tmp_path, change)
    assert _mentions(problems, "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].image: missing")


def test_rayservice_pip_pin_drift(tmp_path):
    def change(config):
        pip = config["applications"][0]["runtime_env"]["pip"]
        pip[:] = ["torch==2.0.0" if p.startswith("torch==") else p for p in pip]

    problems = _rayservice_problems(tmp_path, serve=change)
    assert _mentions(problems, "runtime_env.pip", "torch==2.0.0", "torch==2.13.0")


def test_rayservice_without_throughput_env(tmp_path):
    def change(d):
        container = d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] != "RAY_SERVE_ENABLE_HA_PROXY"]

    problems = _rayservice_problems(tmp_path, change)
    assert _mentions(problems, "workerGroupSpecs[0]", "RAY_SERVE_ENABLE_HA_PROXY")


# --- RayJob ----------------------------------------------------------------------------------------------------------


def _entrypoint(entrypoint: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["spec"].update(entrypoint=entrypoint)


def test_rayjob_entrypoint_names_missing_module(tmp_path):
    problems = _rayjob_problems(tmp_path, _entrypoint("python -m train.pipelines --model lstm --data /data"))
    assert _mentions(problems, "spec.entrypoint", "no module 'train.pipelines'")


@pytest.mark.parametrize(
    ("entrypoint", "message"),
    [
        ("python -m train.pipeline --model lstm --data /data --bogus 1", "unrecognized arguments: --bogus"),
        ("python -m train.pipeline --model gru --data /data", "argument --model: invalid choice: 'gru'"),
        ("python -m train.pipeline --data /data", "required: --model"),
        ("python -m train.pipeline --model lstm --data /data --epochs ten", "invalid int value: 'ten'"),
        ("raywatch trian --model lstm", "invalid choice: 'trian'"),
    ],
)
def test_rayjob_entrypoint_arguments_checked_against_argparse(tmp_path, entrypoint, message):
    assert _mentions(_rayjob_problems(tmp_path, _entrypoint(entrypoint)), "spec.entrypoint", message)


def test_rayjob_entrypoint_accepts_valid_variants(tmp_path):
    for entrypoint in (
        "python -m train.pipeline --model ensemble --data /data --entities smd/machine-1-1 --num-workers 2",
        "raywatch train --model lstm --data /data --gpu yes",
    ):
        assert _rayjob_problems(tmp_path, _entrypoint(entrypoint)) == [], entrypoint


def test_rayjob_data_not_mounted_on_head(tmp_path):
    problems = _rayjob_problems(tmp_path, _entrypoint("python -m train.pipeline --model lstm --data /telemetry"))
    assert _mentions(problems, "--data /telemetry is not mounted")


def test_rayjob_keeps_cluster_after_job(tmp_path):
    problems = _rayjob_problems(tmp_path, lambda d: d["spec"].update(shutdownAfterJobFinishes=False))
    assert _mentions(problems, "spec.shutdownAfterJobFinishes")


def test_rayjob_local_working_dir(tmp_path):
    problems = _rayjob_problems(tmp_path, lambda d: d["spec"].update(runtimeEnvYAML="working_dir: .\n"))
    assert _mentions(problems, "spec.runtimeEnvYAML.working_dir", "is local")


def test_rayjob_gpu_worker_without_gpu(tmp_path):
    def change(d):
        resources = d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
        resources["limits"].pop("nvidia.com/gpu")

    problems = _rayjob_problems(tmp_path, change)
    assert _mentions(problems, "spec.rayClusterSpec.workerGroupSpecs[0]", "limits.nvidia.com/gpu")


def test_rayjob_missing_file_is_a_problem(tmp_path):
    assert _mentions(configs.validate_rayjob(tmp_path / "absent.yaml"), "cannot read")


# --- the argparse rebuilt from source matches the real parser ----------------------------------------------------------


def test_parser_rebuilt_from_source_matches_the_real_one():
    import ast

    rebuilt = configs._argparse_from_source(ast.parse(Path(configs.__file__).read_text()), "x")
    real = configs.build_parser()
    # defaults computed from paths do not survive the rebuild; which arguments exist and parse does
    assert vars(rebuilt.parse_args(["check"])).keys() == vars(real.parse_args(["check"])).keys()
    argv = ["serve-config", "a.yaml", "--host", "::", "--out", "b.yaml"]
    assert vars(rebuilt.parse_args(argv)) == vars(real.parse_args(argv))
    with pytest.raises(configs.ConfigError):
        rebuilt.parse_args(["serve-config"])


def test_ray_cli_checks_subcommands_and_options():
    assert configs.check_ray_cli(["ray", "job", "submit", "--working-dir", ".", "--", "python"], "cmd") == []
    assert configs.check_ray_cli(["serve", "deploy", "x.yaml", "--address", "http://h:8265"], "cmd") == []
    assert _mentions(configs.check_ray_cli(["ray", "strat", "--head"], "cmd"), "`ray strat` is not a command")
    assert _mentions(configs.check_ray_cli(["serve", "deploy", "--adress", "x"], "cmd"), "no option --adress")


def test_environment_modules_resolve_without_import():
    assert configs.check_python_command(["python", "-m", "pip", "install", "x"], "cmd") == []
    assert _mentions(configs.check_python_command(["python", "-m", "no_such_module_xyz"], "cmd"), "no_such_module_xyz")
