"""Tests for the consortium CA, using real keys, real OpenSSL (ssl module, openssl CLI, stunnel)
and real TLS 1.3 handshakes."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import re
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.ops.supervise import free_port
from federation.security import pki as pki_mod
from federation.security.pki import (
    CRL_DAYS,
    PASSPHRASE_ENV,
    PKIError,
    _issue_at,
    _open_ca,
    _sign_crl,
    generate_passphrase_file,
    init_ca,
    is_revoked,
    issue,
    list_issued,
    list_status,
    load_crl,
    load_leaf,
    load_party,
    read_identity,
    read_passphrase_file,
    renew,
    revoke,
    verify_leaf,
    write_crl,
)
from federation.security.sidecar import TLSFiles, make_sidecar, server_config

PASS = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _passphrase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls without an explicit passphrase read it from the environment, as `fedseek ca` does."""
    monkeypatch.setenv(PASSPHRASE_ENV, PASS)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    init_ca(root)
    return root


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under root with its mode and content: what 'nothing half-written' compares."""
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
    }


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --------------------------------------------------------------------------
# Issuance and identity
# --------------------------------------------------------------------------


def test_init_and_issue_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    ca = init_ca(root, consortium="fedseek")
    assert ca.cert == root / "ca" / "ca.pem"
    assert ca.key == root / "ca" / "ca.key"
    assert ca.crl == root / "ca" / "crl.pem"
    assert sorted(p.name for p in (root / "ca").iterdir()) == ["ca.key", "ca.pem", "crl.pem", "index.json"]

    leaf = issue(root, "coordinator", role="coordinator")
    assert leaf.cert == root / "coordinator" / "cert.pem"
    assert leaf.key == root / "coordinator" / "key.pem"
    assert leaf.crl == root / "coordinator" / "crl.pem"
    assert leaf.ca_cert.read_bytes() == ca.cert.read_bytes()
    assert load_leaf(root, "coordinator") == leaf

    issue(root, "site-a", role="node")
    assert [i.name for i in list_issued(root)] == ["coordinator", "site-a"]
    # No staging leftovers, and every party holds the current CRL.
    assert sorted(p.name for p in root.iterdir()) == ["ca", "coordinator", "site-a"]
    assert (root / "coordinator" / "crl.pem").read_bytes() == ca.crl.read_bytes()
    assert (root / "site-a" / "crl.pem").read_bytes() == ca.crl.read_bytes()


def test_identity_fields_and_extensions(pki: Path) -> None:
    leaf = issue(pki, "site-a", role="node", hosts=("site-a.example", "127.0.0.1", "::1"))
    ident = read_identity(leaf.cert)
    assert ident.name == "site-a"
    assert ident.role == "node"
    assert ident.consortium == "fedseek"
    assert ident.hosts == ("site-a.example", "127.0.0.1", "::1")
    assert len(ident.fingerprint_sha256) == 64
    assert timedelta(days=29) < ident.not_after - ident.not_before <= timedelta(days=31)

    cert = _cert(leaf.cert)
    assert read_identity(cert) == ident
    assert cert.serial_number == ident.serial
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["site-a.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)

    ca = _cert(pki / "ca" / "ca.pem")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign


def test_default_hosts_include_loopback_ip(pki: Path) -> None:
    ident = read_identity(issue(pki, "coordinator", role="coordinator").cert)
    assert ident.hosts == ("localhost", "127.0.0.1")


def test_key_file_modes(pki: Path) -> None:
    leaf = issue(pki, "site-a", role="node")
    assert _mode(pki / "ca") == 0o700
    assert _mode(pki / "ca" / "ca.key") == 0o600
    assert _mode(leaf.key) == 0o600


def test_reissue_replaces_certificate_and_keeps_other_files(pki: Path) -> None:
    first = read_identity(issue(pki, "site-a", role="node").cert)
    (pki / "site-a" / "supernode_auth.key").write_text("flower key")
    second = read_identity(issue(pki, "site-a", role="reviewer").cert)
    assert second.serial != first.serial
    assert load_leaf(pki, "site-a").role == "reviewer"
    assert (pki / "site-a" / "supernode_auth.key").read_text() == "flower key"
    assert sorted(p.name for p in pki.iterdir()) == ["ca", "site-a"]


def test_load_leaf_missing(pki: Path) -> None:
    with pytest.raises(PKIError, match="no complete certificate for 'ghost'"):
        load_leaf(pki, "ghost")


def test_leaf_days_capped(pki: Path) -> None:
    with pytest.raises(PKIError, match="at most 90 days"):
        issue(pki, "site-a", role="node", days=91)
    assert not (pki / "site-a").exists()
    assert read_identity(issue(pki, "site-a", role="node", days=90).cert).not_after > datetime.now(UTC) + timedelta(
        days=89
    )


# --------------------------------------------------------------------------
# The CA key at rest
# --------------------------------------------------------------------------


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
    # Parties never get the CA key.
    leaf = issue(pki, "site-a", role="node")
    assert sorted(p.name for p in leaf.cert.parent.iterdir()) == ["ca.pem", "cert.pem", "crl.pem", "key.pem"]


def test_explicit_passphrase_overrides_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV)
    root = tmp_path / "pki"
    init_ca(root, passphrase=b"explicit passphrase")
    issue(root, "site-a", role="node", passphrase="explicit passphrase")
    with pytest.raises(PKIError, match=f"--passphrase-file FILE or set {PASSPHRASE_ENV}"):
        issue(root, "site-b", role="node")
    assert not (root / "site-b").exists()


def test_short_passphrase_refused_at_init(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="at least 12 characters"):
        init_ca(tmp_path / "pki", passphrase="short")
    assert list(tmp_path.iterdir()) == []


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
    before = _snapshot(pki)
    with pytest.raises(PKIError, match=r"^wrong passphrase for the CA private key .*ca\.key$"):
        operation(pki, "not the passphrase")
    assert _snapshot(pki) == before


def test_passphrase_files(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "ca-pass"
    secret = generate_passphrase_file(path)
    assert len(secret) >= 32
    assert _mode(path) == 0o600
    assert read_passphrase_file(path) == secret
    with pytest.raises(PKIError, match="already exists"):
        generate_passphrase_file(path)
    assert read_passphrase_file(path) == secret
    crlf = tmp_path / "crlf"
    crlf.write_bytes(b"with trailing space \r\n")
    assert read_passphrase_file(crlf) == b"with trailing space "
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    with pytest.raises(PKIError, match="is empty"):
        read_passphrase_file(empty)
    with pytest.raises(PKIError, match="passphrase file not found"):
        read_passphrase_file(tmp_path / "missing")


def test_unencrypted_ca_key_refused_until_encrypted_with_openssl(pki: Path) -> None:
    """A CA from before encryption is refused with a recipe; the recipe really works."""
    key_path = pki / "ca" / "ca.key"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=PASS.encode())
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    before = _snapshot(pki)
    with pytest.raises(PKIError, match="is not encrypted; encrypt it once with `openssl pkcs8") as info:
        issue(pki, "site-a", role="node")
    assert _snapshot(pki) == before
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
    before = _snapshot(pki)
    with pytest.raises(PKIError, match=message):
        issue(pki, "site-a", role="node")
    assert _snapshot(pki) == before


def test_malformed_ca_cert_refused(pki: Path) -> None:
    (pki / "ca" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n")
    before = _snapshot(pki)
    with pytest.raises(PKIError, match=r"malformed certificate PEM: .*ca\.pem"):
        issue(pki, "site-a", role="node")
    assert _snapshot(pki) == before


def test_expired_ca_refuses_to_sign(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    issue(pki, "site-a", role="node")
    ca_end = _cert(pki / "ca" / "ca.pem").not_valid_after_utc
    before = _snapshot(pki)
    monkeypatch.setattr(pki_mod, "_utcnow", lambda: ca_end + timedelta(days=1))
    for operation in (
        lambda: issue(pki, "site-b", role="node"),
        lambda: renew(pki, "site-a"),
        lambda: revoke(pki, "site-a"),
        lambda: write_crl(pki),
    ):
        with pytest.raises(PKIError, match=r"^consortium CA \(fedseek\) expired at .*ca init --force"):
            operation()
    assert _snapshot(pki) == before
    with pytest.raises(PKIError, match=r"^consortium CA \(fedseek\) expired at "):
        verify_leaf(pki / "site-a" / "cert.pem", pki / "ca" / "ca.pem", now=ca_end + timedelta(days=1))


def test_leaf_validity_capped_at_ca_expiry(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    init_ca(root, days=2)
    ident = read_identity(issue(root, "site-a", role="node", days=30).cert)
    assert ident.not_after == _cert(root / "ca" / "ca.pem").not_valid_after_utc


def test_failure_while_installing_leaves_directory_as_before(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    issue(pki, "site-a", role="node")
    before = _snapshot(pki)

    def broken(staging: Path, dest: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pki_mod, "install_dir", broken)
    for operation in (lambda: issue(pki, "site-b", role="node"), lambda: renew(pki, "site-a")):
        with pytest.raises(OSError, match="No space left"):
            operation()
        assert _snapshot(pki) == before  # index restored, no staging directory left


def test_corrupt_index_refused(pki: Path) -> None:
    (pki / "ca" / "index.json").write_text("{not json")
    before = _snapshot(pki)
    with pytest.raises(PKIError, match=r"CA index .*index\.json is corrupt"):
        issue(pki, "site-a", role="node")
    assert _snapshot(pki) == before


# --------------------------------------------------------------------------
# Renewal
# --------------------------------------------------------------------------


def test_renew_gives_a_new_certificate_for_the_same_party(pki: Path) -> None:
    from federation.security.site_binding import register_site_key

    old = issue(pki, "coordinator", role="coordinator", hosts=("fl.example.org", "127.0.0.1"), days=5)
    old_cert, old_key = old.cert.read_bytes(), old.key.read_bytes()
    registered = register_site_key(pki, "coordinator").read_bytes()
    flower_key = (pki / "coordinator" / "supernode_auth.key").read_bytes()

    new = renew(pki, "coordinator")
    before, after = read_identity(_cert_from(old_cert)), read_identity(new.cert)
    assert after.serial != before.serial
    assert (after.name, after.role, after.hosts) == (before.name, before.role, before.hosts)
    assert after.not_after - after.not_before > timedelta(days=29)  # renewal takes the default lifetime
    assert new.key.read_bytes() != old_key  # a new key: a copied old key dies with the old certificate
    assert _mode(new.key) == 0o600
    # The Flower auth key pair stays, so the SuperNode's registration still holds.
    assert (pki / "coordinator" / "supernode_auth.key").read_bytes() == flower_key
    assert (pki / "site-keys" / "coordinator.pub").read_bytes() == registered
    # Both certificates are valid: parties switch over at their next reload.
    stale = pki.parent / "old.pem"
    stale.write_bytes(old_cert)
    verify_leaf(stale, pki / "ca" / "ca.pem")
    verify_leaf(new.cert, new.ca_cert)
    load_party(pki, "coordinator", role="coordinator")


def _cert_from(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_renew_keep_key_changes_only_the_certificate(pki: Path) -> None:
    old = issue(pki, "site-a", role="node")
    key = old.key.read_bytes()
    cert = old.cert.read_bytes()
    new = renew(pki, "site-a", keep_key=True)
    assert new.key.read_bytes() == key
    assert new.cert.read_bytes() != cert
    load_leaf(pki, "site-a")  # key matches the new certificate


def test_renew_swaps_files_without_a_gap(pki: Path) -> None:
    """A party re-reading its files during renewals always finds a complete, matching set."""
    issue(pki, "site-a", role="node")
    stop = threading.Event()
    errors: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                load_leaf(pki, "site-a")
                reads += 1
            except (PKIError, OSError) as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(10):
            renew(pki, "site-a", keep_key=True)
    finally:
        stop.set()
        thread.join()
    assert reads > 0
    assert errors == []


def test_renew_refusals(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(PKIError, match="no complete certificate for 'ghost'"):
        renew(pki, "ghost")
    issue(pki, "site-a", role="node")
    with pytest.raises(PKIError, match="at most 90 days"):
        renew(pki, "site-a", days=365)
    revoke(pki, "site-a")
    with pytest.raises(PKIError, match="is revoked; issue a new one"):
        renew(pki, "site-a")
    # A certificate from another CA placed in the directory is not renewed by this one.
    other = tmp_path / "other"
    init_ca(other)
    issue(other, "site-b", role="node")
    (pki / "site-b").mkdir()
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (pki / "site-b" / name).write_bytes((other / "site-b" / name).read_bytes())
    before = _snapshot(pki)
    with pytest.raises(PKIError, match="not signed by the consortium CA"):
        renew(pki, "site-b")
    assert _snapshot(pki) == before


# --------------------------------------------------------------------------
# Revocation and the CRL
# --------------------------------------------------------------------------


def test_revoke_publishes_crl_to_every_party(pki: Path) -> None:
    for name, role in (("coordinator", "coordinator"), ("site-a", "node"), ("site-b", "node")):
        issue(pki, name, role=role)  # type: ignore[arg-type]
    serials = revoke(pki, "site-a", reason="key-compromise")
    assert serials == [read_identity(pki / "site-a" / "cert.pem").serial]

    published = (pki / "ca" / "crl.pem").read_bytes()
    for party in ("coordinator", "site-a", "site-b"):
        assert (pki / party / "crl.pem").read_bytes() == published
    crl = load_crl(pki / "ca" / "crl.pem")
    assert crl.is_signature_valid(_cert(pki / "ca" / "ca.pem").public_key())  # type: ignore[arg-type]
    assert is_revoked(_cert(pki / "site-a" / "cert.pem"), crl)
    assert not is_revoked(_cert(pki / "site-b" / "cert.pem"), crl)
    entry = crl.get_revoked_certificate_by_serial_number(serials[0])
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    next_update = crl.next_update_utc
    assert next_update is not None
    assert timedelta(days=CRL_DAYS) - timedelta(minutes=1) < next_update - datetime.now(UTC) <= timedelta(days=CRL_DAYS)

    with pytest.raises(
        PKIError, match=r"^certificate 'site-a' \(serial [0-9a-f]+\) was revoked at .*\(key-compromise\)$"
    ):
        verify_leaf(pki / "site-a" / "cert.pem", pki / "site-a" / "ca.pem")
    with pytest.raises(PKIError, match="was revoked"):
        load_party(pki, "site-a", role="node")
    verify_leaf(pki / "site-b" / "cert.pem", pki / "site-b" / "ca.pem")
    assert {i.name: s for i, s in list_status(pki)} == {"coordinator": "valid", "site-a": "revoked", "site-b": "valid"}


def test_revoke_covers_earlier_renewals_unless_a_serial_is_given(pki: Path) -> None:
    first = read_identity(issue(pki, "site-a", role="node").cert).serial
    second = read_identity(renew(pki, "site-a").cert).serial
    # Superseded certificate only: the current one stays good.
    assert revoke(pki, "site-a", serial=first, reason="superseded") == [first]
    crl = load_crl(pki / "ca" / "crl.pem")
    assert crl.get_revoked_certificate_by_serial_number(first) is not None
    assert crl.get_revoked_certificate_by_serial_number(second) is None
    load_party(pki, "site-a", role="node")
    # Without a serial: everything still live for the party.
    assert revoke(pki, "site-a") == [second]
    entry = load_crl(pki / "ca" / "crl.pem").get_revoked_certificate_by_serial_number(second)
    assert entry is not None
    with pytest.raises(x509.ExtensionNotFound):  # "unspecified" is expressed by leaving the reason out
        entry.extensions.get_extension_for_class(x509.CRLReason)


def test_revoke_refusals_change_nothing(pki: Path) -> None:
    issue(pki, "site-a", role="node")
    revoke(pki, "site-a")
    before = _snapshot(pki)
    with pytest.raises(PKIError, match="no certificate was issued to 'ghost'"):
        revoke(pki, "ghost")
    with pytest.raises(PKIError, match="already revoked or expired"):
        revoke(pki, "site-a")
    with pytest.raises(PKIError, match="no certificate with serial 1 was issued to 'site-a'"):
        revoke(pki, "site-a", serial=1)
    with pytest.raises(PKIError, match="unknown revocation reason 'bored'"):
        revoke(pki, "site-a", reason="bored")  # type: ignore[arg-type]
    assert _snapshot(pki) == before


def test_crl_is_standard(pki: Path) -> None:
    """OpenSSL parses the CRL and verifies its signature; numbers only go up."""
    issue(pki, "site-a", role="node")
    revoke(pki, "site-a", reason="cessation-of-operation")
    serial = read_identity(pki / "site-a" / "cert.pem").serial
    number_before = load_crl(pki / "ca" / "crl.pem").extensions.get_extension_for_class(x509.CRLNumber).value
    path = write_crl(pki, days=1)
    assert path == pki / "ca" / "crl.pem"
    crl = load_crl(path)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number_before.crl_number
    next_update = crl.next_update_utc
    assert next_update is not None and next_update - datetime.now(UTC) <= timedelta(days=1)

    text = subprocess.run(
        ["openssl", "crl", "-in", str(path), "-noout", "-text"], capture_output=True, text=True, check=True
    ).stdout
    assert "Certificate Revocation List (CRL)" in text
    assert f"{serial:X}".zfill(2) in text.replace(":", "").upper()
    assert "Cessation Of Operation" in text
    verified = subprocess.run(
        ["openssl", "crl", "-in", str(path), "-CAfile", str(pki / "ca" / "ca.pem"), "-noout"],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0 and "verify OK" in verified.stdout + verified.stderr


def test_expired_crl_refused(pki: Path) -> None:
    leaf = issue(pki, "site-a", role="node")
    _write_expired_crl(pki, leaf.crl)
    with pytest.raises(PKIError, match=r"^CRL .*crl\.pem expired at .*fedseek ca crl"):
        load_party(pki, "site-a", role="node")
    write_crl(pki)  # the operator's fix
    load_party(pki, "site-a", role="node")


def _write_expired_crl(pki: Path, dest: Path | None) -> None:
    assert dest is not None
    ca = _open_ca(pki, PASS, pki_mod._utcnow())
    dest.write_bytes(_sign_crl(ca, pki_mod._load_index(ca.dir), now=datetime.now(UTC) - timedelta(days=3), days=1))


def test_foreign_or_malformed_crl_refused(tmp_path: Path, pki: Path) -> None:
    leaf = issue(pki, "site-a", role="node")
    other = tmp_path / "other"
    init_ca(other)
    assert leaf.crl is not None
    leaf.crl.write_bytes((other / "ca" / "crl.pem").read_bytes())
    with pytest.raises(PKIError, match=r"^CRL .* is not signed by the consortium CA \(fedseek\)$"):
        verify_leaf(leaf.cert, leaf.ca_cert)
    leaf.crl.write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(PKIError, match=f"^malformed CRL PEM: {re.escape(str(leaf.crl))}$"):
        verify_leaf(leaf.cert, leaf.ca_cert)
    with pytest.raises(PKIError, match="CRL not found"):
        verify_leaf(leaf.cert, leaf.ca_cert, crl=tmp_path / "missing.pem")


def test_list_status(pki: Path) -> None:
    issue(pki, "site-a", role="node", days=1)
    issue(pki, "site-b", role="node")
    issue(pki, "site-c", role="node")
    revoke(pki, "site-c")
    assert [(i.name, s) for i, s in list_status(pki)] == [
        ("site-a", "valid"),
        ("site-b", "valid"),
        ("site-c", "revoked"),
    ]
    later = datetime.now(UTC) + timedelta(days=2)
    assert [s for _, s in list_status(pki, now=later)] == ["expired", "valid", "revoked"]


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


def test_verify_ok(pki: Path) -> None:
    leaf = issue(pki, "site-a", role="node")
    ident = verify_leaf(leaf.cert, leaf.ca_cert)
    assert ident == read_identity(leaf.cert)


def test_foreign_ca_refused(tmp_path: Path, pki: Path) -> None:
    # Same consortium name, different key: only the signature tells them apart.
    other = tmp_path / "other"
    init_ca(other, consortium="fedseek")
    foreign = issue(other, "site-x", role="node")
    with pytest.raises(
        PKIError,
        match=r"^certificate 'site-x' is not signed by the consortium CA \(fedseek\)$",
    ):
        verify_leaf(foreign.cert, pki / "ca" / "ca.pem")


def test_other_consortium_refused(tmp_path: Path, pki: Path) -> None:
    other = tmp_path / "other"
    init_ca(other, consortium="rival")
    foreign = issue(other, "site-x", role="node")
    with pytest.raises(PKIError, match=r"^certificate 'site-x' is from consortium 'rival', not 'fedseek'$"):
        verify_leaf(foreign.cert, pki / "ca" / "ca.pem")
    # Installed in a party directory next to our CA, it stops the party at start-up.
    (pki / "site-x").mkdir()
    for name in ("cert.pem", "key.pem"):
        (pki / "site-x" / name).write_bytes((other / "site-x" / name).read_bytes())
    (pki / "site-x" / "ca.pem").write_bytes((pki / "ca" / "ca.pem").read_bytes())
    with pytest.raises(PKIError, match="from consortium 'rival'"):
        load_party(pki, "site-x", role="node")


def test_expired_refused(pki: Path) -> None:
    start = datetime.now(UTC) - timedelta(days=10)
    leaf = _issue_at(pki, "site-x", role="node", hosts=(), days=1, not_before=start)
    with pytest.raises(PKIError, match=r"^certificate 'site-x' expired at 20\d\d-"):
        verify_leaf(leaf.cert, leaf.ca_cert)
    # A fresh certificate is refused once the clock passes its end of validity.
    fresh = issue(pki, "site-y", role="node", days=1)
    later = read_identity(fresh.cert).not_after + timedelta(seconds=1)
    with pytest.raises(PKIError, match=r"^certificate 'site-y' expired at 20\d\d-"):
        verify_leaf(fresh.cert, fresh.ca_cert, now=later)


def test_not_yet_valid_refused(pki: Path) -> None:
    start = datetime.now(UTC) + timedelta(days=2)
    leaf = _issue_at(pki, "site-x", role="node", hosts=(), days=5, not_before=start)
    with pytest.raises(PKIError, match=r"^certificate 'site-x' is not valid until 20\d\d-"):
        verify_leaf(leaf.cert, leaf.ca_cert)


def test_malformed_pem(tmp_path: Path, pki: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(PKIError, match=f"^malformed certificate PEM: {re.escape(str(bad))}$"):
        read_identity(bad)
    with pytest.raises(PKIError, match="malformed certificate PEM"):
        verify_leaf(bad, pki / "ca" / "ca.pem")
    with pytest.raises(PKIError, match="malformed certificate PEM"):
        verify_leaf(issue(pki, "site-a", role="node").cert, bad)


def test_malformed_or_mismatched_leaf_key(pki: Path) -> None:
    a = issue(pki, "site-a", role="node")
    b = issue(pki, "site-b", role="node")
    a.key.write_bytes(b.key.read_bytes())
    with pytest.raises(
        PKIError, match=r"^private key .*site-a/key\.pem does not match certificate .*site-a/cert\.pem$"
    ):
        load_leaf(pki, "site-a")
    a.key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PKIError, match=f"^malformed private key PEM: {re.escape(str(a.key))}$"):
        load_party(pki, "site-a", role="node")


def test_leaf_is_not_accepted_as_ca(pki: Path) -> None:
    a = issue(pki, "site-a", role="node")
    b = issue(pki, "site-b", role="node")
    with pytest.raises(PKIError, match="is not a CA certificate"):
        verify_leaf(a.cert, b.cert)


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def test_init_twice_refused(pki: Path) -> None:
    before = _snapshot(pki)
    with pytest.raises(PKIError, match="already exists"):
        init_ca(pki)
    assert _snapshot(pki) == before
    init_ca(pki, force=True)
    assert (pki / "ca" / "ca.pem").read_bytes() != before["ca/ca.pem"][1]
    assert _mode(pki / "ca" / "ca.key") == 0o600


def test_issue_without_ca_refused(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="no consortium CA"):
        issue(tmp_path, "site-a", role="node")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "Site-A", "-site", "site_a", "a" * 64, "../x", "ca", "site-keys"])
def test_bad_name_refused(pki: Path, name: str) -> None:
    before = _snapshot(pki)
    with pytest.raises(PKIError):
        issue(pki, name, role="node")
    assert _snapshot(pki) == before


def test_bad_role_refused(pki: Path) -> None:
    with pytest.raises(PKIError, match="unknown role"):
        issue(pki, "site-a", role="superuser")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Real mutual-TLS handshakes
# --------------------------------------------------------------------------


@dataclass
class _Server:
    port: int
    results: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)


def _peer_cn(peer: dict[str, Any] | None) -> str:
    """Pull the CN out of ``getpeercert()``'s nested ((key, value),) tuples."""
    subject: tuple[tuple[tuple[str, str], ...], ...] = (peer or {}).get("subject", ())
    return next((v for rdn in subject for k, v in rdn if k == "commonName"), "")


