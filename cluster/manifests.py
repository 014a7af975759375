"""Checks for raywatch's cluster configs (ray-cluster.yaml, the KubeRay RayService and RayJob), without starting Ray.

python -m cluster.manifests check                       # validate the shipped files; exit 1 on problems
python -m cluster.manifests serve-config serve/config.yaml --host 0.0.0.0 --out cluster-serve.yaml
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import importlib.util
import json
import logging
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_LAUNCHER = REPO_ROOT / "ray-cluster.yaml"
RAYSERVICE = REPO_ROOT / "cluster" / "kuberay" / "rayservice.yaml"
RAYJOB = REPO_ROOT / "cluster" / "kuberay" / "rayjob.yaml"
SERVE_CONFIG = REPO_ROOT / "serve" / "config.yaml"

KUBERAY_API_VERSION = "ray.io/v1"
K8S_GPU = "nvidia.com/gpu"
# Serve reads these at import in every process Ray starts; raywatch's high-throughput mode needs them on all pods.
SERVE_THROUGHPUT_ENV = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
# AWS instance families with NVIDIA GPUs: a node type of these must declare GPU or the autoscaler never picks it.
AWS_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6")
# runtime_env URIs a remote cluster can fetch by itself (ray/_private/runtime_env/protocol.py, remote protocols).
REMOTE_URI_SCHEMES = ("http", "https", "s3", "gs", "azure", "abfss", "file")
LAUNCHER_COMMAND_FIELDS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
# Ray's own console scripts whose click options are checked: name -> source file inside the ray package.
RAY_CLIS = {"ray": "scripts/scripts.py", "serve": "serve/scripts.py"}
_SHELL_SEPARATORS = re.compile(r"&&|\|\||[;|&\n()]")
_SHELL_KEYWORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "time", "exec", "nohup"}


class ConfigError(Exception):
    """A config file that cannot be read, parsed, or is not what the checks expect."""


def load_yaml(path: str | Path) -> Any:
    """Parse one YAML document, raising ConfigError when it is missing or malformed."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e


def cluster_serve_config(serve_config_path: str | Path = SERVE_CONFIG, host: str = "0.0.0.0") -> dict[str, Any]:
    """serve/config.yaml with the proxies bound to `host`, for a cluster whose proxies must be reachable."""
    config = load_yaml(serve_config_path)
    if not isinstance(config, dict):
        raise ConfigError(f"{serve_config_path}: expected a Serve config mapping")
    config = copy.deepcopy(config)
    config.setdefault("http_options", {})["host"] = host
    return config


# --- the repository: pins, modules, argparse parsers -------------------------------------------------------------


def _pyproject(root: Path) -> dict[str, Any]:
    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirement(spec: str) -> tuple[str, str | None]:
    """(normalised name, pinned version or None) of a requirement such as `alibi-detect[torch]==0.13.0`."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:==\s*([^\s;,]+))?", spec)
    if not m:
        return spec.strip().lower(), None
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(2)


def _pins(root: Path) -> dict[str, str]:
    """pyproject.toml's direct dependencies: normalised name -> pinned version."""
    pins = {}
    for spec in _pyproject(root)["project"]["dependencies"]:
        name, version = _requirement(spec)
        if version:
            pins[name] = version
    return pins


def _module_file(module: str, root: Path) -> tuple[Path | None, bool]:
    """(source file that `python -m module` runs, whether it is this repository's); nothing is imported."""
    parts = module.split(".")
    candidate = root.joinpath(*parts)
    for path in (candidate.with_suffix(".py"), candidate / "__main__.py"):
        if path.is_file():
            return path, True
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: finding it imports nothing
    except (ImportError, ValueError):
        return None, False
    if spec is None:
        return None, False
    locations = [Path(p) for p in spec.submodule_search_locations or []]
    if len(parts) == 1 and not locations:
        return (Path(spec.origin), False) if spec.origin and Path(spec.origin).is_file() else (None, False)
    for location in locations:
        candidate = location.joinpath(*parts[1:])
        for path in (candidate.with_suffix(".py"), candidate / "__main__.py"):
            if path.is_file():
                return path, False
    return None, False


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _top_level_names(tree: ast.Module) -> dict[str, ast.AST]:
    """Names a module defines at top level (functions, classes, assignments, imports)."""
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def _has_main_guard(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            sides = [node.test.left, *node.test.comparators]
            if any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
                isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
            ):
                return True
    return False


