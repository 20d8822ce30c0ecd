"""Tests for the stunnel mTLS sidecars, with real stunnel processes on loopback.

Topology of the happy path::

    test client --plain--> site sidecar (client = yes, site-a cert)
                --mTLS-->  coordinator sidecar (requireCert = yes)
                --plain--> echo server (thread)

The echo server remembers every byte it was sent, so a rejected connection is proven not to
have reached it (not just to have failed to echo).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from federation import pki
from federation.mtls_server import Refusal
from federation.procs import Managed, ProcessError, free_port
from federation.sidecar import (
    RefusalLog,
    TLSFiles,
    client_config,
    make_sidecar,
    server_config,
    stunnel_binary,
)

HOST = "127.0.0.1"
IO_TIMEOUT = 10.0


class EchoServer:
    """A plaintext TCP echo server standing in for the Flower SuperLink."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.received = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> EchoServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.received.extend(data)
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def saw(self, token: bytes) -> bool:
        with self._lock:
            return token in self.received

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)


def _tls(leaf: pki.LeafFiles, ca_cert: Path | None = None) -> TLSFiles:
    return TLSFiles(cert=leaf.cert, key=leaf.key, ca_cert=ca_cert or leaf.ca_cert)


def _recv_until(sock: socket.socket, n: int) -> bytes:
    """Read up to n bytes; stops early on EOF. Connection errors count as EOF."""
    got = bytearray()
    try:
        while len(got) < n:
            chunk = sock.recv(n - len(got))
            if not chunk:
                break
            got.extend(chunk)
    except (ConnectionError, ssl.SSLError, TimeoutError):
        pass
    return bytes(got)


def _exchange_plain(port: int, payload: bytes) -> bytes:
    """Send payload on a plain TCP connection to loopback:port; return whatever came back."""
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as sock:
        try:
            sock.sendall(payload)
        except ConnectionError:
            return b""
        return _recv_until(sock, len(payload))


def _token() -> bytes:
    return f"fedseek-{uuid.uuid4().hex}\n".encode()


@dataclass
class Coordinator:
    echo: EchoServer
    sidecar: Managed
    port: int
    ca_cert: Path


