"""`fedseek doctor` (issue 17) on real state: a CA and a site's certificate, a ledger charged through
its audit trail, a real listening socket in another process. Healthy exits 0; an expired certificate,
an expired or foreign CRL, a tampered audit trail or a port another process holds is a FAIL (2); a
spent budget is a WARN (1)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from federation.cli.doctor import Check, read_party, run_checks, worst
from federation.cli.main import main
from federation.ops.layout import NodeLayout
from federation.protocol import config as cfg
from federation.security import pki
from federation.security.pki.ca import issue_at
from privacy.audit import AuditTrail
from privacy.ledger import Budget, PrivacyLedger

SITE = "site-a"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root, consortium="fedseek-test")
    pki.issue(root, SITE, role="node")
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def site(tmp_path: Path, ca: Path) -> Path:
    """A healthy site: its own copy of the PKI, one DP round charged, a config naming a free port."""
    pki_dir = tmp_path / "pki"
    shutil.copytree(ca, pki_dir)
    layout = NodeLayout(tmp_path / "state")
    layout.root.mkdir()
    ledger = PrivacyLedger(
        layout.ledger, budget=Budget(epsilon=1.0, delta=1e-5), dataset_sha256="a" * 64, audit=AuditTrail(layout.audit)
    )
    plan = ledger.plan_round(sample_rate=0.5, steps=2, rounds_left=4, run_id="r1", share=0.5)
    ledger.complete(ledger.charge(run_id="r1", round=1, plan=plan, max_grad_norm=1.0).id, steps=2)
    conf = cfg.NodeConfig(
        name=SITE,
        model_dir=str(tmp_path / "model"),
        data_dir=str(tmp_path / "data"),
        state_dir=str(layout.root),
        pki_dir=str(pki_dir),
        api_port=_free_port(),
    )
    return cfg.save(conf, tmp_path / "node.json")


def _doctor(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Check]]:
    rc = main(["doctor", "--config", str(config), "--json", *extra])
    checks = [Check(**c) for c in json.loads(capsys.readouterr().out)]
    return rc, {c.name: c for c in checks}


def test_healthy_site_is_all_ok(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--config", str(site)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split(":", 1)[0] for line in lines]
    assert names == [
        "OK certificate",
        "OK crl",
        "OK audit",
        "OK ledger",
        "OK budget",
        "OK disk",
        "OK port api",
        "OK gpu",
    ], lines


def test_expired_certificate_fails(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki_dir = Path(json.loads(site.read_text())["pki_dir"])
    long_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(days=40)
    issue_at(pki_dir, SITE, role="node", hosts=(), days=30, not_before=long_ago)  # re-issued, lapsed 10 days ago
    rc, checks = _doctor(site, capsys)
    assert rc == 2
    assert checks["certificate"].level == "FAIL" and "expired" in checks["certificate"].detail
    assert checks["audit"].level == "OK"


def test_expired_crl_fails_and_a_soon_expiring_one_warns(site: Path) -> None:
    party = read_party(site)
    now = datetime.now(UTC).replace(microsecond=0)
    in_ten_days = {c.name: c for c in run_checks(party, now=now + timedelta(days=10))}  # CRL lives 7 days
    assert in_ten_days["crl"].level == "FAIL" and "expired" in in_ten_days["crl"].detail
    in_six_and_a_half = {c.name: c for c in run_checks(party, now=now + timedelta(days=6, hours=12))}
    assert in_six_and_a_half["crl"].level == "WARN"
    assert worst(list(in_six_and_a_half.values())) == 1


def test_foreign_crl_fails(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other-ca"
    pki.init_ca(other, consortium="other")
    party = read_party(site)
    shutil.copy(other / "ca" / "crl.pem", party.pki_dir / SITE / "crl.pem")  # a CRL rolled in from another CA
    rc, checks = _doctor(site, capsys)
    assert rc == 2
    assert checks["crl"].level == "FAIL" and "not signed by the consortium CA" in checks["crl"].detail


def test_tampered_audit_fails(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = read_party(site).audit
    lines = audit.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"ledger"', '"someone"', 1)
    assert lines[0] != audit.read_text().splitlines(keepends=True)[0]
    audit.write_text("".join(lines))
    rc, checks = _doctor(site, capsys)
    assert rc == 2
    assert checks["audit"].level == "FAIL" and "TAMPERED" in checks["audit"].detail


def test_spent_budget_warns(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    party = read_party(site)
    assert party.ledger is not None
    ledger = PrivacyLedger(party.ledger, budget=Budget(epsilon=1.0, delta=1e-5), audit=AuditTrail(party.audit))
    plan = ledger.plan_round(sample_rate=0.5, steps=2, rounds_left=1, run_id="r2", share=1.0)  # all that is left
    ledger.complete(ledger.charge(run_id="r2", round=1, plan=plan, max_grad_norm=1.0).id, steps=2)
    rc, checks = _doctor(site, capsys)
    assert rc == 1, checks
    assert checks["budget"].level == "WARN" and "nearly or fully spent" in checks["budget"].detail
    assert checks["ledger"].level == "OK"


@pytest.fixture
def listener(site: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process listening on the site's API port."""
    port = json.loads(site.read_text())["api_port"]
    code = (
        "import socket, sys\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait(timeout=60)


def test_port_held_by_another_process_fails(
    site: Path, listener: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, checks = _doctor(site, capsys)
    assert rc == 2
    assert checks["port api"].level == "FAIL" and "held by another process" in checks["port api"].detail

    # the same port held by the node itself (its pid in node.json) is what a running node looks like
    party = read_party(site)
    party.endpoints.write_text(json.dumps({"name": SITE, "pid": listener.pid}))
    rc, checks = _doctor(site, capsys)
    assert checks["port api"].level == "OK" and f"pid {listener.pid}" in checks["port api"].detail
    assert rc == 0


def test_cuda_device_without_gpu_fails(site: Path) -> None:
    import torch

    party = replace(read_party(site), device="cuda:0")
    (gpu,) = (c for c in run_checks(party) if c.name == "gpu")
    assert gpu.level == ("OK" if torch.cuda.is_available() else "FAIL")


def test_missing_config_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--config", str(tmp_path / "nope.json")]) == 2
    assert f"no such file: {tmp_path / 'nope.json'}" in capsys.readouterr().err


def test_coordinator_config_is_checked_as_a_coordinator(
    tmp_path: Path, ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A coordinator's config: its certificate under the coordinator role, no ledger or budget, its fleet
    and admin ports; a coordinator never started has no audit trail yet (WARN, exit 1)."""
    pki_dir = tmp_path / "pki"
    shutil.copytree(ca, pki_dir)
    pki.issue(pki_dir, "coordinator", role="coordinator")
    conf = cfg.CoordinatorConfig(
        pki_dir=str(pki_dir), state_dir=str(tmp_path / "coord"), fleet_port=_free_port(), admin_port=_free_port()
    )
    rc, checks = _doctor(cfg.save(conf, tmp_path / "coordinator.json"), capsys)
    assert sorted(checks) == ["audit", "certificate", "crl", "disk", "gpu", "port admin", "port fleet"]
    assert "coordinator 'coordinator'" in checks["certificate"].detail and checks["certificate"].level == "OK"
    assert checks["audit"].level == "WARN" and "never started" in checks["audit"].detail
    assert rc == 1


def test_deleted_or_garbage_ledger_fails(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    party = read_party(site)
    assert party.ledger is not None
    party.ledger.unlink()  # the audit trail still records the ledger's genesis and charge
    rc, checks = _doctor(site, capsys)
    assert rc == 2 and checks["ledger"].level == "FAIL", checks["ledger"]
    party.ledger.write_bytes(b"not a ledger" * 100)
    rc, checks = _doctor(site, capsys)
    assert rc == 2 and checks["ledger"].level == "FAIL", checks["ledger"]