class _RaisingParser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise ConfigError instead of exiting."""

    def error(self, message: str) -> Any:
        raise ConfigError(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise ConfigError(message or f"exited with status {status}")


class _Unknown(Exception):
    pass


def _value(node: ast.AST, constants: dict[str, Any]) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        pass
    if isinstance(node, ast.Name):
        if node.id in constants:
            return constants[node.id]
        if node.id in ("int", "float", "str"):
            return {"int": int, "float": float, "str": str}[node.id]
    raise _Unknown


def _statements(body: list[ast.stmt]):
    for stmt in body:
        yield stmt
        for field in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(stmt, field, []) or [])
        for handler in getattr(stmt, "handlers", []) or []:
            yield from _statements(handler.body)


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _constants(tree: ast.Module, root: Path, depth: int = 2) -> dict[str, Any]:
    """Module-level constants of a source file, and those it imports from this repository's modules
    (`choices=DETECTOR_KINDS`), followed `depth` imports deep; nothing is imported."""
    constants: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and depth > 0:
            path, ours = _module_file(node.module, root)
            if path is not None and ours:
                imported = _constants(_parse(path), root, depth - 1)
                constants.update({a.asname or a.name: imported[a.name] for a in node.names if a.name in imported})
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) == 1 and isinstance(targets[0], ast.Name):
                try:
                    constants[targets[0].id] = _value(node.value, constants)
                except _Unknown:
                    pass
    return constants


def _argparse_from_source(tree: ast.Module, prog: str, root: Path = REPO_ROOT) -> argparse.ArgumentParser | None:
    """Rebuild the argparse parser a module builds, from its source: add_argument/add_subparsers/add_parser calls."""
    constants = _constants(tree, root)
    builder = next(
        (
            f
            for f in tree.body
            if isinstance(f, ast.FunctionDef)
            and any(isinstance(n, ast.Call) and _call_name(n) == "ArgumentParser" for n in ast.walk(f))
        ),
        None,
    )
    if builder is None:
        return None
    objects: dict[str, Any] = {}
    root_parser = None
    for stmt in _statements(builder.body):
        call = stmt.value if isinstance(stmt, ast.Assign | ast.Expr) else None
        if not isinstance(call, ast.Call):
            continue
        args, kwargs = [], {}
        try:
            args = [_value(a, constants) for a in call.args]
        except _Unknown:
            continue
        for kw in call.keywords:
            if kw.arg is None:
                continue
            try:
                kwargs[kw.arg] = _value(kw.value, constants)
            except _Unknown:
                pass  # help=f"...", type=custom_function: irrelevant to which arguments parse
        kwargs.pop("help", None)
        name, target = _call_name(call), None
        owner = (
            objects.get(call.func.value.id)
            if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
            else None
        )
        try:
            if name == "ArgumentParser":
                target = _RaisingParser(prog=prog)
                root_parser = root_parser or target
            elif owner is None:
                continue
            elif name == "add_argument":
                owner.add_argument(*args, **kwargs)
            elif name == "add_subparsers":
                target = owner.add_subparsers(**{k: v for k, v in kwargs.items() if k in ("dest", "required")})
            elif name == "add_parser":
                target = owner.add_parser(*args, **{k: v for k, v in kwargs.items() if k == "aliases"})
            elif name in ("add_argument_group", "add_mutually_exclusive_group"):
                target = owner
        except (TypeError, ValueError, argparse.ArgumentError):
            continue
        if target is not None and isinstance(stmt, ast.Assign):
            for t in stmt.targets:
                if isinstance(t, ast.Name):
                    objects[t.id] = target
    return root_parser


def _console_scripts(root: Path) -> dict[str, str]:
    return dict(_pyproject(root)["project"].get("scripts", {}))


def check_python_command(argv: list[str], field: str, root: str | Path = REPO_ROOT) -> list[str]:
    """Problems with `python -m module ...` or a raywatch console script: module exists, its argparse accepts argv."""
    root = Path(root)
    if len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-m":
        module, args, shown = argv[2], argv[3:], f"python -m {argv[2]}"
        path, ours = _module_file(module, root)
        if path is None:
            return [f"{field}: `{shown}`: no module {module!r} in the repository or the environment"]
        if ours and path.name != "__main__.py":
            tree = _parse(path)
            if not _has_main_guard(tree):
                return [f"{field}: `{shown}`: {path.relative_to(root)} has no `if __name__ == '__main__':` block"]
    elif argv and argv[0] in _console_scripts(root):
        target = _console_scripts(root)[argv[0]]
        module, _, attr = target.partition(":")
        args, shown = argv[1:], argv[0]
        path, ours = _module_file(module, root)
        if path is None:
            return [f"{field}: console script {shown!r} points to missing module {module!r}"]
        if attr and attr.split(".")[0] not in _top_level_names(_parse(path)):
            return [f"{field}: console script {shown!r} points to {target}, which does not define {attr!r}"]
    else:
        return []
    if not ours:
        return []  # a tool from the environment (python -m pip ...): its existence is enough
    parser = _argparse_from_source(_parse(path), prog=shown, root=root)
    if parser is None:
        return []
    try:
        parser.parse_args(args)
    except ConfigError as e:
        return [f"{field}: `{shown} {shlex.join(args)}`: {e}"]
    return []


def check_import_path(
    import_path: str, field: str, root: str | Path = REPO_ROOT, takes_args: bool = False
) -> list[str]:
    """Problems with a Serve import_path (`module:attr` or `module.attr`): the module and attribute must exist."""
    root = Path(root)
    module, sep, attr = import_path.partition(":")
    if not sep:
        module, _, attr = import_path.rpartition(".")
    if not module or not attr:
        return [f"{field}: {import_path!r} is not of the form module:attribute"]
    path, _ = _module_file(module, root)
    if path is None:
        return [f"{field}: {import_path!r}: no module {module!r} (looked in {root} and the environment)"]
    node = _top_level_names(_parse(path)).get(attr)
    if node is None:
        return [f"{field}: {import_path!r}: {path.name} defines no {attr!r}"]
    if takes_args and isinstance(node, ast.FunctionDef) and not (node.args.args or node.args.vararg):
        return [f"{field}: {import_path!r} takes no arguments but the config passes `args`"]
    return []


# --- Ray's CLIs (ray start, serve deploy): option names from their click decorators ------------------------------


def _ray_package() -> Path | None:
    spec = importlib.util.find_spec("ray")  # the ray.__file__ directory, found without importing ray
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _click_options_in(nodes: list[ast.AST]) -> set[str]:
    options = set()
    for node in nodes:
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and _call_name(call) == "option":
                for arg in call.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        options.update(o for o in arg.value.split("/") if o.startswith("-"))
    return options


@functools.lru_cache(maxsize=8)
def _module_click_options(source: Path) -> frozenset[str]:
    return frozenset(_click_options_in([_parse(source)])) if source.is_file() else frozenset()


@functools.lru_cache(maxsize=8)
def _click_commands(source: Path, package: Path) -> dict[str, set[str] | None]:
    """Subcommand name -> its option strings, read from `@<group>.command` functions of a click CLI module."""
    tree = _parse(source)
    imports = {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    commands = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        names = [
            d
            for d in fn.decorator_list
            if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
        ]
        if not names:
            continue
        given = [kw.value.value for kw in names[0].keywords if kw.arg == "name" and isinstance(kw.value, ast.Constant)]
        name = (names[0].args[0].value if names[0].args and isinstance(names[0].args[0], ast.Constant) else None) or (
            given[0] if given else fn.name.replace("_", "-")
        )
        options = _click_options_in(fn.decorator_list) | {"--help"}
        for d in fn.decorator_list:  # shared option sets such as @add_click_logging_options live in other modules
            if isinstance(d, ast.Name) and imports.get(d.id, "").startswith("ray."):
                options |= _module_click_options(package.joinpath(*imports[d.id].split(".")[1:]).with_suffix(".py"))
        commands[name] = options
    for call in ast.walk(tree):  # groups from other modules (`ray job`, `ray list`): present, options not checked
        if isinstance(call, ast.Call) and _call_name(call) == "add_command":
            for kw in call.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    commands.setdefault(kw.value.value, None)
    return commands


def check_ray_cli(argv: list[str], field: str) -> list[str]:
    """Problems with `ray <sub> --opt ...` or `serve <sub> --opt ...`: unknown subcommands or options."""
    package = _ray_package()
    if package is None or len(argv) < 2 or argv[0] not in RAY_CLIS:
        return []
    commands = _click_commands(package / RAY_CLIS[argv[0]], package)
    if argv[1] not in commands:
        return [f"{field}: `{argv[0]} {argv[1]}` is not a command of this Ray's `{argv[0]}` CLI"]
    if commands[argv[1]] is None:
        return []
    unknown = [a.split("=")[0] for a in argv[2:] if a.startswith("--") and a.split("=")[0] not in commands[argv[1]]]
    return [f"{field}: `{argv[0]} {argv[1]}` has no option {u}" for u in unknown]


def _shell_commands(command: str) -> list[list[str]]:
    """The simple commands in a shell line, as argv lists (keywords, VAR=value prefixes and redirections dropped)."""
    out = []
    for segment in _SHELL_SEPARATORS.split(command):
        try:
            words = shlex.split(segment)
        except ValueError:
            continue
        while words and (words[0] in _SHELL_KEYWORDS or re.match(r"^[A-Za-z_]\w*=", words[0])):
            words = words[1:]
        cut = next((i for i, w in enumerate(words) if re.match(r"^\d*[<>]", w)), len(words))
        if words[:cut]:
            out.append(words[:cut])
    return out


# --- ray-cluster.yaml ----------------------------------------------------------------------------------------------


def _path(parts: list[Any] | tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", str(p)):
            out += f".{p}" if out else str(p)
        else:
            out += f"[{str(p)!r}]"
    return out or "<top level>"


def _launcher_schema() -> dict[str, Any] | None:
    package = _ray_package()
    schema = package / "autoscaler" / "ray-schema.json" if package else None
    return json.loads(schema.read_text()) if schema and schema.is_file() else None


def _ray_launcher_checks(config: dict[str, Any]) -> list[str]:
    """What `ray up` itself checks after filling in the provider defaults (head type known, min <= max workers)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        return []
    ray_log = logging.getLogger("ray.autoscaler._private.util")
    level = ray_log.level
    ray_log.setLevel(logging.WARNING)  # prepare_config narrates the defaults it fills in at INFO
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # ray raises ValueError, KeyError, AssertionError, jsonschema errors
        return [f"ray up would reject it: {e}"]
    finally:
        ray_log.setLevel(level)
    return []


