"""Tests for the stunnel mTLS sidecars, with real stunnel processes on loopback.

Topology of the happy path::

    test client --TLS-->   site sidecar [supernode] (site-a cert, as the SuperNode sees it)
                --plain--> site sidecar [fleet] (client = yes, site-a cert), loopback relay
                --mTLS-->  a stunnel mTLS server (requireCert = yes), standing in for the gateway
                --plain--> echo server (thread)

The echo server remembers every byte it was sent, so a rejected connection is proven not to
have reached it (not just to have failed to echo).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from federation.ops.supervise import Managed, ProcessError, free_port
from federation.security import pki
from federation.security.sidecar import (
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
            tls=tls,
            accept=f"{HOST}:{port}",
            relay=f"{HOST}:{free_port()}",
            connect=f"{HOST}:{coordinator_port}",
            server_name=server_name,
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


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif line:
            out.setdefault(current, []).append(line)
    return out


def test_configs_enforce_mutual_tls(pki_dir: Path) -> None:
    tls = _tls(pki.load_leaf(pki_dir, "site-a"))
    server = _sections(server_config(tls=tls, accept="127.0.0.1:1", connect="127.0.0.1:2"))["fleet"]
    client = _sections(
        client_config(
            tls=tls, accept="127.0.0.1:3", relay="127.0.0.1:4", connect="10.0.0.1:9443", server_name="coord.example"
        )
    )
    fleet, local = client["fleet"], client["supernode"]
    for lines in (server, fleet):
        assert "verifyChain = yes" in lines
        assert f"CAfile = {tls.ca_cert}" in lines
        assert "sslVersionMin = TLSv1.3" in lines
    assert "requireCert = yes" in server and "client = yes" not in server
    # the site: TLS from the SuperNode on loopback, plain to the relay, mTLS from the relay out
    assert [x for x in local if not x.startswith("TIMEOUT")] == [  # timeouts: tests/redteam/test_slow_clients.py
        "accept = 127.0.0.1:3",
        "connect = 127.0.0.1:4",
        f"cert = {tls.cert}",
        f"key = {tls.key}",
        "sslVersionMin = TLSv1.3",
    ]
    # the coordinator is pinned by its role name (only coordinator certificates carry it); the dialled name is SNI
    role_name = pki.coordinator_host(pki.read_identity(tls.cert).consortium)
    assert {"client = yes", "accept = 127.0.0.1:4", "connect = 10.0.0.1:9443", f"checkHost = {role_name}"} <= set(fleet)
    assert "sni = coord.example" in fleet and [x for x in fleet if x.startswith("checkHost")] == [
        f"checkHost = {role_name}"
    ]
    assert f"cert = {tls.cert}" in fleet


def _exchange_local(port: int, ca_cert: Path, payload: bytes) -> bytes:
    """What the SuperNode does: TLS to the site sidecar on 127.0.0.1, trusting the consortium CA
    (so the site certificate must name 127.0.0.1); returns the echo or b''."""
    return _tls_client_exchange(port, _client_context(ca_cert), payload, server_hostname=HOST)


def test_site_sidecar_relays_to_coordinator_over_mtls(coordinator: Coordinator, pki_dir: Path, tmp_path: Path) -> None:
    proc, port = _site_sidecar(tmp_path, _tls(pki.load_leaf(pki_dir, "site-a")), coordinator.port)
    try:
        proc.start()
        proc.wait_port(HOST, port, timeout=30)
        assert _exchange_plain(port, _token()) == b""  # the SuperNode side speaks TLS only
        for _ in range(2):  # more than one connection through the same sidecar
            token = _token()
            assert _exchange_local(port, coordinator.ca_cert, token) == token
            assert coordinator.echo.saw(token)
        big = _token() * 4096  # ~180 KB: several TLS records each way
        assert _exchange_local(port, coordinator.ca_cert, big) == big
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
        assert _exchange_local(port, coordinator.ca_cert, token) == b""
        assert not coordinator.echo.saw(token)
    finally:
        proc.stop()


def test_site_sidecar_refuses_a_server_without_the_coordinators_role_name(pki_dir: Path, tmp_path: Path) -> None:
    """A consortium certificate that is not the coordinator's (here site-b's, which names 127.0.0.1,
    the address dialled) cannot stand in for the coordinator (tests/redteam covers the forged ones)."""
    echo = EchoServer().start()
    server_port = free_port()
    fake = make_sidecar(
        name="fake-coordinator",
        config_text=server_config(
            tls=_tls(pki.load_leaf(pki_dir, "site-b")), accept=f"{HOST}:{server_port}", connect=f"{HOST}:{echo.port}"
        ),
        workdir=tmp_path / "fake",
    )
    try:
        fake.start().wait_port(HOST, server_port, timeout=30)
        _refused_by_site_sidecar(tmp_path, pki_dir, server_port, echo)
    finally:
        fake.stop()
        echo.stop()


def _refused_by_site_sidecar(tmp_path: Path, pki_dir: Path, server_port: int, echo: EchoServer) -> None:
    proc, port = _site_sidecar(tmp_path, _tls(pki.load_leaf(pki_dir, "site-a")), server_port, server_name=HOST)
    try:
        proc.start()
        proc.wait_port(HOST, port, timeout=30)
        token = _token()
        assert _exchange_local(port, pki_dir / "ca" / "ca.pem", token) == b""
        assert not echo.saw(token)
    finally:
        proc.stop()


def _tls_client_exchange(
    port: int, ctx: ssl.SSLContext, payload: bytes, *, server_hostname: str = "localhost"
) -> bytes:
    """TLS to a sidecar; returns the echo, or b'' if the handshake or stream failed."""
    try:
        with (
            socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
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


def test_node_certificates_always_name_the_loopback_address(tmp_path: Path) -> None:
    """The site sidecar serves the node certificate to its SuperNode at 127.0.0.1."""
    pki.init_ca(tmp_path, consortium="fedseek-test")
    leaf = pki.issue(tmp_path, "site-z", role="node", hosts=("site-z.example",))
    assert pki.read_identity(leaf.cert).hosts == ("site-z.example", "127.0.0.1")
    reviewer = pki.issue(tmp_path, "rev", role="reviewer", hosts=("rev.example",))
    assert pki.read_identity(reviewer.cert).hosts == ("rev.example",)
