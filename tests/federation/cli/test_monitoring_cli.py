"""`fedseek monitoring prometheus-config`: a prometheus.yml for a consortium's monitor certificate that
Prometheus' own checker accepts; a certificate of another role, or a bad target, is refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from federation.security import pki

PROMTOOL = shutil.which("promtool")


def fedseek(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki_dir = tmp_path_factory.mktemp("mon-cli") / "pki"
    pki.init_ca(pki_dir, consortium="acme")
    pki.issue(pki_dir, "prom", role="monitor")
    pki.issue(pki_dir, "site-a", role="node")
    return pki_dir


def test_writes_a_config_promtool_accepts(consortium: Path, tmp_path: Path) -> None:
    out = tmp_path / "prometheus.yml"
    (tmp_path / "alerts.yml").write_text("groups: []\n")
    args = ["monitoring", "prometheus-config", "--pki", str(consortium), "--monitor", "prom"]
    args += ["--coordinator", "coord.acme.org:9443", "--node", "site-a=10.1.0.5:8443", "--node", "site-b=b.org:8443"]
    done = fedseek(*args, "--interval", "5s", "--out", str(out))
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(out.read_text())
    coordinator, nodes = config["scrape_configs"]
    assert coordinator["tls_config"]["server_name"] == "coordinator.acme.fedseek.internal"
    assert coordinator["tls_config"]["cert_file"] == str((consortium / "prom" / "cert.pem").absolute())
    assert coordinator["static_configs"][0]["targets"] == ["coord.acme.org:9443"]
    assert [c["targets"] for c in nodes["static_configs"]] == [["10.1.0.5:8443"], ["b.org:8443"]]
    assert config["global"]["scrape_interval"] == "5s"
    if PROMTOOL is not None:
        checked = subprocess.run([PROMTOOL, "check", "config", str(out)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--monitor", "site-a"], "site-a is a node certificate; issue a monitor one"),
        (["--monitor", "nobody"], "cannot read the monitor certificate"),
        (["--monitor", "prom", "--node", "site-a"], "--node 'site-a' is not SITE=HOST:PORT"),
    ],
)
def test_refuses_what_would_not_scrape(consortium: Path, extra: list[str], message: str) -> None:
    done = fedseek("monitoring", "prometheus-config", "--pki", str(consortium), "--coordinator", "c:1", *extra)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stdout == ""