def validate_cluster_launcher(path: str | Path = CLUSTER_LAUNCHER, root: str | Path = REPO_ROOT) -> list[str]:
    """Problems with a `ray up` config: Ray's JSON schema, GPU workers, file mounts, and the commands it runs."""
    root = Path(root)
    try:
        config = load_yaml(path)
    except ConfigError as e:
        return [str(e)]
    if not isinstance(config, dict):
        return [f"{path}: expected a mapping at the top level"]
    problems = []
    schema = _launcher_schema()
    if schema is None:
        problems.append("ray/autoscaler/ray-schema.json not found: is ray installed?")
    else:
        import jsonschema

        validator = jsonschema.Draft7Validator(schema)
        for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
            problems.append(f"{_path(list(error.absolute_path))}: {error.message}")
    if not problems:
        problems += _ray_launcher_checks(config)

    node_types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    workers = {name: t for name, t in node_types.items() if name != head and isinstance(t, dict)}
    for name, node_type in workers.items():
        resources = node_type.get("resources") or {}
        node_config = node_type.get("node_config") or {}
        instance = str(node_config.get("InstanceType", ""))
        has_gpu_hardware = instance.split(".")[0] in AWS_GPU_FAMILIES or bool(node_config.get("guestAccelerators"))
        if has_gpu_hardware and not resources.get("GPU"):
            problems.append(
                f"available_node_types[{name!r}].resources.GPU: {instance or 'the node'} has GPUs but resources declares "
                "none, so the autoscaler never launches it for GPU work"
            )
    if workers and not any((t.get("resources") or {}).get("GPU", 0) >= 1 for t in workers.values()):
        problems.append("available_node_types: no worker node type declares resources.GPU >= 1 (the GPU workers)")

    for remote, local in (config.get("file_mounts") or {}).items():
        local = str(local)
        if not local.startswith(("~", "/")) and not (root / local).exists():
            problems.append(f"file_mounts[{remote!r}]: local path {local!r} does not exist under {root}")

    docker = config.get("docker") or {}
    ray_version = _pins(root).get("ray")
    for key in ("image", "head_image", "worker_image"):
        image = str(docker.get(key, ""))
        if ray_version and image.startswith("rayproject/") and not image.partition(":")[2].startswith(ray_version):
            problems.append(f"docker.{key}: {image} does not match ray=={ray_version} in pyproject.toml")

    commands: list[tuple[str, str]] = []
    for key in LAUNCHER_COMMAND_FIELDS:
        commands += [(f"{key}[{i}]", c) for i, c in enumerate(config.get(key) or [])]
    for name, node_type in node_types.items():
        for key in ("initialization_commands", "worker_setup_commands"):
            field = f"available_node_types[{name!r}].{key}"
            commands += [(f"{field}[{i}]", c) for i, c in enumerate(node_type.get(key) or [])]
    for field, command in commands:
        for argv in _shell_commands(str(command)):
            problems += check_python_command(argv, field, root)
            problems += check_ray_cli(argv, field)

    text = "\n".join(c for _, c in commands)
    uri = re.search(r"MLFLOW_TRACKING_URI=['\"]?([^\s'\"]+)", text)
    if uri is None:
        problems.append("setup/start commands: MLFLOW_TRACKING_URI is never set; every node needs the tracking server")
    elif not re.match(r"^(https?|databricks)", uri.group(1)):
        problems.append(f"MLFLOW_TRACKING_URI={uri.group(1)}: a cluster needs a tracking server URL, not a local store")
    if re.search(r"RAY_AUTH_MODE=['\"]?token", text):
        mounts = " ".join(map(str, (config.get("file_mounts") or {}).keys()))
        if ".ray/auth_token" not in mounts and not re.search(r"RAY_AUTH_TOKEN(_PATH)?=", text):
            problems.append("RAY_AUTH_MODE=token but no token reaches the nodes (file_mounts ~/.ray/auth_token)")
    return problems


