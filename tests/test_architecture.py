"""The shape of the product: importing a raywatch module starts no Ray (no cluster, no child process)
and reads no environment variable, so settings reach code as arguments, not as import-time reads.

Each package is imported, module by module, in a fresh interpreter. `os.environ` reads are recorded by
the code that made them: a read counts when the first caller outside `os` and `collections.abc` is a file
of the package under test, which is what module-level code reading `os.environ` / `os.getenv` looks like
(Ray, torch and MLflow read the environment as they import too; those reads are theirs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]

# Runs in a fresh interpreter: argv[1] is the directory the package sits in, argv[2] the package.
# Prints one JSON object: the modules imported, environment reads and Ray starts found.
PROBE = textwrap.dedent(
    """
    import importlib, json, os, pkgutil, sys
    root, package = sys.argv[1], sys.argv[2]
    sys.path.insert(0, root)
    folder = os.path.join(root, package)

    def skipped(filename):  # os.getenv, os.environ.get and Mapping's get/__contains__ sit between
        return filename.endswith(("/os.py", "<frozen os>")) or "_collections_abc" in filename
    reads = []

    def record(key):
        frame = sys._getframe(2)
        while frame is not None and skipped(frame.f_code.co_filename):
            frame = frame.f_back
        if frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(folder + os.sep):
            reads.append(f"{os.path.relpath(frame.f_code.co_filename, root)}:{frame.f_lineno} reads {key!r}")

    getitem, iterate = os._Environ.__getitem__, os._Environ.__iter__

    def recording_getitem(self, key):
        record(key)
        return getitem(self, key)

    def recording_iter(self):
        record("(all)")
        return iterate(self)

    os._Environ.__getitem__, os._Environ.__iter__ = recording_getitem, recording_iter

    def children():
        mine = str(os.getpid())
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == mine:
                out.append(open(f"/proc/{pid}/cmdline").read().replace("\\0", " ")[:120])
        return out

    started, modules = [], [package]
    modules += [m.name for m in pkgutil.walk_packages([folder], package + ".")]
    for name in modules:
        importlib.import_module(name)
        ray = sys.modules.get("ray")
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            started.append(f"{name}: ray.is_initialized()")
        started += [f"{name}: started {cmd}" for cmd in children()]
    print(json.dumps({"modules": modules, "env_reads": reads, "ray_started": started}))
    """
)


def probe(root: Path, package: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(root), package],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env=env,
    )
    assert done.returncode == 0, f"importing {package} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_starts_no_ray_and_reads_no_environment(package):
    found = probe(REPO, package)
    assert len(found["modules"]) >= 2, f"{package}: no modules found to import"
    assert found["ray_started"] == [], f"importing {package} started Ray: {found['ray_started']}"
    assert found["env_reads"] == [], f"{package} reads the environment at import time: {found['env_reads']}"


def test_the_probe_sees_import_time_reads_and_ray_starts(tmp_path):
    """The checks can fail: a module that reads the environment and one that starts Ray are both caught,
    and a read inside a function (not called at import) is not."""
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "reads.py").write_text(
        "import os\nREPLICAS = int(os.environ.get('PROBE_REPLICAS', 1))\nHOME = os.getenv('HOME')\n"
        "def later():\n    return os.environ.get('PROBE_LATER')\n"
    )
    (pkg / "starts.py").write_text("import ray\nray.init(address='local', num_cpus=1, include_dashboard=False)\n")
    # a throwaway local Ray without token authentication (the session's Ray head uses it)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    found = probe(tmp_path, "probe_pkg", env)
    reads = found["env_reads"]
    assert any("reads.py:2 reads 'PROBE_REPLICAS'" in r for r in reads), reads
    assert any("reads.py:3 reads 'HOME'" in r for r in reads), reads
    assert not any("PROBE_LATER" in r for r in reads), reads
    assert any(s.startswith("probe_pkg.starts: ray.is_initialized()") for s in found["ray_started"]), found
