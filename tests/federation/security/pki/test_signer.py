"""The CA key at rest: encrypted PKCS#8 that OpenSSL opens, and the CA refusing to sign when it
is locked, damaged or expired."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from federation.security.pki import PASSPHRASE_ENV, PKIError, issue, renew, revoke, verify_leaf, write_crl
from federation.security.pki import ca as ca_mod
from tests.federation.security.pki.support import PASS, read_cert, snapshot


def test_ca_key_is_encrypted_at_rest(pki: Path) -> None:
    key_pem = (pki / "ca" / "ca.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, password=None)
    serialization.load_pem_private_key(key_pem, password=PASS.encode())
    # Standard PKCS#8: OpenSSL opens it with the passphrase and refuses without it.
    ok = subprocess.run(
        ["openssl", "pkey", "-in", str(pki / "ca" / "ca.key"), "-passin", f"env:{PASSPHRASE_ENV}", "-noout"],
        capture_output=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        ["openssl", "pkey", "-in", str(pki / "ca" / "ca.key"), "-passin", "pass:wrong-passphrase", "-noout"],
        capture_output=True,
    )
    assert bad.returncode != 0
    # Parties never get the CA key (nor the app-publisher key: only its public half).
    leaf = issue(pki, "site-a", role="node")
    names = sorted(p.name for p in leaf.cert.parent.iterdir())
    assert names == ["ca.pem", "cert.pem", "crl.pem", "key.pem", "publishers.json"]


@pytest.mark.parametrize(
    "operation",
    [
        lambda root, pw: issue(root, "site-b", role="node", passphrase=pw),
        lambda root, pw: renew(root, "site-a", passphrase=pw),
        lambda root, pw: revoke(root, "site-a", passphrase=pw),
        lambda root, pw: write_crl(root, passphrase=pw),
    ],
    ids=["issue", "renew", "revoke", "crl"],
)
def test_wrong_passphrase_refused_and_nothing_written(pki: Path, operation: Callable[[Path, str], object]) -> None:
    issue(pki, "site-a", role="node")
    before = snapshot(pki)
    with pytest.raises(PKIError, match=r"^wrong passphrase for the CA private key .*ca\.key$"):
        operation(pki, "not the passphrase")
    assert snapshot(pki) == before


def test_unencrypted_ca_key_refused_until_encrypted_with_openssl(pki: Path) -> None:
    """A CA from before encryption is refused with a recipe; the recipe really works."""
    key_path = pki / "ca" / "ca.key"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=PASS.encode())
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    before = snapshot(pki)
    with pytest.raises(PKIError, match="is not encrypted; encrypt it once with `openssl pkcs8") as info:
        issue(pki, "site-a", role="node")
    assert snapshot(pki) == before
    recipe = re.search(r"`(openssl [^`]+)`", str(info.value))
    assert recipe is not None
    command = recipe.group(1).replace(" -out ", f" -passout env:{PASSPHRASE_ENV} -out ")
    subprocess.run(command, shell=True, check=True, capture_output=True)
    issue(pki, "site-a", role="node")
    verify_leaf(pki / "site-a" / "cert.pem", pki / "ca" / "ca.pem")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n", "malformed CA"),
        (b"not a key at all\n", "malformed CA private key PEM"),
        (b"", "malformed CA private key PEM"),
    ],
)
def test_malformed_ca_key_refused(pki: Path, content: bytes, message: str) -> None:
    (pki / "ca" / "ca.key").write_bytes(content)
    before = snapshot(pki)
    with pytest.raises(PKIError, match=message):
        issue(pki, "site-a", role="node")
    assert snapshot(pki) == before


def test_malformed_ca_cert_refused(pki: Path) -> None:
    (pki / "ca" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n")
    before = snapshot(pki)
    with pytest.raises(PKIError, match=r"malformed certificate PEM: .*ca\.pem"):
        issue(pki, "site-a", role="node")
    assert snapshot(pki) == before


def test_expired_ca_refuses_to_sign(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    issue(pki, "site-a", role="node")
    ca_end = read_cert(pki / "ca" / "ca.pem").not_valid_after_utc
    before = snapshot(pki)
    monkeypatch.setattr(ca_mod, "utcnow", lambda: ca_end + timedelta(days=1))
    for operation in (
        lambda: issue(pki, "site-b", role="node"),
        lambda: renew(pki, "site-a"),
        lambda: revoke(pki, "site-a"),
        lambda: write_crl(pki),
    ):
        with pytest.raises(PKIError, match=r"^consortium CA \(fedseek\) expired at .*ca init --force"):
            operation()
    assert snapshot(pki) == before
    with pytest.raises(PKIError, match=r"^consortium CA \(fedseek\) expired at "):
        verify_leaf(pki / "site-a" / "cert.pem", pki / "ca" / "ca.pem", now=ca_end + timedelta(days=1))