# --- KubeRay ---------------------------------------------------------------------------------------------------------


def _env_value(container: dict[str, Any], name: str) -> tuple[bool, str | None]:
    for item in container.get("env") or []:
        if isinstance(item, dict) and item.get("name") == name:
            return True, None if "valueFrom" in item else str(item.get("value", ""))
    return False, None


def _check_container(container: Any, at: str, ray_version: str | None, required_env: dict[str, str]) -> list[str]:
    if not isinstance(container, dict):
        return [f"{at}: expected a container mapping"]
    problems = []
    image = container.get("image")
    if not image:
        problems.append(f"{at}.image: missing")
    elif (
        ray_version
        and str(image).startswith("rayproject/")
        and not str(image).partition(":")[2].startswith(ray_version)
    ):
        problems.append(f"{at}.image: {image} does not match ray=={ray_version} in pyproject.toml")
    limits = (container.get("resources") or {}).get("limits") or {}
    for resource in ("cpu", "memory"):
        if resource not in limits:
            problems.append(f"{at}.resources.limits.{resource}: missing (Ray sizes the node from the limits)")
    present, uri = _env_value(container, "MLFLOW_TRACKING_URI")
    if not present:
        problems.append(f"{at}.env.MLFLOW_TRACKING_URI: missing; every pod must reach the MLflow tracking server")
    elif uri is not None and not re.match(r"^(https?|databricks)", uri):
        problems.append(f"{at}.env.MLFLOW_TRACKING_URI: {uri!r} is not a tracking server URL")
    for name, expected in required_env.items():
        present, value = _env_value(container, name)
        if not present or (value is not None and value != expected):
            problems.append(f"{at}.env.{name}: must be {expected!r} on every Ray container")
    return problems


