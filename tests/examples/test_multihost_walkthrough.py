"""examples/multihost/walkthrough.sh, run as an operator would: a consortium over separate hosts (issue 17).

The script makes a network namespace per party behind one switch, enrolls two sites by certificate
request, starts the coordinator and the sites as their systemd units would, makes a one-round run,
has a real Prometheus scrape every party over mutual TLS, refreshes the CRL and checks the sites'
ledgers and audit logs against the coordinator's witness. Here: it exits 0, the run made its round,
every target is up, no private key reached the CA office, and nothing it made (namespaces,
processes) is left, also when it fails half-way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.hosts import unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "multihost" / "walkthrough.sh"
REASON = unavailable_reason()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(REASON is not None, reason=f"separate hosts cannot be made here: {REASON}"),
]


def _env(**extra: str) -> dict[str, str]:
    bindir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _left_behind(pid: int, work: Path) -> tuple[list[str], list[str]]:
    """Namespaces named for the script's pid, and processes still running from its work directory."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    spaces = [n for n in names if n.startswith(f"fsw{pid}-")]
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(work) in cmdline:
                procs.append(f"{entry.name}: {cmdline}")
    return spaces, procs


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A work directory with a short path: a party's Unix sockets live under it (107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="fsw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_multihost_walkthrough_runs_a_consortium_over_separate_hosts(short_dir: Path) -> None:
    work = short_dir / "c"
    proc = subprocess.Popen(
        [str(SCRIPT), str(work)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script's trap removes what it made
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"the walkthrough did not finish in 900 s:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-8000:]
    assert "run finished: 1 round(s) made a version" in out
    if "no prometheus here" in out:
        assert out.count("up: ") == 3, out[-3000:]
    else:
        assert "targets: fedseek-coordinator=up fedseek-node/site-a=up fedseek-node/site-b=up" in out, out[-3000:]
    for site in ("site-a", "site-b"):
        assert (work / site / "pki" / site / "key.pem").exists()
        assert not (work / "ca-office" / site / "key.pem").exists()  # enrolled by request: the key never moved
    assert out.count("OK:") >= 2  # both sites' audit logs verified against the coordinator's witness
    assert _left_behind(proc.pid, work) == ([], [])


def test_a_failed_walkthrough_removes_its_hosts(tmp_path: Path) -> None:
    """A walkthrough that fails after making its namespaces (no `fedseek` command) leaves none behind."""
    work = tmp_path / "broken"
    proc = subprocess.Popen(
        [str(SCRIPT), str(work)],
        env=_env(FEDSEEK=str(tmp_path / "no-such-fedseek")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"ip netns add fsw{proc.pid}-coord" in out  # it got as far as making hosts
    assert "walkthrough failed" in err
    assert _left_behind(proc.pid, work) == ([], [])
