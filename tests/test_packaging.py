"""The installed distribution carries every package of the tree, and `fedseek demo` finds our demo;
the install contract: Python 3.11-3.13, ranges in pyproject.toml, exact pins in constraints.txt, a wheel.

pyproject.toml lists packages by hand (`examples/` installs as `fedseek_examples`, see the comment
there), so a new sub-package that is not listed would be missing from a real install; this keeps the
list whole. The second test runs the console script's import from outside the repository, where
Opacus' own top-level `examples` package is on sys.path too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"examples": "fedseek_examples"}


def _packages_in_tree() -> set[str]:
    found = set()
    for top in ("federation", "node", "coordinator", "privacy", "explain", "examples"):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join((IMPORT_NAMES.get(parts[0], parts[0]), *parts[1:])))
    return found


def test_every_package_of_the_tree_is_listed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == _packages_in_tree()


def test_the_demo_imports_from_outside_the_repository(tmp_path: Path) -> None:
    code = "import fedseek_examples.demo.run as r, federation.cli.main; print(r.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(ROOT / "examples")


# ---- install: ranges in pyproject.toml, exact pins in constraints.txt, a wheel, Pythons 3.11-3.13 ----------
SUPPORTED = ("3.11", "3.12", "3.13")


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _requirements() -> list[Requirement]:
    project = _project()
    return [Requirement(r) for r in (*project["dependencies"], *project["optional-dependencies"]["test"])]


def _constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # one `==X` per line: exact, or it is not a pin
        assert spec.operator == "==" and "*" not in spec.version, line
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_requires_python_admits_3_11_to_3_13() -> None:
    spec = SpecifierSet(_project()["requires-python"])
    assert all(spec.contains(f"{v}.0") for v in SUPPORTED)
    assert not spec.contains("3.10.14") and not spec.contains("3.14.0")


def test_dependencies_are_ranges_not_pins() -> None:
    """So FedSeek can share an environment: each dependency has a floor and a ceiling, none an exact pin."""
    for req in _requirements():
        ops = {s.operator for s in req.specifier}
        assert ops == {">=", "<"}, f"{req}: expected a >=floor,<ceiling range"


def test_constraints_pin_every_dependency_inside_its_range() -> None:
    pins = _constraints()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt pins no {req.name}"
        assert req.specifier.contains(pins[name]), f"constraints.txt's {req.name}=={pins[name]} is outside {req}"


def test_constraints_are_what_this_environment_runs() -> None:
    """CI installs constraints.txt exactly, so the tests ran against these versions (torch's +cpu aside)."""
    drift = []
    for name, pinned in _constraints().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            drift.append(f"{name}=={pinned} is not installed")
            continue
        if installed.public != pinned.public:
            drift.append(f"{name}=={pinned}, installed {installed}")
    assert not drift, "; ".join(drift)


def test_the_torch_build_follows_the_machine(tmp_path: Path) -> None:
    """scripts/torch-build.sh: CPU pinned as +cpu where no GPU answers (CI), the PyPI (CUDA) build where one does."""
    fake_gpu = tmp_path / "gpu-bin"
    fake_gpu.mkdir()
    # A stand-in for the driver's tool: the real one answers only on a GPU machine (checked on an H100 by hand).
    (fake_gpu / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    (fake_gpu / "nvidia-smi").chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    pin = _constraints()["torch"]

    def run(*, path: str, links: Path) -> tuple[list[str], str]:
        env = {**os.environ, "PATH": path, "PIP_FIND_LINKS": str(links)}
        env.pop("FEDSEEK_TORCH", None)
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "torch-build.sh"), str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split(), done.stderr

    no_gpu = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists())
    args, _ = run(path=no_gpu, links=wheels)
    assert args == ["-c", str(tmp_path / "torch-cpu.txt"), "--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    assert (tmp_path / "torch-cpu.txt").read_text().strip() == f"torch=={pin}+cpu"
    (wheels / f"torch-{pin}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    args, note = run(path=no_gpu, links=wheels)
    assert args == ["-c", str(tmp_path / "torch-cpu.txt")] and str(wheels) in note  # the wheel on disk, no index
    args, note = run(path=f"{fake_gpu}:{no_gpu}", links=wheels)
    assert args == [] and "CUDA" in note
    if "+cpu" in metadata.version("torch"):  # this environment was set up by the CPU branch
        assert Version(metadata.version("torch")).public == pin.public


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_the_source_compiles_on_newer_pythons(version: str) -> None:
    """Every module parses and compiles under 3.12 and 3.13 (their ML wheels are not installed here)."""
    python = _python(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    code = (
        "import pathlib, sys\n"
        "n = 0\n"
        "for top in sys.argv[1:]:\n"
        "    for f in pathlib.Path(top).rglob('*.py'):\n"
        "        compile(f.read_text(encoding='utf-8'), str(f), 'exec'); n += 1\n"
        "print(n)\n"
    )
    tops = [str(ROOT / t) for t in ("federation", "node", "coordinator", "privacy", "explain", "examples")]
    done = subprocess.run([python, "-c", code, *tops], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) > 100


def _python(version: str) -> str | None:
    """An interpreter of ``version``: on PATH, else one pyenv holds (its shim answers only when selected)."""
    found = [
        shutil.which(f"python{version}"),
        *map(str, Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}")),
    ]
    for python in filter(None, found):
        if subprocess.run([python, "-V"], capture_output=True, timeout=60).returncode == 0:
            return python
    return None


def test_the_wheel_carries_every_package(tmp_path: Path) -> None:
    """A real `pip wheel` of a copy of the tree: every package, the Flower app's data file, metadata, the script."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for top in ("federation", "node", "coordinator", "privacy", "explain", "examples"):
        shutil.copytree(ROOT / top, src / top, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedseek-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
        entry = zf.read(meta.replace("METADATA", "entry_points.txt")).decode()
    for package in _packages_in_tree():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "federation/protocol/flower_app/pyproject.toml" in names
    assert f"Requires-Python: {SpecifierSet(_project()['requires-python'])}" in text
    assert "fedseek = federation.cli.main:main" in entry