def _check_group(group: Any, at: str, ray_version: str | None, required_env: dict[str, str]) -> list[str]:
    if not isinstance(group, dict):
        return [f"{at}: missing"]
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers")
    if not containers:
        return [f"{at}.template.spec.containers: missing"]
    problems = []
    if not isinstance(group.get("rayStartParams", {}), dict):
        problems.append(f"{at}.rayStartParams: expected a mapping of ray start flags to strings")
    return problems + _check_container(containers[0], f"{at}.template.spec.containers[0]", ray_version, required_env)


def _gpu_count(container: dict[str, Any], kind: str) -> float:
    value = ((container.get("resources") or {}).get(kind) or {}).get(K8S_GPU, 0)
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def check_ray_cluster_spec(
    spec: Any, at: str, root: str | Path = REPO_ROOT, required_env: dict[str, str] | None = None
) -> list[str]:
    """Problems with a RayClusterSpec: versions, autoscaling, head and worker containers, a GPU worker group."""
    if not isinstance(spec, dict):
        return [f"{at}: missing"]
    required_env = required_env or {}
    ray_version = _pins(Path(root)).get("ray")
    problems = []
    if ray_version and str(spec.get("rayVersion", "")) != ray_version:
        problems.append(f"{at}.rayVersion: {spec.get('rayVersion')!r}, but pyproject.toml pins ray=={ray_version}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{at}.enableInTreeAutoscaling: must be true for the GPU group to scale")
    problems += _check_group(spec.get("headGroupSpec"), f"{at}.headGroupSpec", ray_version, required_env)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{at}.workerGroupSpecs: missing (raywatch needs a GPU worker group)"]
    gpu_groups = 0
    for i, group in enumerate(groups):
        where = f"{at}.workerGroupSpecs[{i}]"
        problems += _check_group(group, where, ray_version, required_env)
        if not isinstance(group, dict):
            continue
        if not group.get("groupName"):
            problems.append(f"{where}.groupName: missing")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas")
        if not isinstance(high, int) or not isinstance(low, int) or low > high:
            problems.append(f"{where}: minReplicas ({low}) and maxReplicas ({high}) must be integers with min <= max")
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        container = containers[0] if isinstance(containers[0], dict) else {}
        image, name = str(container.get("image", "")), str(group.get("groupName", ""))
        wants_gpu = "gpu" in name.lower() or re.search(r"-(gpu|cu\d+)$", image) or _gpu_count(container, "requests")
        if _gpu_count(container, "limits") >= 1:
            gpu_groups += 1
        elif wants_gpu:
            problems.append(
                f"{where}.template.spec.containers[0].resources.limits.{K8S_GPU}: missing; a GPU worker group "
                "must request GPUs in its limits or Kubernetes schedules it without one"
            )
    if not gpu_groups:
        problems.append(f"{at}.workerGroupSpecs: no group requests {K8S_GPU} in its limits")
    return problems


