"""`fedseek ca` keeps the CA operator's audit trail: every use of the CA key and every refusal.

Before: issuing, renewing and revoking certificates left no record of who did it or when (the
CA's index says what exists now, not who changed it). In-process CLI, real files, the real
`privacy.audit` log that `fedseek audit verify` checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from federation.cli.ca_audit import ca_audit_path, operator
from federation.cli.main import main
from federation.security import pki
from tests.federation.cli.ca_files import ca_files


def _trail(root: Path) -> list[dict[str, Any]]:
    path = ca_audit_path(root)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture
def pw(tmp_path: Path) -> list[str]:
    path = tmp_path / "ca-pass"
    path.write_text("ca audit test passphrase\n")
    return ["--passphrase-file", str(path)]


def test_every_use_of_the_ca_key_is_recorded_in_order(
    tmp_path: Path, pw: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "pki"
    ca = ["--pki", str(root), *pw]
    assert main(["ca", "init", "--consortium", "acme", *ca]) == 0
    assert main(["ca", "issue", "site-x", "--role", "node", *ca]) == 0
    assert main(["ca", "issue", "dr-x", "--role", "reviewer", *ca]) == 0
    first = pki.read_identity(root / "site-x" / "cert.pem")
    assert main(["ca", "renew", "site-x", *ca]) == 0
    renewed = pki.read_identity(root / "site-x" / "cert.pem")
    assert main(["ca", "revoke", "dr-x", "--reason", "key-compromise", *ca]) == 0
    assert main(["ca", "crl", "--days", "2", *ca]) == 0
    assert main(["ca", "publisher", "--force", *ca]) == 0
    assert main(["ca", "list", "--pki", str(root)]) == 0  # reads only: not recorded
    capsys.readouterr()

    rows = _trail(root)
    assert [(r["action"], r["resource"]) for r in rows] == [
        ("ca.initialised", "acme"),
        ("ca.issued", "site-x"),
        ("ca.issued", "dr-x"),
        ("ca.renewed", "site-x"),
        ("ca.revoked", "dr-x"),
        ("ca.crl_signed", "crl"),
        ("ca.publisher_created", rows[-1]["resource"]),
    ]
    assert {r["actor"] for r in rows} == {operator()}
    init, issued, reviewer, renew, revoke, crl, publisher = (r["details"] for r in rows)
    assert init["replaced_sha256"] is None and len(init["sha256"]) == 64
    assert (issued["serial"], issued["role"], issued["sha256"]) == (
        f"{first.serial:x}",
        "node",
        first.fingerprint_sha256,
    )
    assert issued["site_key"] == str(root / "site-keys" / "site-x.pub") and "127.0.0.1" in issued["hosts"]
    assert reviewer["role"] == "reviewer" and reviewer["site_key"] is None
    assert renew["serial"] == f"{renewed.serial:x}" != issued["serial"]
    assert revoke == {"serials": [reviewer["serial"]], "reason": "key-compromise"}
    assert crl["revoked"] == 1 and crl["next_update"].endswith("Z")
    assert len(publisher["replaced"]) == 1 and publisher["replaced"][0] != rows[-1]["resource"]
    assert main(["audit", "verify", str(ca_audit_path(root))]) == 0  # the hash chain an auditor checks


def test_a_refusal_is_recorded_and_changes_nothing_else(
    tmp_path: Path, pw: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "pki"
    assert main(["ca", "init", "--pki", str(root), *pw]) == 0
    wrong = tmp_path / "wrong"
    wrong.write_text("somebody trying the CA key\n")
    before = ca_files(root)
    assert main(["ca", "issue", "site-y", "--role", "node", "--pki", str(root), "--passphrase-file", str(wrong)]) == 2
    error = capsys.readouterr().err.strip().removeprefix("fedseek: error: ")
    assert "wrong passphrase" in error
    refused = _trail(root)[-1]
    assert (refused["action"], refused["resource"]) == ("ca.refused", "site-y")
    assert refused["details"] == {"command": "issue", "error": error}
    assert ca_files(root) == before
    # Without a CA there is nothing to record, and nothing is created at a mistyped --pki.
    elsewhere = tmp_path / "typo"
    assert main(["ca", "issue", "site-y", "--role", "node", "--pki", str(elsewhere), *pw]) == 2
    assert not elsewhere.exists()


def test_a_tampered_trail_refuses_the_ca_before_its_key_is_used(
    tmp_path: Path, pw: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An insider who rewrites who issued a certificate stops the CA: nothing more is signed unrecorded."""
    root = tmp_path / "pki"
    ca = ["--pki", str(root), *pw]
    assert main(["ca", "init", *ca]) == 0
    assert main(["ca", "issue", "site-x", "--role", "node", *ca]) == 0
    path = ca_audit_path(root)
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    row["actor"] = "somebody-else"
    path.write_text("\n".join([lines[0], json.dumps(row, sort_keys=True, separators=(",", ":")), *lines[2:]]) + "\n")
    capsys.readouterr()
    before = ca_files(root)
    assert main(["ca", "issue", "site-z", "--role", "node", *ca]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the CA's audit trail failed its integrity check" in err[0], err
    assert ca_files(root) == before and not (root / "site-z").exists()


def test_replacing_the_ca_keeps_its_trail(tmp_path: Path, pw: list[str]) -> None:
    root = tmp_path / "pki"
    ca = ["--pki", str(root), *pw]
    assert main(["ca", "init", *ca]) == 0
    old = _trail(root)[0]["details"]["sha256"]
    assert main(["ca", "init", "--force", *ca]) == 0
    rows = _trail(root)
    assert [r["action"] for r in rows] == ["ca.initialised", "ca.initialised"]
    assert rows[1]["details"]["replaced_sha256"] == old != rows[1]["details"]["sha256"]
    with pytest.raises(pki.PKIError, match="reserved"):
        pki.issue(root, "ca-audit", role="node")  # no party can take the trail's directory
