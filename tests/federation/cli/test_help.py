"""`fedseek --help` stays light: building the parser imports no ML stack and no Flower.

Help is what an operator runs first and most often; it must not wait seconds on torch. Each case
runs `python -X importtime -m federation.cli.main ... --help` in a fresh interpreter (this
process has long imported torch) and reads which packages the interpreter imported. The check is on
behaviour, not timing: the heavy packages must be absent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[3]
HEAVY = frozenset({"torch", "opacus", "transformers", "peft", "shap", "flwr"})


def _commands() -> list[str]:
    """Every top-level command the parser knows, so a new one is covered without editing this file."""
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def _imported_packages(*argv: str) -> tuple[set[str], str]:
    """Top-level packages imported by `fedseek *argv --help`, and what it printed."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "federation.cli.main", *argv, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # `import time: self | cumulative | module`, the module indented by its depth
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return {m.split(".")[0] for m in modules}, done.stdout


def test_root_help_imports_no_heavy_package() -> None:
    packages, out = _imported_packages()
    assert out.startswith("usage: fedseek")
    assert "federation" in packages  # the parse really read the import log
    assert not packages & HEAVY


@pytest.mark.parametrize("command", _commands())
def test_command_help_imports_no_heavy_package(command: str) -> None:
    packages, out = _imported_packages(command)
    assert out.startswith(f"usage: fedseek {command}")
    assert not packages & HEAVY


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the tree, with its command path (`fedseek budget add-partition`)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")


def test_every_option_and_command_has_help() -> None:
    """Each option says what it does (argparse.SUPPRESS hides a deliberate one); each command has a
    description or a help line in its parent's list."""
    missing: list[str] = []
    for path, parser in _walk(build_parser(), "fedseek"):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                for name, child in action.choices.items():
                    if name not in helped and not child.description:
                        missing.append(f"{path} {name}: no description or help")
            elif action.help is None or (isinstance(action.help, str) and not action.help.strip()):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, "\n".join(missing)


def test_help_fits_a_screen_per_command() -> None:
    """A command's description (before the options) stays within one screen: 24 lines."""
    for path, parser in _walk(build_parser(), "fedseek"):
        assert len((parser.description or "").splitlines()) <= 24, path
