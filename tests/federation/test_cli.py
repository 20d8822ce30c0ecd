"""The `fedseek` CLI root: argument wiring and one-line errors (in-process, real files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation import pki
from federation.cli.main import main


def test_ca_init_issue_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pki"
    assert main(["ca", "init", "--pki", str(root), "--consortium", "acme"]) == 0
    assert (
        main(["ca", "issue", "coordinator", "--pki", str(root), "--role", "coordinator", "--host", "fl.acme.org"]) == 0
    )
    assert main(["ca", "issue", "site-x", "--pki", str(root), "--role", "node"]) == 0
    ident = pki.verify_leaf(root / "coordinator" / "cert.pem", root / "ca" / "ca.pem")
    # the coordinator always also answers on loopback, where SuperNodes reach it through their sidecar
    assert {"fl.acme.org", "localhost", "127.0.0.1"} <= set(ident.hosts)
    assert (root / "site-keys" / "site-x.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    capsys.readouterr()
    assert main(["ca", "list", "--pki", str(root)]) == 0
    listed = capsys.readouterr().out
    assert "coordinator" in listed and "site-x" in listed and "node" in listed


def test_user_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pki"
    assert main(["ca", "issue", "site-x", "--pki", str(root), "--role", "node"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedseek: error:")
    assert main(["node", "start", "--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert main(["budget", "--state", str(tmp_path)]) == 2
    assert "no privacy ledger" in capsys.readouterr().err


def test_audit_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from privacy.audit import AuditTrail

    log = tmp_path / "audit.jsonl"
    trail = AuditTrail(log)
    for i in range(3):
        trail.append(actor="app", action="serve", resource=f"v{i}")
    assert main(["audit", "verify", str(log)]) == 0
    assert "OK: 3 records" in capsys.readouterr().out
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], lines[2]]) + "\n")  # delete the middle record
    assert main(["audit", "verify", str(log)]) == 1
    assert "TAMPERED" in capsys.readouterr().err
