"""The layering declared in pyproject.toml holds, and its contracts really catch a lower layer reaching up.

The contracts are run as `lint-imports` runs them in scripts/test.sh. The negative cases run the very same
pyproject.toml against a copy of the tree with one import added, so a contract that was mistyped into
checking nothing (a wrong module name, a missing layer) fails here instead of passing forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("federation", "node", "coordinator", "privacy", "explain", "examples", "tests")
IMPORT_NAMES = {"examples": "fedseek_examples"}  # directory -> import name (pyproject package-dir)
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """Run the contracts of `root`'s pyproject.toml over the packages in `root` (and nowhere else)."""
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo"]
    for contract in contracts:
        args += ["--contract", contract]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The packages and pyproject.toml, copied: a place to break the layering without touching the repository."""
    for package in PACKAGES:
        target = tmp_path / IMPORT_NAMES.get(package, package)
        shutil.copytree(ROOT / package, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(root: Path, module: str, line: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    if not path.exists():
        path = root.joinpath(*module.split("."), "__init__.py")
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_copy_is_a_fair_control(tree_copy: Path) -> None:
    """Unchanged, the copy keeps every contract: a broken one below is broken by the added import alone."""
    assert lint_imports(tree_copy).returncode == 0


# Packages on both sides (an import in the importer's __init__.py), so moving modules about keeps these valid.
@pytest.mark.parametrize(
    ("importer", "imported", "contract"),
    [
        ("federation.errors", "federation.security", "layers"),
        ("federation.protocol", "privacy", "layers"),
        ("federation.ops", "federation.security", "layers"),
        ("privacy", "node", "layers"),
        ("explain", "coordinator", "layers"),
        ("node", "federation.cli", "layers"),
        ("fedseek_examples", "federation.cli", "layers"),
        ("node", "coordinator", "node-coordinator"),
        ("coordinator", "node", "node-coordinator"),
        ("federation.security", "fedseek_examples", "federation-below-apps"),
        ("tests.node", "tests.coordinator", "tests-layers"),
        ("tests.federation.protocol", "node", "tests-federation"),
        ("tests.privacy", "coordinator", "tests-privacy-explain"),
        ("tests.node", "coordinator", "tests-node"),
        ("tests.coordinator", "node", "tests-coordinator"),
    ],
)
def test_a_contract_catches_an_import_from_a_higher_layer(
    tree_copy: Path, importer: str, imported: str, contract: str
) -> None:
    add_import(tree_copy, importer, f"import {imported}")
    result = lint_imports(tree_copy, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout
    assert f"{importer} -> {imported}" in result.stdout, result.stdout


def test_a_new_federation_package_must_be_given_a_layer(tree_copy: Path) -> None:
    (tree_copy / "federation" / "misc").mkdir()
    (tree_copy / "federation" / "misc" / "__init__.py").write_text('"""Somewhere to put things."""\n')
    result = lint_imports(tree_copy, "federation-exhaustive")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "federation.misc" in result.stdout and "not listed as layers" in result.stdout
