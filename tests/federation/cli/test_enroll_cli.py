"""`fedseek node enroll`, `fedseek ca sign` and `fedseek ca crl --if-due`, as an operator runs them.

The library behind them (policy, refusals, mTLS with the result): tests/federation/security/
test_enrollment.py and tests/federation/security/pki/test_request.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from federation.cli.main import main
from federation.security.pki import PASSPHRASE_ENV, load_party, read_identity

PASS = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PASS)


def test_enroll_sign_accept_renew(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, site, inbox = tmp_path / "ca", tmp_path / "site", tmp_path / "inbox"
    assert main(["ca", "init", "--pki", str(ca)]) == 0
    argv = ["node", "enroll", "--pki", str(site), "--name", "site-a"]
    assert main([*argv, "--host", "site-a.example", "--host", "wanted.example"]) == 0
    out = capsys.readouterr().out
    assert "request.csr" in out and "supernode_auth.pub" in out and "key.pem" not in out
    inbox.mkdir()
    for f in ("request.csr", "supernode_auth.pub"):  # the public files, carried to the CA
        shutil.copy2(site / "site-a" / f, inbox / f)

    sign = ["ca", "sign", str(inbox / "request.csr"), "--pki", str(ca), "--role", "node"]
    assert main([*sign, "--host", "site-a.example"]) == 0
    out = capsys.readouterr().out
    assert "issued node certificate for site-a" in out
    assert "requested, not granted: subjectAltName wanted.example" in out
    assert (ca / "site-keys" / "site-a.pub").read_bytes().split()[:2] == (
        (site / "site-a" / "supernode_auth.pub").read_bytes().split()[:2]
    )
    assert main([*argv, "--accept", str(ca / "site-a")]) == 0
    first = read_identity(load_party(site, "site-a", role="node").cert)
    assert sorted(first.hosts) == ["127.0.0.1", "site-a.example"]

    # Renewal: not due with 30 days left; forced, a new key and a proof; the CA keeps the hosts.
    assert main([*argv, "--renew", "--if-due", "7"]) == 0
    assert "not due" in capsys.readouterr().out and not (site / "site-a" / "request.csr").exists()
    assert main([*argv, "--renew"]) == 0
    for f in ("request.csr", "renewal.sig"):
        shutil.copy2(site / "site-a" / f, inbox / f)
    (inbox / "supernode_auth.pub").unlink()  # the registered Flower key stays as it is
    assert main(sign) == 0
    assert "renewed node certificate for site-a" in capsys.readouterr().out
    assert main([*argv, "--accept", str(ca / "site-a")]) == 0
    second = read_identity(load_party(site, "site-a", role="node").cert)
    assert second.serial != first.serial and second.hosts == first.hosts


def test_sign_refuses_a_node_without_its_flower_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, site = tmp_path / "ca", tmp_path / "site"
    assert main(["ca", "init", "--pki", str(ca)]) == 0
    assert main(["node", "enroll", "--pki", str(site), "--name", "site-a"]) == 0
    lone = tmp_path / "request.csr"
    shutil.copy2(site / "site-a" / "request.csr", lone)
    capsys.readouterr()
    assert main(["ca", "sign", str(lone), "--pki", str(ca), "--role", "node"]) == 2
    assert "no Flower auth key for 'site-a'" in capsys.readouterr().err
    assert not (ca / "site-a").exists()
    tampered = tmp_path / "bad" / "request.csr"
    tampered.parent.mkdir()
    tampered.write_text("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    assert main(["ca", "sign", str(tampered), "--pki", str(ca), "--role", "reviewer"]) == 2
    assert "malformed certificate request" in capsys.readouterr().err


def test_crl_if_due_signs_only_when_due(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert main(["ca", "init", "--pki", str(ca)]) == 0
    crl = (ca / "ca" / "crl.pem").read_bytes()
    capsys.readouterr()
    assert main(["ca", "crl", "--pki", str(ca), "--if-due", "2"]) == 0
    assert "not due" in capsys.readouterr().out and (ca / "ca" / "crl.pem").read_bytes() == crl
    assert main(["ca", "crl", "--pki", str(ca), "--days", "1"]) == 0
    assert main(["ca", "crl", "--pki", str(ca), "--if-due", "2"]) == 0
    assert "re-signed" in capsys.readouterr().out
