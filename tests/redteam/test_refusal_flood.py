"""Red team, finding 6: a client hammering a TLS port wrote one fsynced audit record per refused
handshake (1,000 in 5 s). Refusals are now counted per (peer, reason) and time window: the
first of a window is recorded at once, the rest as one record with their count when the window
ends or the server stops.

Against the real node agent (`fedseek node start`) and the real fleet gateway (nginx, its logs
followed by federation.security.fleet_gateway.GatewayLog into an audit trail).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from federation.ops.atomic import private_dir
from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.fleet_gateway import Gateway, GatewayLog, audit_refusal
from federation.security.sidecar import TLSFiles
from privacy.audit import AuditTrail, verify
from tests.redteam.node_agent import node_agent

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
FLOOD = 1000
HANDFUL = 10  # records a 1,000-refusal burst may cost (a few reasons, first + count each)
PROMPT_S = 2.0


def _plaintext(port: int) -> None:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass


def _tls(ctx: ssl.SSLContext) -> Callable[[int], None]:
    def attempt(port: int) -> None:
        with socket.create_connection((HOST, port), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                    sock.recv(4096)
            except (OSError, ssl.SSLError):
                pass

    return attempt


def _flood(port: int, attempts: list[Callable[[int], None]]) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda attempt: attempt(port), attempts))
    return time.monotonic() - started


def _refusals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["action"] == "tls.refused"]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("foreign-pki")
    pki.init_ca(root, consortium="not-the-consortium")
    pki.issue(root, "mallory", role="reviewer")
    return root


def _attempts(pki_dir: Path, foreign: Path) -> list[Callable[[int], None]]:
    """1,000 refused connections: plaintext, TLS 1.2, and a certificate of another CA."""
    old = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    old.check_hostname = False
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    mallory = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    mallory.check_hostname = False
    mallory.load_cert_chain(str(foreign / "mallory" / "cert.pem"), str(foreign / "mallory" / "key.pem"))
    return [_plaintext] * 600 + [_tls(old)] * 200 + [_tls(mallory)] * 200


def test_a_thousand_refused_handshakes_cost_a_handful_of_records(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path, foreign: Path
) -> None:
    """Finding 6 at the node agent: the first refusal is on record at once; the burst adds a
    handful of records whose counts, after the agent stops, sum to 1,000."""
    with node_agent(tmp_path, pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir) as agent:
        before = len(agent.audit())
        size_before = agent.layout.audit.stat().st_size
        _plaintext(agent.port)
        deadline = time.monotonic() + PROMPT_S
        while not _refusals(agent.audit()[before:]) and time.monotonic() < deadline:
            time.sleep(0.02)
        first = _refusals(agent.audit()[before:])
        assert len(first) == 1 and first[0]["details"]["count"] == 1, "a new peer's refusal is not on record at once"

        took = _flood(agent.port, _attempts(pki_dir, foreign)[1:])  # 999 more: 1,000 with the first
        during = _refusals(agent.audit()[before:])
        grew = agent.layout.audit.stat().st_size - size_before
        print(f"{FLOOD} refused connections in {took:.1f}s: {len(during)} audit records, +{grew} bytes")
        assert len(during) <= HANDFUL, [r["details"]["reason"] for r in during]
        assert agent.stop() == 0, agent.log.read_text()[-2000:]

        rows = _refusals(agent.audit()[before:])
        assert len(rows) <= HANDFUL
        assert sum(r["details"]["count"] for r in rows) == FLOOD, [
            (r["details"]["reason"], r["details"]["count"]) for r in rows
        ]
        assert agent.layout.audit.stat().st_size - size_before < 16 * 1024
        assert verify(agent.layout.audit).ok
        logged = [line for line in agent.log.read_text().splitlines() if "fedseek.mtls" in line and "refused" in line]
        assert len(logged) <= HANDFUL, f"{len(logged)} log lines for the burst"


# ---- the fleet gateway ------------------------------------------------------------------------


@pytest.fixture
def gateway(tmp_path: Path, pki_dir: Path) -> Iterator[tuple[int, Gateway]]:
    leaf = pki.load_leaf(pki_dir, "coordinator")
    port = free_port()
    gw = Gateway(
        workdir=private_dir(tmp_path / "gateway"),
        tls=TLSFiles(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl),
        listen=f"{HOST}:{port}",
        upstream=f"unix:{tmp_path / 'nobody-there.sock'}",
    )
    nginx = gw.process()
    try:
        nginx.start().wait_port(HOST, port, timeout=30)
        yield port, gw
    finally:
        nginx.stop()


def test_gateway_refusal_flood_costs_a_handful_of_records(
    gateway: tuple[int, Gateway], tmp_path: Path, pki_dir: Path, foreign: Path
) -> None:
    """Finding 6 at the fleet port: nginx refuses each attempt; the audit trail gets a handful."""
    port, gw = gateway
    trail = AuditTrail(tmp_path / "audit.jsonl")
    hook = audit_refusal(trail.append, endpoint="fleet")
    reader = GatewayLog(gw.access_log, gw.error_log, hook)
    try:
        _flood(port, _attempts(pki_dir, foreign))
        reported, deadline = 0, time.monotonic() + 20
        while reported < FLOOD and time.monotonic() < deadline:
            reported += reader.poll()
            time.sleep(0.2)
        assert reported == FLOOD, f"nginx's logs show {reported} refusals"
        during = [json.loads(line) for line in trail.path.read_text().splitlines()]
        assert len(during) <= HANDFUL, [r["details"]["reason"] for r in during]
    finally:
        hook.close()
    rows = [json.loads(line) for line in trail.path.read_text().splitlines()]
    assert len(rows) <= HANDFUL
    assert sum(r["details"]["count"] for r in rows) == FLOOD
    assert verify(trail.path).ok
