"""Tests for the consortium CA, using real keys and a real TLS 1.3 handshake."""

from __future__ import annotations

import ipaddress
import queue
import re
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.pki import (
    PKIError,
    _issue_at,
    init_ca,
    issue,
    list_issued,
    load_leaf,
    read_identity,
    verify_leaf,
)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    init_ca(root)
    return root


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------
# Issuance and identity
# --------------------------------------------------------------------------


def test_init_and_issue_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    ca = init_ca(root, consortium="fedseek")
    assert ca.cert == root / "ca" / "ca.pem"
    assert ca.key == root / "ca" / "ca.key"

    leaf = issue(root, "coordinator", role="coordinator")
    assert leaf.cert == root / "coordinator" / "cert.pem"
    assert leaf.key == root / "coordinator" / "key.pem"
    assert leaf.ca_cert.read_bytes() == ca.cert.read_bytes()
    assert load_leaf(root, "coordinator") == leaf

    issue(root, "site-a", role="node")
    assert [i.name for i in list_issued(root)] == ["coordinator", "site-a"]
    # No staging leftovers.
    assert sorted(p.name for p in root.iterdir()) == ["ca", "coordinator", "site-a"]


def test_identity_fields_and_extensions(pki: Path) -> None:
    leaf = issue(pki, "site-a", role="node", hosts=("site-a.example", "127.0.0.1", "::1"))
    ident = read_identity(leaf.cert)
    assert ident.name == "site-a"
    assert ident.role == "node"
    assert ident.consortium == "fedseek"
    assert ident.hosts == ("site-a.example", "127.0.0.1", "::1")
    assert len(ident.fingerprint_sha256) == 64
    assert timedelta(days=29) < ident.not_after - ident.not_before <= timedelta(days=31)

    cert = x509.load_pem_x509_certificate(leaf.cert.read_bytes())
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
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)

    ca = x509.load_pem_x509_certificate((pki / "ca" / "ca.pem").read_bytes())
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
    assert _mode(pki / "ca" / "ca.key") == 0o600
    assert _mode(leaf.key) == 0o600


def test_renewal_replaces_certificate(pki: Path) -> None:
    first = read_identity(issue(pki, "site-a", role="node").cert)
    second = read_identity(issue(pki, "site-a", role="reviewer").cert)
    assert second.serial != first.serial
    assert load_leaf(pki, "site-a").role == "reviewer"
    assert sorted(p.name for p in pki.iterdir()) == ["ca", "site-a"]


def test_load_leaf_missing(pki: Path) -> None:
    with pytest.raises(PKIError, match="no complete certificate for 'ghost'"):
        load_leaf(pki, "ghost")


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
    with pytest.raises(PKIError, match="not signed by the consortium CA"):
        verify_leaf(foreign.cert, pki / "ca" / "ca.pem")


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


def test_leaf_is_not_accepted_as_ca(pki: Path) -> None:
    a = issue(pki, "site-a", role="node")
    b = issue(pki, "site-b", role="node")
    with pytest.raises(PKIError, match="is not a CA certificate"):
        verify_leaf(a.cert, b.cert)


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def test_init_twice_refused(pki: Path) -> None:
    before = (pki / "ca" / "ca.pem").read_bytes()
    with pytest.raises(PKIError, match="already exists"):
        init_ca(pki)
    assert (pki / "ca" / "ca.pem").read_bytes() == before
    init_ca(pki, force=True)
    assert (pki / "ca" / "ca.pem").read_bytes() != before
    assert _mode(pki / "ca" / "ca.key") == 0o600


def test_issue_without_ca_refused(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="no consortium CA"):
        issue(tmp_path, "site-a", role="node")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "Site-A", "-site", "site_a", "a" * 64, "../x", "ca"])
def test_bad_name_refused(pki: Path, name: str) -> None:
    with pytest.raises(PKIError):
        issue(pki, name, role="node")


def test_bad_role_refused(pki: Path) -> None:
    with pytest.raises(PKIError, match="unknown role"):
        issue(pki, "site-a", role="superuser")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Real mutual-TLS handshake
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


@pytest.fixture
def mtls_server(pki: Path) -> Iterator[_Server]:
    coord = issue(pki, "coordinator", role="coordinator")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(coord.cert, coord.key)
    ctx.load_verify_locations(cafile=coord.ca_cert)

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