def check_runtime_env(runtime_env: Any, at: str, root: str | Path = REPO_ROOT) -> list[str]:
    """Problems with a cluster-side runtime_env: a fetchable working_dir and pip pins equal to pyproject.toml's."""
    if not isinstance(runtime_env, dict):
        return [f"{at}: expected a runtime_env mapping (working_dir, pip)"]
    problems = []
    working_dir = str(runtime_env.get("working_dir", ""))
    if not working_dir:
        problems.append(f"{at}.working_dir: missing; the pods need the raywatch code")
    elif working_dir.partition("://")[0] not in REMOTE_URI_SCHEMES or "://" not in working_dir:
        problems.append(f"{at}.working_dir: {working_dir!r} is local; a cluster needs a remote zip URI (https, s3, gs)")
    pip = runtime_env.get("pip")
    packages = pip.get("packages") if isinstance(pip, dict) else pip
    if not isinstance(packages, list):
        return problems + [f"{at}.pip: missing; list raywatch's pinned dependencies"]
    listed = dict(_requirement(str(p)) for p in packages)
    for name, version in _pins(Path(root)).items():
        if name == "ray":
            continue  # the image provides it
        if name not in listed:
            problems.append(f"{at}.pip: {name}=={version} (pyproject.toml) is missing")
        elif listed[name] != version:
            problems.append(f"{at}.pip: {name}=={listed[name]}, but pyproject.toml pins {name}=={version}")
    return problems


