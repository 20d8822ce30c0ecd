"""Real TLS 1.3 handshakes and a real stunnel sidecar, configured from the issued files."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from federation.ops.supervise import free_port
from federation.security.pki import init_ca, issue, load_leaf, revoke, write_crl
from federation.security.sidecar import TLSFiles, make_sidecar, server_config
from tests.federation.security.pki.support import write_expired_crl


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
    write_expired_crl(pki, coord.crl)
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
