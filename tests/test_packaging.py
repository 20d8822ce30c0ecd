"""The installed distribution carries every package of the tree, and `fedseek demo` finds our demo.

pyproject.toml lists packages by hand (`examples/` installs as `fedseek_examples`, see the comment
there), so a new sub-package that is not listed would be missing from a real install; this keeps the
list whole. The second test runs the console script's import from outside the repository, where
Opacus' own top-level `examples` package is on sys.path too.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

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
