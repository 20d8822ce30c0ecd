"""The systemd units in deploy/systemd/: `systemd-analyze verify` accepts them, they are hardened, and
every command they run is one the `fedseek` CLI accepts.

`systemd-analyze verify` needs no running systemd. It fails on a missing executable, so the units
are verified with /opt/fedseek/bin/fedseek pointed at this environment's console script; and it
only warns ("ignoring") on a setting it cannot parse, so any output at all counts as a failure.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from federation.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
INSTALLED = "/opt/fedseek/bin/fedseek"
# Template units are verified as an instance, as systemd would load them.
VERIFY_AS = {
    "fedseek-renew@.service": "fedseek-renew@site-a.service",
    "fedseek-renew@.timer": "fedseek-renew@site-a.timer",
}
SERVICES = sorted(p.name for p in UNITS.glob("*.service"))
DAEMONS = ("fedseek-coordinator.service", "fedseek-node.service")


def _settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _fedseek() -> Path:
    script = Path(sys.executable).parent / "fedseek"
    assert script.is_file(), "the fedseek console script is not installed in this environment"
    return script


@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.iterdir() if p.suffix in {".service", ".timer"}))
def test_systemd_analyze_verify_accepts_the_unit(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    for f in UNITS.iterdir():
        (tmp_path / f.name).write_text(f.read_text().replace(INSTALLED, str(_fedseek())))
    done = subprocess.run(
        [analyze, "verify", "--man=no", f"./{VERIFY_AS.get(unit, unit)}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stderr + done.stdout


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting and a missing binary are both reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (UNITS / "fedseek-node.service").read_text().replace("Restart=on-failure", "Restart=sometimes")
    (tmp_path / "fedseek-node.service").write_text(text)
    done = subprocess.run(
        [analyze, "verify", "--man=no", "./fedseek-node.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "sometimes" in done.stderr and "not executable" in done.stderr


@pytest.mark.parametrize("unit", SERVICES)
def test_every_service_is_hardened(unit: str) -> None:
    s = _settings(unit)
    assert s.get("NoNewPrivileges") == ["yes"]
    assert s.get("ProtectSystem") == ["strict"] and s.get("ReadWritePaths")
    assert s.get("PrivateTmp") == ["yes"] and s.get("ProtectHome") == ["yes"]
    assert s.get("CapabilityBoundingSet") == [""]  # no capability at all; the namespaces are user namespaces
    assert s.get("User", ["root"]) != ["root"]
    if unit in DAEMONS:
        assert s.get("Restart") == ["on-failure"]
        # The SuperLink / SuperNode namespaces: exactly user + network namespaces may be made.
        assert s.get("RestrictNamespaces") == ["user net"]
        (state,) = s["StateDirectory"]
        assert s["ReadWritePaths"] == [f"/var/lib/{state}"]
    else:
        assert s.get("Type") == ["oneshot"] and s.get("PrivateNetwork") == ["yes"]


@pytest.mark.parametrize("unit", SERVICES)
def test_every_command_is_one_the_cli_accepts(unit: str) -> None:
    (command,) = _settings(unit)["ExecStart"]
    argv = shlex.split(command.replace("${CREDENTIALS_DIRECTORY}", "/run/credentials/x").replace("%i", "site-a"))
    assert argv[0] == INSTALLED
    build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown command or option


def test_each_timer_runs_its_service() -> None:
    for timer in UNITS.glob("*.timer"):
        service = timer.with_suffix(".service")
        assert service.is_file(), f"{timer.name} has no {service.name}"
        assert re.search(r"^OnCalendar=\S", timer.read_text(), re.M) and "Persistent=true" in timer.read_text()