def _serve(listener: socket.socket, ctx: ssl.SSLContext, stop: threading.Event, srv: _Server) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(5)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                cn = _peer_cn(tls.getpeercert())
                tls.sendall(b"ok")
                srv.results.put(("ok", cn))
        except (ssl.SSLError, OSError) as exc:
            srv.results.put(("error", str(exc)))
        finally:
            conn.close()


@contextlib.contextmanager
def _tls_server(pki: Path, *, crl: Path | None = None) -> Iterator[_Server]:
    """The coordinator's TLS 1.3 endpoint; with ``crl``, OpenSSL checks client revocation as stunnel does."""
    coord = (
        load_leaf(pki, "coordinator")
        if (pki / "coordinator").is_dir()
        else issue(pki, "coordinator", role="coordinator")
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(coord.cert, coord.key)
    ctx.load_verify_locations(cafile=coord.ca_cert)
    if crl is not None:
        ctx.load_verify_locations(cafile=crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    srv = _Server(port=listener.getsockname()[1])
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(listener, ctx, stop, srv), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        assert not thread.is_alive()


@pytest.fixture
def mtls_server(pki: Path) -> Iterator[_Server]:
    with _tls_server(pki) as srv:
        yield srv


def _client_ctx(ca_cert: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=ca_cert)
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _talk(ctx: ssl.SSLContext, port: int) -> bytes:
    """Connect and read the server's greeting; b'' or an exception means refused.

    In TLS 1.3 the server judges the client certificate after the client has
    finished its side of the handshake, so a rejection surfaces on first read.
    """
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"
        return tls.recv(2)


def _attempt(pki: Path, name: str, srv: _Server) -> tuple[bytes, tuple[str, str]]:
    """Party ``name`` connects with its own files; returns what it read and the server's verdict."""
    leaf = load_leaf(pki, name)
    try:
        got = _talk(_client_ctx(leaf.ca_cert, leaf.cert, leaf.key), srv.port)
    except (ssl.SSLError, OSError):
        got = b""
    return got, srv.results.get(timeout=5)


def test_tls_same_ca_client_accepted(pki: Path, mtls_server: _Server) -> None:
    site = issue(pki, "site-a", role="node")
    assert _talk(_client_ctx(site.ca_cert, site.cert, site.key), mtls_server.port) == b"ok"
    assert mtls_server.results.get(timeout=5) == ("ok", "site-a")


def test_tls_foreign_ca_client_refused(tmp_path: Path, pki: Path, mtls_server: _Server) -> None:
    other = tmp_path / "other"
    init_ca(other, consortium="fedseek")
    rogue = issue(other, "site-x", role="node")
    # The rogue client trusts the real CA (so it accepts the server) but
    # presents a certificate from its own CA.
    ctx = _client_ctx(pki / "ca" / "ca.pem", rogue.cert, rogue.key)
    try:
        got = _talk(ctx, mtls_server.port)
    except (ssl.SSLError, OSError):
        got = b""
    assert got == b""
    status, detail = mtls_server.results.get(timeout=5)
    assert status == "error"
    assert "certificate" in detail.lower()


def test_tls_client_without_certificate_refused(pki: Path, mtls_server: _Server) -> None:
    ctx = _client_ctx(pki / "ca" / "ca.pem", None, None)
    try:
        got = _talk(ctx, mtls_server.port)
    except (ssl.SSLError, OSError):
        got = b""
    assert got == b""
    status, detail = mtls_server.results.get(timeout=5)
    assert status == "error"
    assert "certificate" in detail.lower()


def test_tls_with_published_crl_refuses_revoked_client(pki: Path) -> None:
    issue(pki, "coordinator", role="coordinator")
    issue(pki, "site-a", role="node")
    issue(pki, "site-b", role="node")
    revoke(pki, "site-a", reason="key-compromise")
    with _tls_server(pki, crl=pki / "coordinator" / "crl.pem") as srv:  # the coordinator's own copy
        assert _attempt(pki, "site-b", srv) == (b"ok", ("ok", "site-b"))
        got, (status, detail) = _attempt(pki, "site-a", srv)
        assert got == b"" and status == "error"
        assert "certificate revoked" in detail


def test_tls_expired_crl_refuses_everyone_until_republished(pki: Path) -> None:
    """Why `fedseek ca crl` must run regularly: OpenSSL fails closed on a stale CRL."""
    coord = issue(pki, "coordinator", role="coordinator")
    issue(pki, "site-b", role="node")
    _write_expired_crl(pki, coord.crl)
    with _tls_server(pki, crl=coord.crl) as srv:
        got, (status, detail) = _attempt(pki, "site-b", srv)
        assert got == b"" and status == "error"
        assert "CRL has expired" in detail
    write_crl(pki)
    with _tls_server(pki, crl=coord.crl) as srv:
        assert _attempt(pki, "site-b", srv) == (b"ok", ("ok", "site-b"))


def _echo(listener: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.sendall(conn.recv(64))


def _via_stunnel(pki: Path, name: str, port: int) -> bytes:
    leaf = load_leaf(pki, name)
    ctx = _client_ctx(leaf.ca_cert, leaf.cert, leaf.key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"ping")
            return tls.recv(4)
    except (ssl.SSLError, OSError):
        return b""


def test_stunnel_sidecar_honours_the_published_crl(pki: Path, tmp_path: Path) -> None:
    """The coordinator's real stunnel sidecar, configured with its copy of the CRL.

    A revoked site is refused; a revocation published later takes effect on reload (SIGHUP).
    """
    coord = issue(pki, "coordinator", role="coordinator")
    issue(pki, "site-a", role="node")
    issue(pki, "site-b", role="node")
    revoke(pki, "site-a")
    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(0.1)
    stop = threading.Event()
    echo = threading.Thread(target=_echo, args=(backend, stop), daemon=True)
    echo.start()
    port = free_port()
    assert coord.crl is not None
    sidecar = make_sidecar(
        name="fleet",
        config_text=server_config(
            tls=TLSFiles(cert=coord.cert, key=coord.key, ca_cert=coord.ca_cert, crl=coord.crl),
            accept=f"127.0.0.1:{port}",
            connect=f"127.0.0.1:{backend.getsockname()[1]}",
        ),
        workdir=tmp_path / "sidecar",
    )
    try:
        sidecar.start().wait_port("127.0.0.1", port, timeout=30)
        assert _via_stunnel(pki, "site-b", port) == b"ping"
        assert _via_stunnel(pki, "site-a", port) == b""
        revoke(pki, "site-b")
        os.kill(sidecar.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _via_stunnel(pki, "site-b", port) == b"ping":
            assert time.monotonic() < deadline, (tmp_path / "sidecar" / "fleet.log").read_text()
            time.sleep(0.2)
        assert sidecar.alive()
    finally:
        sidecar.stop()
        stop.set()
        echo.join(timeout=5)
        backend.close()
