"""Revocation and the CRL: published to every party, standard for OpenSSL, refused when stale or foreign."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from federation.security.pki import (
    CRL_DAYS,
    PKIError,
    init_ca,
    is_revoked,
    issue,
    list_status,
    load_crl,
    load_party,
    read_identity,
    renew,
    revoke,
    verify_leaf,
    write_crl,
)
from tests.federation.security.pki.support import read_cert, snapshot, write_expired_crl


def test_revoke_publishes_crl_to_every_party(pki: Path) -> None:
    for name, role in (("coordinator", "coordinator"), ("site-a", "node"), ("site-b", "node")):
        issue(pki, name, role=role)  # type: ignore[arg-type]
    serials = revoke(pki, "site-a", reason="key-compromise")
    assert serials == [read_identity(pki / "site-a" / "cert.pem").serial]

    published = (pki / "ca" / "crl.pem").read_bytes()
    for party in ("coordinator", "site-a", "site-b"):
        assert (pki / party / "crl.pem").read_bytes() == published
    crl = load_crl(pki / "ca" / "crl.pem")
    assert crl.is_signature_valid(read_cert(pki / "ca" / "ca.pem").public_key())  # type: ignore[arg-type]
    assert is_revoked(read_cert(pki / "site-a" / "cert.pem"), crl)
    assert not is_revoked(read_cert(pki / "site-b" / "cert.pem"), crl)
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
    before = snapshot(pki)
    with pytest.raises(PKIError, match="no certificate was issued to 'ghost'"):
        revoke(pki, "ghost")
    with pytest.raises(PKIError, match="already revoked or expired"):
        revoke(pki, "site-a")
    with pytest.raises(PKIError, match="no certificate with serial 1 was issued to 'site-a'"):
        revoke(pki, "site-a", serial=1)
    with pytest.raises(PKIError, match="unknown revocation reason 'bored'"):
        revoke(pki, "site-a", reason="bored")  # type: ignore[arg-type]
    assert snapshot(pki) == before


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
    write_expired_crl(pki, leaf.crl)
    with pytest.raises(PKIError, match=r"^CRL .*crl\.pem expired at .*fedseek ca crl"):
        load_party(pki, "site-a", role="node")
    write_crl(pki)  # the operator's fix
    load_party(pki, "site-a", role="node")


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
