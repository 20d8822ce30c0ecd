"""What a party checks at start-up: its own files, the chain to the CA, validity."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from federation.security.pki import PKIError, init_ca, issue, load_leaf, load_party, read_identity, verify_leaf
from federation.security.pki.ca import issue_at


def test_load_leaf_missing(pki: Path) -> None:
    with pytest.raises(PKIError, match="no complete certificate for 'ghost'"):
        load_leaf(pki, "ghost")


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
    leaf = issue_at(pki, "site-x", role="node", hosts=(), days=1, not_before=start)
    with pytest.raises(PKIError, match=r"^certificate 'site-x' expired at 20\d\d-"):
        verify_leaf(leaf.cert, leaf.ca_cert)
    # A fresh certificate is refused once the clock passes its end of validity.
    fresh = issue(pki, "site-y", role="node", days=1)
    later = read_identity(fresh.cert).not_after + timedelta(seconds=1)
    with pytest.raises(PKIError, match=r"^certificate 'site-y' expired at 20\d\d-"):
        verify_leaf(fresh.cert, fresh.ca_cert, now=later)


def test_not_yet_valid_refused(pki: Path) -> None:
    start = datetime.now(UTC) + timedelta(days=2)
    leaf = issue_at(pki, "site-x", role="node", hosts=(), days=5, not_before=start)
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
