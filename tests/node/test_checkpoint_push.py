"""The node agent's audit-checkpoint pusher (`node.checkpoint_push`) against real TLS 1.3 servers.

The server is `federation.security.mtls_server` with a small app that keeps what it is sent: with
the coordinator's certificate it stands for the coordinator's admin API (whose own checks are in
tests/coordinator/test_admin_checkpoints.py; both together in tests/redteam/test_audit_pushed.py);
with another party's certificate, or a revoked coordinator certificate, it is an impostor the pusher
must not send to. Checkpoints come from a real `AuditTrail` signing with the site's SuperNode key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from federation.errors import InvalidInput
from federation.ops.supervise import free_port
from federation.protocol.config import NodeConfig
from federation.security import pki
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.mtls_server import HTTPSService, ServerTLS, peer_of
from federation.security.signed_statement import load_private_key
from node.agent import preflight
from node.build import NodeStartError
from node.checkpoint_push import CHECKPOINT_ROUTE, MAX_INTERVAL_S, CheckpointPush, PushError, admin_url, check_interval
from privacy.audit import AuditTrail
from privacy.checkpoints import CheckpointSigner


@dataclass
class Server:
    """What a server was sent: (peer name, peer role, body) per request; `status` is what it answers."""

    url: str = ""
    seen: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    status: int = 200


def _serve(push_pki: Path, party: str) -> tuple[HTTPSService, Server]:
    server = Server()
    app = FastAPI()

    @app.post(CHECKPOINT_ROUTE)
    async def take(request: Request) -> JSONResponse:
        peer = peer_of(request)
        assert peer is not None
        server.seen.append((peer.name, peer.role, json.loads(await request.body())))
        if server.status != 200:
            return JSONResponse({"error": {"message": "site-a: audit log rolled back or cut"}}, server.status)
        return JSONResponse({"object": "audit.checkpoint"})

    leaf = pki.load_leaf(push_pki, party)
    https = HTTPSService.start(
        app,
        ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl),
        host="127.0.0.1",
        port=free_port(),
        on_refusal=None,
    )
    server.url = https.url
    return https, server


@pytest.fixture(scope="module")
def push_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("push-pki")
    pki.init_ca(root, consortium="fedseek-test")
    pki.issue(root, "coordinator", role="coordinator")
    pki.issue(root, "old-coordinator", role="coordinator")
    pki.revoke(root, "old-coordinator", reason="key-compromise")
    pki.issue(root, "site-a", role="node")
    pki.issue(root, "site-b", role="node")
    return root


@pytest.fixture(scope="module")
def coordinator(push_pki: Path) -> Iterator[Server]:
    https, server = _serve(push_pki, "coordinator")
    try:
        yield server
    finally:
        https.stop()


@pytest.fixture
def trail(push_pki: Path, tmp_path: Path) -> AuditTrail:
    key = load_private_key(ensure_auth_keypair(push_pki / "site-a").private_key)
    return AuditTrail(tmp_path / "audit.jsonl", signer=CheckpointSigner(key, "site-a"), interval_s=3600)


def _grow(trail: AuditTrail, n: int) -> dict[str, Any]:
    for i in range(n):
        trail.append(actor="clinician", action="serve", resource="deepseek", details={"i": i})
    statement = trail.checkpoint()
    assert statement is not None
    return statement


def _pusher(push_pki: Path, trail: AuditTrail, url: str, **kwargs: Any) -> CheckpointPush:
    # "host:port" as a node config names it
    host = url.removeprefix("https://")
    return CheckpointPush(trail.latest_checkpoint, url=host, leaf=pki.load_leaf(push_pki, "site-a"), **kwargs)


def test_pushes_the_latest_checkpoint_with_the_node_certificate_when_it_changed(
    push_pki: Path, coordinator: Server, trail: AuditTrail
) -> None:
    pusher = _pusher(push_pki, trail, coordinator.url)
    pusher.push_once()  # whatever the trail signed as it opened
    coordinator.seen.clear()
    assert pusher.push_once() is False  # nothing new: nothing sent
    first = _grow(trail, 2)
    assert pusher.push_once() is True
    assert pusher.push_once() is False  # unchanged since accepted
    second = _grow(trail, 3)
    assert pusher.push_once() is True
    assert coordinator.seen == [("site-a", "node", first), ("site-a", "node", second)]


def test_a_refused_push_is_an_error_and_is_sent_again(push_pki: Path, coordinator: Server, trail: AuditTrail) -> None:
    coordinator.seen.clear()
    statement = _grow(trail, 1)
    pusher = _pusher(push_pki, trail, coordinator.url)
    coordinator.status = 409
    try:
        with pytest.raises(PushError, match=r"refused by .*: 409 site-a: audit log rolled back or cut"):
            pusher.push_once()
    finally:
        coordinator.status = 200
    assert pusher.push_once() is True  # not taken the first time: sent again
    assert [body for _, _, body in coordinator.seen] == [statement, statement]


@pytest.mark.parametrize("party", ["site-b", "old-coordinator"], ids=["another-sites-cert", "revoked-coordinator"])
def test_nothing_is_sent_to_a_server_that_is_not_the_coordinator(push_pki: Path, trail: AuditTrail, party: str) -> None:
    """site-b's certificate names 127.0.0.1 (a host-name check alone passes); the old coordinator's is revoked."""
    https, impostor = _serve(push_pki, party)
    try:
        _grow(trail, 1)
        with pytest.raises(PushError, match="not pushed"):
            _pusher(push_pki, trail, impostor.url).push_once()
        assert impostor.seen == []
    finally:
        https.stop()


def test_the_background_pusher_retries_with_back_off_and_never_dies(push_pki: Path, trail: AuditTrail) -> None:
    """No coordinator at first: failures back off (at most 60 s); once it is up, the checkpoint lands."""
    port = free_port()
    pusher = CheckpointPush(
        trail.latest_checkpoint, url=f"127.0.0.1:{port}", leaf=pki.load_leaf(push_pki, "site-a"), interval_s=0.2
    )
    statement = _grow(trail, 2)
    pusher.start()
    https = None
    try:
        deadline = time.monotonic() + 60
        while pusher.failures < 2:
            assert time.monotonic() < deadline, "the pusher did not retry"
            time.sleep(0.05)
        assert 0.2 < pusher.delay() <= MAX_INTERVAL_S
        # The coordinator comes up on that port.
        leaf = pki.load_leaf(push_pki, "coordinator")
        server = Server()
        app = FastAPI()

        @app.post(CHECKPOINT_ROUTE)
        async def take(request: Request) -> dict[str, str]:
            server.seen.append(("", "", json.loads(await request.body())))
            return {"object": "audit.checkpoint"}

        https = HTTPSService.start(
            app,
            ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl),
            host="127.0.0.1",
            port=port,
            on_refusal=None,
        )
        deadline = time.monotonic() + 120
        while not server.seen:
            assert time.monotonic() < deadline, "the checkpoint never landed once the coordinator was up"
            time.sleep(0.1)
        assert server.seen[0][2] == statement
    finally:
        pusher.stop()
        if https is not None:
            https.stop()


def test_the_interval_is_at_most_60_seconds_and_back_off_stays_under_it(push_pki: Path, trail: AuditTrail) -> None:
    with pytest.raises(InvalidInput, match="at most 60"):
        check_interval(61)
    with pytest.raises(InvalidInput, match="above 0"):
        check_interval(0)
    pusher = _pusher(push_pki, trail, "https://127.0.0.1:1", interval_s=30)
    pusher.failures = 10
    assert pusher.delay() == MAX_INTERVAL_S
    assert admin_url("coord.example:9444") == "https://coord.example:9444"
    with pytest.raises(InvalidInput, match="host:port"):
        admin_url("http://coord.example:9444")


@pytest.mark.parametrize(
    ("admin", "seconds", "reason"),
    [
        ("127.0.0.1:9444", 90.0, "checkpoint_push_seconds must be above 0 and at most 60, not 90"),
        ("http://127.0.0.1:9444", 30.0, "coordinator_admin must be host:port"),
    ],
)
def test_the_agent_refuses_to_start_with_a_push_it_cannot_make(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path, admin: str, seconds: float, reason: str
) -> None:
    config = NodeConfig(
        name="site-a",
        model_dir=str(tiny_model_dir),
        data_dir=str(site_data_dir),
        state_dir=str(tmp_path / "state"),
        pki_dir=str(pki_dir),
        coordinator_admin=admin,
        checkpoint_push_seconds=seconds,
    )
    with pytest.raises(NodeStartError, match=reason):
        preflight(config)
    assert not (tmp_path / "state").exists()  # refused before anything was touched