def _load_manifest(path: str | Path, kind: str) -> tuple[Any, list[str]]:
    """(the manifest, []) or (None, why it cannot be checked further: unreadable, or not a `kind`)."""
    try:
        doc = load_yaml(path)
    except ConfigError as e:
        return None, [str(e)]
    return doc, _check_kind(doc, kind)


def _check_kind(doc: Any, kind: str) -> list[str]:
    if not isinstance(doc, dict):
        return [f"expected a {kind} manifest"]
    problems = []
    if doc.get("apiVersion") != KUBERAY_API_VERSION:
        problems.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {KUBERAY_API_VERSION!r}")
    if doc.get("kind") != kind:
        problems.append(f"kind: {doc.get('kind')!r}, expected {kind!r}")
    if not isinstance(doc.get("spec"), dict):
        problems.append("spec: missing")
    return problems


def _differences(ours: Any, theirs: Any, at: str) -> list[str]:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            if key not in ours or key not in theirs:
                out.append(f"{at}.{key}")
            else:
                out += _differences(ours[key], theirs[key], f"{at}.{key}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in _differences(a, b, f"{at}[{i}]")]
    return [] if ours == theirs else [at]


def _serve_schema_problems(serve_config: dict[str, Any], at: str) -> list[str]:
    try:
        from pydantic import ValidationError
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return []
    try:
        ServeDeploySchema.model_validate(serve_config)
    except ValidationError as e:
        return [f"{at}.{_path(list(err['loc']))}: {err['msg']}" for err in e.errors()]
    return []


def validate_rayservice(
    path: str | Path = RAYSERVICE, serve_config_path: str | Path = SERVE_CONFIG, root: str | Path = REPO_ROOT
) -> list[str]:
    """Problems with a RayService: kind, serveConfigV2 == serve/config.yaml's apps, import paths, cluster spec."""
    doc, problems = _load_manifest(path, "RayService")
    if problems:
        return problems
    try:
        serve_config = load_yaml(serve_config_path)
    except ConfigError as e:
        return [str(e)]
    spec, at = doc["spec"], "spec.serveConfigV2"
    raw = spec.get("serveConfigV2")
    if not isinstance(raw, str) or not raw.strip():
        problems.append(f"{at}: missing (a YAML string holding the Serve config)")
        config: dict[str, Any] = {}
    else:
        try:
            config = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            config = {}
            problems.append(f"{at}: not valid YAML ({e})")
        if not isinstance(config, dict):
            problems.append(f"{at}: expected a Serve config mapping")
            config = {}
    if config:
        problems += _serve_schema_problems(config, at)
        apps = config.get("applications") or []
        ours = [{k: v for k, v in app.items() if k != "runtime_env"} for app in apps if isinstance(app, dict)]
        theirs = serve_config.get("applications") if isinstance(serve_config, dict) else None
        if ours != theirs:
            where = _differences(ours, theirs, f"{at}.applications")
            problems.append(f"{', '.join(where) or at + '.applications'}: differs from {Path(serve_config_path).name}")
        if config.get("proxy_location") != (serve_config or {}).get("proxy_location"):
            problems.append(f"{at}.proxy_location: differs from {Path(serve_config_path).name}")
        host = str((config.get("http_options") or {}).get("host", "0.0.0.0"))
        if host in ("127.0.0.1", "localhost"):
            problems.append(f"{at}.http_options.host: {host} is unreachable from the Kubernetes Service; use 0.0.0.0")
        for i, app in enumerate(apps):
            if not isinstance(app, dict):
                continue
            if not app.get("import_path"):
                problems.append(f"{at}.applications[{i}].import_path: missing")
            else:
                field = f"{at}.applications[{i}].import_path"
                problems += check_import_path(str(app["import_path"]), field, root, takes_args="args" in app)
            problems += check_runtime_env(app.get("runtime_env"), f"{at}.applications[{i}].runtime_env", root)
    required_env = dict.fromkeys(SERVE_THROUGHPUT_ENV, "1")
    problems += check_ray_cluster_spec(spec.get("rayClusterConfig"), "spec.rayClusterConfig", root, required_env)
    return problems


def validate_rayjob(path: str | Path = RAYJOB, root: str | Path = REPO_ROOT) -> list[str]:
    """Problems with a RayJob: kind, an entrypoint its module's argparse accepts, runtime env, cluster spec."""
    doc, problems = _load_manifest(path, "RayJob")
    if problems:
        return problems
    spec = doc["spec"]
    entrypoint = spec.get("entrypoint")
    argv: list[str] = []
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        problems.append("spec.entrypoint: missing")
    else:
        argv = shlex.split(entrypoint)
        before = len(problems)
        problems += check_python_command(argv, "spec.entrypoint", root)
        if len(problems) == before and not (
            (len(argv) >= 3 and argv[1] == "-m") or (argv and argv[0] in _console_scripts(Path(root)))
        ):
            problems.append(f"spec.entrypoint: {entrypoint!r} runs neither `python -m <module>` nor a raywatch script")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes: must be true so the job's GPU pods are deleted when it ends")
    raw = spec.get("runtimeEnvYAML")
    try:
        runtime_env = yaml.safe_load(raw) if isinstance(raw, str) else None
    except yaml.YAMLError as e:
        runtime_env = None
        problems.append(f"spec.runtimeEnvYAML: not valid YAML ({e})")
    problems += check_runtime_env(runtime_env, "spec.runtimeEnvYAML", root)
    cluster = spec.get("rayClusterSpec")
    problems += check_ray_cluster_spec(cluster, "spec.rayClusterSpec", root)
    data = next((a.split("=", 1)[1] for a in argv if a.startswith("--data=")), None) or next(
        (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--data"), None
    )
    if data and data.startswith("/") and isinstance(cluster, dict):
        head = (((cluster.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}).get("containers") or [
            {}
        ]
        mounts = [str(m.get("mountPath", "")) for m in (head[0] or {}).get("volumeMounts") or [] if isinstance(m, dict)]
        if not any(data == m or data.startswith(m.rstrip("/") + "/") for m in mounts):
            problems.append(
                f"spec.entrypoint: --data {data} is not mounted in the head container, where the driver reads it "
                "(spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].volumeMounts)"
            )
    return problems


# --- command line ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `python -m cluster.manifests` command line: `check` and `serve-config`."""
    parser = argparse.ArgumentParser(prog="python -m cluster.manifests", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate ray-cluster.yaml and the KubeRay manifests")
    check.add_argument("--launcher", default=str(CLUSTER_LAUNCHER))
    check.add_argument("--rayservice", default=str(RAYSERVICE))
    check.add_argument("--rayjob", default=str(RAYJOB))
    check.add_argument("--serve-config", default=str(SERVE_CONFIG))
    serve = sub.add_parser("serve-config", help="write a Serve config with the proxies bound to --host")
    serve.add_argument("source", help="Serve config YAML, e.g. serve/config.yaml")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--out", help="output path; default stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; 1 when `check` finds problems."""
    args = build_parser().parse_args(argv)
    if args.command == "serve-config":
        text = yaml.safe_dump(cluster_serve_config(args.source, args.host), sort_keys=False)
        if args.out:
            Path(args.out).expanduser().write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    results = {
        args.launcher: validate_cluster_launcher(args.launcher),
        args.rayservice: validate_rayservice(args.rayservice, args.serve_config),
        args.rayjob: validate_rayjob(args.rayjob),
    }
    for path, problems in results.items():
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  - {problem}")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
