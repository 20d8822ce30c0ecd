"""The parties' HTTPS endpoint: real TLS 1.3 handshakes against a running uvicorn server.

Every refusal the issue lists (no certificate, another CA, expired, not yet valid, revoked,
TLS 1.2, plaintext) must fail the handshake, be logged and reach the refusal hook; a valid
certificate gets through with its identity; revocation closes open connections of that
certificate only, within the poll interval, without restarting the server.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.mtls_server import HTTPSService, Refusal, ServerTLS, TLSGate, peer_of
from federation.security.pki.ca import issue_at

PASS = "correct horse battery staple"
HOST = "127.0.0.1"
POLL = 0.2


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mtls-pki")
    pki.init_ca(root, consortium="mtls-test", passphrase=PASS)
    pki.issue(root, "site-a", role="node", passphrase=PASS)
    for name in ("alice", "bob", "carol", "dave"):
        pki.issue(root, name, role="reviewer", passphrase=PASS)
    now = datetime.now(UTC)
    for name, start in (("old", now - timedelta(days=40)), ("future", now + timedelta(days=2))):
        issue_at(
            root, name, role="reviewer", hosts=(), days=10, not_before=start, passphrase=PASS
        )  # tests only: validity in the past / future
    return root


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("other-pki")
    pki.init_ca(root, consortium="other-consortium", passphrase=PASS)
    pki.issue(root, "mallory", role="reviewer", passphrase=PASS)
    return root


@dataclass
class Endpoint:
    url: str
    port: int
    gate: TLSGate
    refusals: list[Refusal] = field(default_factory=list)


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    def whoami(request: Request) -> dict[str, Any]:
        ident = peer_of(request)
        return {"name": ident.name if ident else None, "role": ident.role if ident else None}

    return app


@pytest.fixture(scope="module")
def endpoint(ca: Path) -> Iterator[Endpoint]:
    refusals: list[Refusal] = []
    leaf = pki.load_leaf(ca, "site-a")
    tls = ServerTLS(
        cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=ca / "site-a" / "crl.pem", poll_interval=POLL
    )
    port = free_port()
    service = HTTPSService.start(_app(), tls, host=HOST, port=port, on_refusal=refusals.append)
    yield Endpoint(f"https://{HOST}:{port}", port, service.gate, refusals)  # node certificates name 127.0.0.1
    service.stop()


def client_ctx(
    pki_dir: Path | None, name: str | None, *, ca_of: Path, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_of / "ca" / "ca.pem"))
    if pki_dir is not None and name is not None:
        ctx.load_cert_chain(str(pki_dir / name / "cert.pem"), str(pki_dir / name / "key.pem"))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def whoami(endpoint: Endpoint, ctx: ssl.SSLContext) -> dict[str, Any]:
    with httpx.Client(verify=ctx, timeout=10) as client:
        r = client.get(f"{endpoint.url}/whoami")
    r.raise_for_status()
    return dict(r.json())


def wait_for_refusal(endpoint: Endpoint, before: int, *, timeout: float = 10) -> Refusal:
    deadline = time.monotonic() + timeout
    while len(endpoint.refusals) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(endpoint.refusals) > before, "no refusal was reported"
    return endpoint.refusals[-1]


def test_valid_certificate_is_accepted_with_its_identity(ca: Path, endpoint: Endpoint) -> None:
    assert whoami(endpoint, client_ctx(ca, "alice", ca_of=ca)) == {"name": "alice", "role": "reviewer"}
    assert whoami(endpoint, client_ctx(ca, "site-a", ca_of=ca)) == {"name": "site-a", "role": "node"}


def test_no_certificate_connects_without_identity(ca: Path, endpoint: Endpoint) -> None:
    """Optional client certificates: the route, not the handshake, decides (API-key clients)."""
    assert whoami(endpoint, client_ctx(None, None, ca_of=ca)) == {"name": None, "role": None}


@pytest.mark.parametrize(
    ("who", "needle"),
    [
        pytest.param("mallory", "unable to get local issuer certificate", id="other-ca"),
        pytest.param("old", "certificate has expired", id="expired"),
        pytest.param("future", "certificate is not yet valid", id="not-yet-valid"),
    ],
)
def test_bad_certificates_fail_the_handshake_and_are_reported(
    ca: Path, other_ca: Path, endpoint: Endpoint, who: str, needle: str
) -> None:
    issuer = other_ca if who == "mallory" else ca
    before = len(endpoint.refusals)
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        whoami(endpoint, client_ctx(issuer, who, ca_of=ca))
    refusal = wait_for_refusal(endpoint, before)
    assert needle in refusal.reason and refusal.peer.startswith(HOST)


def test_tls12_and_plaintext_are_refused(ca: Path, endpoint: Endpoint) -> None:
    before = len(endpoint.refusals)
    with pytest.raises(httpx.ConnectError):
        whoami(endpoint, client_ctx(ca, "alice", ca_of=ca, max_version=ssl.TLSVersion.TLSv1_2))
    assert "TLS" in wait_for_refusal(endpoint, before).reason
    before = len(endpoint.refusals)
    with socket.create_connection((HOST, endpoint.port), timeout=5) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.settimeout(5)
        assert b"alice" not in sock.recv(4096)  # nothing but a TLS alert or a close
    assert "plaintext is refused" in wait_for_refusal(endpoint, before).reason


def test_wrong_host_name_is_refused_by_the_client(ca: Path, endpoint: Endpoint) -> None:
    """The server's (node) certificate names 127.0.0.1; a client asked for another name refuses."""
    ctx = client_ctx(ca, "alice", ca_of=ca)
    with (
        socket.create_connection((HOST, endpoint.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        ctx.wrap_socket(raw, server_hostname="coordinator.example.org")


def _open_tls(ca: Path, name: str, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, port), timeout=5)
    return client_ctx(ca, name, ca_of=ca).wrap_socket(raw, server_hostname=HOST)


def _get(sock: ssl.SSLSocket) -> bytes:
    sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    while b"}" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_revocation_closes_open_sessions_of_that_certificate_only(ca: Path, endpoint: Endpoint) -> None:
    carol, dave = _open_tls(ca, "carol", endpoint.port), _open_tls(ca, "dave", endpoint.port)
    try:
        assert b'"carol"' in _get(carol) and b'"dave"' in _get(dave)  # both keep-alive sessions are open
        before = len(endpoint.refusals)
        started = time.monotonic()
        pki.revoke(ca, "carol", reason="key-compromise", passphrase=PASS)
        refusal = wait_for_refusal(endpoint, before, timeout=60)
        elapsed = time.monotonic() - started
        assert refusal.subject == "carol" and "open connection closed" in refusal.reason
        assert elapsed < 60  # the issue's bound; here it is a few poll intervals
        carol.settimeout(5)
        assert carol.recv(4096) == b""  # the server closed carol's session
        assert b'"dave"' in _get(dave)  # dave's session was not touched
        before = len(endpoint.refusals)
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            whoami(endpoint, client_ctx(ca, "carol", ca_of=ca))  # and carol cannot come back
        assert "revoked" in wait_for_refusal(endpoint, before).reason
        assert whoami(endpoint, client_ctx(ca, "alice", ca_of=ca))["name"] == "alice"
    finally:
        carol.close()
        dave.close()


def test_renewed_server_certificate_is_served_without_restart(ca: Path, endpoint: Endpoint) -> None:
    def served_serial() -> int:
        with _open_tls(ca, "alice", endpoint.port) as sock:
            der = sock.getpeercert(binary_form=True)
        assert der is not None
        return pki.identity_from_der(der).serial

    old = served_serial()
    renewed = pki.renew(ca, "site-a", passphrase=PASS)
    new = pki.read_identity(renewed.cert).serial
    assert new != old
    deadline = time.monotonic() + 10
    while served_serial() != new and time.monotonic() < deadline:
        time.sleep(POLL)
    assert served_serial() == new


def test_a_unix_socket_gets_the_same_gate_as_the_port(ca: Path, tmp_path: Path) -> None:
    """`unix_socket`: one service on host:port and on a socket file (born 0600, removed at stop),
    with the same TLS gate: the verified identity on one, a refusal on the other, named by socket."""
    refusals: list[Refusal] = []
    leaf = pki.load_leaf(ca, "site-a")
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, poll_interval=POLL)
    folder = tmp_path / "sockets"
    folder.mkdir(mode=0o700)
    sock_path, port = folder / "api.sock", free_port()
    service = HTTPSService.start(_app(), tls, host=HOST, port=port, on_refusal=refusals.append, unix_socket=sock_path)
    try:
        assert sock_path.is_socket() and sock_path.stat().st_mode & 0o777 == 0o600
        ctx = client_ctx(ca, "alice", ca_of=ca)
        transport = httpx.HTTPTransport(uds=str(sock_path), verify=ctx)
        with httpx.Client(transport=transport, timeout=10) as client:
            assert client.get(f"https://{HOST}/whoami").json() == {"name": "alice", "role": "reviewer"}
        with httpx.Client(verify=ctx, timeout=10) as client:
            assert client.get(f"https://{HOST}:{port}/whoami").json()["name"] == "alice"
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(5)
            raw.connect(str(sock_path))
            raw.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert b"alice" not in raw.recv(4096)
        deadline = time.monotonic() + 10
        while not refusals and time.monotonic() < deadline:
            time.sleep(0.02)
        assert refusals and refusals[-1].peer == f"unix:{sock_path}"
        assert "plaintext is refused" in refusals[-1].reason
    finally:
        service.stop()
    assert not sock_path.exists()
