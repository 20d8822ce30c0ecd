"""`fedseek node start` refuses bad input with one line and leaves ledger and audit trail intact.

A spent privacy budget is not bad input: that node starts and serves (tests/redteam/test_budget_spent.py).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from federation.ops.layout import NodeLayout
from federation.protocol import config as cfg
from federation.security import pki
from federation.security.pki.ca import issue_at
from privacy.audit import AuditTrail

pytestmark = pytest.mark.e2e


def _start(conf: cfg.NodeConfig, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = cfg.save(conf, tmp_path / "node.json")
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedseek: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def site(tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path) -> cfg.NodeConfig:
    state = tmp_path / "state"
    trail = AuditTrail(NodeLayout(state).audit)
    trail.append(actor="test", action="serve", resource="base")
    return cfg.NodeConfig(
        name="site-a",
        model_dir=str(tiny_model_dir),
        data_dir=str(site_data_dir),
        state_dir=str(state),
        pki_dir=str(pki_dir),
        api_port=0,
    )


def test_missing_model_directory(site: cfg.NodeConfig, tmp_path: Path) -> None:
    audit = NodeLayout(Path(site.state_dir)).audit
    before = _digest(audit)
    proc = _start(cfg.NodeConfig(**{**cfg.to_json(site), "model_dir": str(tmp_path / "nope")}), tmp_path)
    _one_line_error(proc, "model directory not found")
    assert _digest(audit) == before


def test_corrupt_model_directory(site: cfg.NodeConfig, tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    proc = _start(cfg.NodeConfig(**{**cfg.to_json(site), "model_dir": str(broken)}), tmp_path)
    _one_line_error(proc, "cannot load model")


def test_certificate_not_from_the_consortium(site: cfg.NodeConfig, tmp_path: Path, pki_dir: Path) -> None:
    other = tmp_path / "other-pki"
    pki.init_ca(other, consortium="fedseek-test")
    pki.issue(other, "site-a", role="node")
    mixed = tmp_path / "mixed-pki"
    shutil.copytree(pki_dir, mixed)
    for name in ("cert.pem", "key.pem"):  # a site key pair signed by someone else's CA
        shutil.copy(other / "site-a" / name, mixed / "site-a" / name)
    proc = _start(cfg.NodeConfig(**{**cfg.to_json(site), "pki_dir": str(mixed)}), tmp_path)
    _one_line_error(proc, "certificate check failed", "not signed by the consortium CA")


def test_certificate_without_loopback_address(site: cfg.NodeConfig, tmp_path: Path, pki_dir: Path) -> None:
    """The fleet sidecar serves the site certificate to the SuperNode on 127.0.0.1."""
    mixed = tmp_path / "no-loopback-pki"
    shutil.copytree(pki_dir, mixed)
    issue_at(mixed, "site-a", role="node", hosts=("site-a.example",), days=5, not_before=None)
    proc = _start(cfg.NodeConfig(**{**cfg.to_json(site), "pki_dir": str(mixed)}), tmp_path)
    _one_line_error(proc, "certificate check failed", "does not name 127.0.0.1")
