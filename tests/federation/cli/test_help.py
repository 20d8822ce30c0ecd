"""`fedseek --help` stays light: building the parser imports no ML stack and no Flower.

Help is what an operator runs first and most often; it must not wait seconds on torch. Each case
runs `python -X importtime -m federation.cli.main ... --help` in a fresh interpreter (this
process has long imported torch) and reads which packages the interpreter imported. The check is on
behaviour, not timing: the heavy packages must be absent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def _fedseek_stderr(*argv: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FEDSEEK_LOG_FORMAT": "", **(env or {})},
    )
    assert done.returncode == 2, done.stderr  # the config below is missing: a one-line error, exit 2
    return done.stderr


JSON_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_json_logs_are_one_object_a_line(tmp_path: Path, how: str) -> None:
    """Every stderr line is a JSON object (ts in UTC with ms, level, logger, msg, pid), the error too,
    and the redaction filter still runs: a phone number in a path never reaches the log."""
    missing = tmp_path / "+44 20 7946 0018" / "node.json"
    argv = ["-v", "doctor", "--config", str(missing)]
    err = (
        _fedseek_stderr("--log-format", "json", *argv)
        if how == "flag"
        else _fedseek_stderr(*argv, env={"FEDSEEK_LOG_FORMAT": "json"})
    )
    lines = [json.loads(line) for line in err.splitlines()]
    assert [(r["level"], r["logger"]) for r in lines] == [("INFO", "fedseek.cli"), ("ERROR", "fedseek.cli")]
    for record in lines:
        assert set(record) == {"ts", "level", "logger", "msg", "pid"}
        assert JSON_TS.match(record["ts"]) and isinstance(record["pid"], int)
    assert lines[1]["msg"].startswith("fedseek: error: no such file: ")
    assert "7946" not in err and "[PHONE]" in lines[1]["msg"]


def test_plain_logs_are_the_default_with_utc_timestamps(tmp_path: Path) -> None:
    err = _fedseek_stderr("-v", "doctor", "--config", str(tmp_path / "node.json"))
    first, second = err.splitlines()
    stamp, level, rest = first.split(" ", 2)
    assert JSON_TS.match(stamp) and level == "INFO" and rest == "fedseek.cli: fedseek doctor"
    assert second == f"fedseek: error: no such file: {tmp_path / 'node.json'}"


def test_an_unknown_log_format_in_the_environment_is_refused(tmp_path: Path) -> None:
    err = _fedseek_stderr("doctor", "--config", str(tmp_path / "x"), env={"FEDSEEK_LOG_FORMAT": "xml"})
    assert "FEDSEEK_LOG_FORMAT: expected one of plain, json, got 'xml'" in err