@pytest.fixture(scope="module")
def coordinator(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    echo = EchoServer().start()
    port = free_port()
    leaf = pki.load_leaf(pki_dir, "coordinator")
    sidecar = make_sidecar(
        name="coordinator-sidecar",
        config_text=server_config(tls=_tls(leaf), accept=f"{HOST}:{port}", connect=f"{HOST}:{echo.port}"),
        workdir=tmp_path_factory.mktemp("coordinator-sidecar"),
    )
    try:
        sidecar.start()
        sidecar.wait_port(HOST, port, timeout=30)
        yield Coordinator(echo=echo, sidecar=sidecar, port=port, ca_cert=leaf.ca_cert)
    finally:
        sidecar.stop()
        echo.stop()


def _site_sidecar(
    workdir: Path, tls: TLSFiles, coordinator_port: int, *, server_name: str = "localhost"
) -> tuple[Managed, int]:
    port = free_port()
    proc = make_sidecar(
        name="site-sidecar",
        config_text=client_config(
            tls=tls, accept=f"{HOST}:{port}", connect=f"{HOST}:{coordinator_port}", server_name=server_name
        ),
        workdir=workdir,
    )
    return proc, port


def test_stunnel_binary_is_found_and_runs() -> None:
    binary = Path(stunnel_binary())
    assert binary.is_file()
    assert binary.name in {"stunnel4", "stunnel"}
    out = subprocess.run([str(binary), "-version"], capture_output=True, text=True, timeout=30, check=False)
    assert "stunnel" in (out.stdout + out.stderr).lower()


def test_configs_enforce_mutual_tls(pki_dir: Path) -> None:
    tls = _tls(pki.load_leaf(pki_dir, "coordinator"))
    server = server_config(tls=tls, accept="127.0.0.1:1", connect="127.0.0.1:2")
    client = client_config(tls=tls, accept="127.0.0.1:3", connect="10.0.0.1:9443", server_name="coord.example")
    for text in (server, client):
        assert "verifyChain = yes" in text
        assert f"CAfile = {tls.ca_cert}" in text
        assert "sslVersionMin = TLSv1.3" in text
    assert "requireCert = yes" in server.splitlines()
    assert "client = yes" in client.splitlines()
    assert "checkHost = coord.example" in client.splitlines()
    assert "client = yes" not in server.splitlines()


def test_site_sidecar_relays_to_coordinator_over_mtls(coordinator: Coordinator, pki_dir: Path, tmp_path: Path) -> None:
    proc, port = _site_sidecar(tmp_path, _tls(pki.load_leaf(pki_dir, "site-a")), coordinator.port)
    try:
        proc.start()
        proc.wait_port(HOST, port, timeout=30)
        for _ in range(2):  # more than one connection through the same sidecar
            token = _token()
            assert _exchange_plain(port, token) == token
            assert coordinator.echo.saw(token)
        big = _token() * 4096  # ~180 KB: several TLS records each way
        assert _exchange_plain(port, big) == big
    finally:
        proc.stop()
    assert not proc.alive()


def test_site_with_certificate_from_another_ca_is_refused(coordinator: Coordinator, tmp_path: Path) -> None:
    rogue_pki = tmp_path / "rogue-pki"
    pki.init_ca(rogue_pki, consortium="fedseek-test")  # same consortium name, different key
    rogue = pki.issue(rogue_pki, "site-a", role="node")
    # The rogue site trusts the real CA, so the only thing that can fail is the coordinator's check of it.
    proc, port = _site_sidecar(tmp_path / "run", _tls(rogue, ca_cert=coordinator.ca_cert), coordinator.port)
    try:
        proc.start()
        proc.wait_port(HOST, port, timeout=30)
        token = _token()
        assert _exchange_plain(port, token) == b""
        assert not coordinator.echo.saw(token)
    finally:
        proc.stop()


def test_site_sidecar_refuses_coordinator_with_wrong_name(
    coordinator: Coordinator, pki_dir: Path, tmp_path: Path
) -> None:
    proc, port = _site_sidecar(
        tmp_path, _tls(pki.load_leaf(pki_dir, "site-a")), coordinator.port, server_name="coordinator.example"
    )
    try:
        proc.start()
        proc.wait_port(HOST, port, timeout=30)
        token = _token()
        assert _exchange_plain(port, token) == b""
        assert not coordinator.echo.saw(token)
    finally:
        proc.stop()


def _tls_client_exchange(port: int, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    """TLS to the coordinator sidecar; returns the echo, or b'' if the handshake or stream failed."""
    try:
        with (
            socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(payload)
            return _recv_until(tls, len(payload))
    except (ssl.SSLError, ConnectionError):
        return b""


def _client_context(ca_cert: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def test_tls_client_with_consortium_certificate_is_relayed(coordinator: Coordinator, pki_dir: Path) -> None:
    """Control for the test below: the same raw client, plus a certificate, gets through."""
    leaf = pki.load_leaf(pki_dir, "site-b")
    ctx = _client_context(coordinator.ca_cert)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    token = _token()
    assert _tls_client_exchange(coordinator.port, ctx, token) == token


def test_tls_client_without_certificate_is_refused(coordinator: Coordinator) -> None:
    token = _token()
    assert _tls_client_exchange(coordinator.port, _client_context(coordinator.ca_cert), token) == b""
    assert not coordinator.echo.saw(token)


def test_plaintext_client_is_refused(coordinator: Coordinator) -> None:
    token = _token()
    assert _exchange_plain(coordinator.port, token) == b""
    assert not coordinator.echo.saw(token)


def test_bad_config_fails_start_up_with_log(tmp_path: Path) -> None:
    proc = make_sidecar(name="broken", config_text="[fleet]\naccept = 127.0.0.1:1\nnonsense = yes\n", workdir=tmp_path)
    try:
        proc.start()
        with pytest.raises(ProcessError, match="broken exited during start-up"):
            proc.wait_port(HOST, free_port(), timeout=30)
    finally:
        proc.stop()
    assert (tmp_path / "broken.conf").is_file()
    assert (tmp_path / "broken.log").read_text().strip()


def test_refusals_are_read_from_the_stunnel_log(coordinator: Coordinator, tmp_path: Path) -> None:
    """Each refused handshake becomes one Refusal (for the log and the audit trail)."""
    refusals: list[Refusal] = []
    follower = RefusalLog(coordinator.sidecar.log_path, refusals.append)
    other = tmp_path / "other-pki"
    pki.init_ca(other, consortium="someone-else")
    pki.issue(other, "site-a", role="node")
    rogue = ssl.create_default_context(cafile=str(coordinator.ca_cert))
    rogue.load_cert_chain(str(other / "site-a" / "cert.pem"), str(other / "site-a" / "key.pem"))
    for ctx in (rogue, ssl.create_default_context(cafile=str(coordinator.ca_cert))):
        with (
            socket.create_connection((HOST, coordinator.port), timeout=5) as raw,
            contextlib.suppress(ssl.SSLError, OSError),
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.settimeout(3)
            s.recv(1)
    with socket.create_connection((HOST, coordinator.port), timeout=5) as raw:  # plaintext
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with contextlib.suppress(OSError):
            raw.recv(100)
    deadline = time.monotonic() + 10
    while len(refusals) < 3 and time.monotonic() < deadline:
        follower.poll()
        time.sleep(0.2)
    reasons = [r.reason for r in refusals]
    assert len(refusals) == 3, reasons
    assert "unable to get local issuer certificate" in reasons[0] and refusals[0].subject == "site-a"
    assert "peer did not return a certificate" in reasons[1]
    assert reasons[2] in ("wrong version number", "http request")  # plaintext
    assert all(r.peer.startswith("127.0.0.1:") for r in refusals)
    assert follower.poll() == 0  # each refusal is reported once
