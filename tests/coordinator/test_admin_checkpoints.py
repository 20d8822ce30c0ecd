"""Issue 16: a site's audit checkpoint pushed to the coordinator's admin API between rounds, over real mTLS.

The admin app (`coordinator.admin_api`) is served by `federation.security.mtls_server` with the
coordinator's certificate, as `fedseek coordinator start` serves it; the client presents a party's
certificate over real TLS 1.3 (httpx), or is a raw TLS socket where the test needs bytes no client
library sends. The node agent's own pusher is tested in tests/node/test_checkpoint_push.py, and both
together with real processes in tests/redteam/test_audit_pushed.py. Checkpoints are signed by a
real `AuditTrail` with the site's real SuperNode key, whose public half is registered as
`pki/site-keys/<site>.pub`.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.admin_api import CHECKPOINT_BODY_MAX, CHECKPOINT_ROUTE, create_admin_app
from coordinator.audit_witness import witness_audit_checkpoint
from coordinator.registry import AdapterRegistry
from coordinator.sites import SiteAccess
from coordinator.witness import LedgerWitness, WitnessRefused, WitnessStore
from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.mtls_server import HTTPSService, ServerTLS, audit_hook
from federation.security.signed_statement import load_private_key, load_public_key
from federation.security.site_binding import register_site_key
from privacy.audit import AuditTrail
from privacy.checkpoints import KIND, CheckpointSigner, parse_checkpoint

BODY_TIMEOUT_S = 1.0  # the admin app's body deadline here (10 s in production)

PARTIES: dict[str, pki.Role] = {
    "coordinator": "coordinator",
    "site-a": "node",
    "site-b": "node",
    "rita": "reviewer",
    "olga": "admin",
}


@dataclass
class Coordinator:
    pki_dir: Path
    url: str
    audit: AuditTrail
    store: WitnessStore
    tmp: Path

    def leaf(self, party: str) -> pki.LeafFiles:
        return pki.load_leaf(self.pki_dir, party)

    def push(self, site: str, statement: dict[str, Any]) -> httpx.Response:
        """POST `statement` as the node agent does, with `site`'s node certificate."""
        with self.client(site) as http:
            return http.post(CHECKPOINT_ROUTE, json=statement)

    def trail(self, site: str, name: str) -> AuditTrail:
        key = load_private_key(ensure_auth_keypair(self.pki_dir / site).private_key)
        return AuditTrail(self.tmp / name / "audit.jsonl", signer=CheckpointSigner(key, site), interval_s=3600)

    def client(self, party: str | None) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca" / "ca.pem"))
        if party is not None:
            ctx.load_cert_chain(str(self.pki_dir / party / "cert.pem"), str(self.pki_dir / party / "key.pem"))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=30)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.path.read_text().splitlines() if line.strip()]

    def stored(self, site: str) -> list[dict[str, Any]]:
        return self.store.entries(site, KIND)


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("admin-checkpoints")
    pki_dir = root / "pki"
    pki.init_ca(pki_dir, consortium="fedseek-test")
    for name, role in PARTIES.items():
        pki.issue(pki_dir, name, role=role)
    for site in ("site-a", "site-b"):
        register_site_key(pki_dir, site)
    audit = AuditTrail(root / "coord-audit.jsonl")
    sites = SiteAccess(
        pki_dir=pki_dir,
        site_keys_dir=pki_dir / pki.SITE_KEYS_DIR,
        audit=audit,
        register=lambda key, name: 1,
        unregister=lambda node_id: None,
    )
    store = WitnessStore(root / "witness")
    app = create_admin_app(
        sites=sites,
        registry=AdapterRegistry(root / "registry"),
        audit=audit,
        witness=LedgerWitness(store, site_keys_dir=sites.site_keys_dir, audit=audit),
        checkpoint_body_timeout_s=BODY_TIMEOUT_S,
    )
    leaf = pki.load_leaf(pki_dir, "coordinator")
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)
    server = HTTPSService.start(
        app, tls, host="127.0.0.1", port=free_port(), on_refusal=audit_hook(audit.append, endpoint="admin")
    )
    try:
        yield Coordinator(pki_dir, server.url, audit, store, root)
    finally:
        server.stop()


def _grow(trail: AuditTrail, n: int) -> dict[str, Any]:
    for i in range(n):
        trail.append(actor="clinician", action="serve", resource="deepseek", details={"i": i})
    statement = trail.checkpoint()
    assert statement is not None
    return statement


def test_a_site_pushes_its_own_checkpoints_and_the_witness_keeps_each_new_one(coord: Coordinator) -> None:
    trail = coord.trail("site-a", "a-own")
    before = len(coord.records())
    first = _grow(trail, 3)
    answer = coord.push("site-a", first)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "object": "audit.checkpoint",
        "site": "site-a",
        "size": 3,
        "root": first["payload"]["root"],
    }
    assert coord.push("site-a", first).status_code == 200  # the same again: accepted, not stored twice
    second = _grow(trail, 4)
    assert coord.push("site-a", second).status_code == 200
    stored = coord.stored("site-a")
    assert [e["statement"] for e in stored] == [first, second]
    assert all(e["note"] == "push" for e in stored)
    key = load_public_key(coord.pki_dir / pki.SITE_KEYS_DIR / "site-a.pub")
    assert parse_checkpoint(stored[-1]["statement"], key=key).size == 7
    # An accepted push is not audited (the witness store is its record): a push a minute must not bury reads.
    assert [r for r in coord.records()[before:] if r["action"] != "access.refused"] == []


def test_another_sites_checkpoint_is_refused_403_and_audited(coord: Coordinator) -> None:
    trail = coord.trail("site-a", "a-foreign")
    statement = _grow(trail, 2)
    stored = len(coord.stored("site-a"))
    before = len(coord.records())
    answer = coord.push("site-b", statement)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["message"] == "site 'site-b' may push only its own audit checkpoints, not 'site-a''s"
    assert len(coord.stored("site-a")) == stored and coord.stored("site-b") == []
    refused = coord.records()[before:]
    assert len(refused) == 1 and refused[0]["action"] == "access.refused"
    assert refused[0]["actor"] == "site-b" and refused[0]["resource"] == CHECKPOINT_ROUTE
    assert refused[0]["details"]["status"] == 403 and refused[0]["details"]["role"] == "node"


def test_a_checkpoint_not_signed_by_the_sites_registered_key_is_refused(coord: Coordinator) -> None:
    """site-b's key signs a checkpoint that claims to be site-a's, sent with site-a's certificate."""
    forged_trail = AuditTrail(
        coord.tmp / "forged" / "audit.jsonl",
        signer=CheckpointSigner(load_private_key(ensure_auth_keypair(coord.pki_dir / "site-b").private_key), "site-a"),
        interval_s=3600,
    )
    forged = _grow(forged_trail, 2)
    stored = len(coord.stored("site-a"))
    answer = coord.push("site-a", forged)
    assert answer.status_code == 409 and "signed with another key than this site's" in answer.text, answer.text
    assert len(coord.stored("site-a")) == stored
    assert coord.records()[-1]["action"] == "witness.refused"


def test_a_rolled_back_checkpoint_is_refused_409_and_audited(coord: Coordinator) -> None:
    trail = coord.trail("site-b", "b-rollback")
    older = _grow(trail, 3)
    newer = _grow(trail, 5)
    assert coord.push("site-b", newer).status_code == 200
    before = len(coord.records())
    answer = coord.push("site-b", older)  # an older copy of the log, restored
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["message"].startswith(
        "site-b: audit log rolled back or cut: its checkpoint holds 3 records, the coordinator witnessed 8 records"
    )
    assert [e["statement"] for e in coord.stored("site-b")][-1] == newer
    refused = coord.records()[before:]
    assert [r["action"] for r in refused] == ["witness.refused"]
    assert refused[0]["actor"] == "site-b" and refused[0]["details"]["stage"] == "push"


@pytest.mark.parametrize(("party", "status"), [("olga", 403), ("rita", 403), ("coordinator", 403), (None, 401)])
def test_only_node_certificates_may_push(coord: Coordinator, party: str | None, status: int) -> None:
    statement = _grow(coord.trail("site-a", f"a-role-{party}"), 1)
    before = len(coord.records())
    with coord.client(party) as http:
        response = http.post(CHECKPOINT_ROUTE, json=statement)
    assert response.status_code == status, response.text
    refused = coord.records()[before:]
    assert len(refused) == 1 and refused[0]["action"] == "access.refused"
    assert refused[0]["details"]["role"] == (PARTIES[party] if party else None)


def _raw(coord: Coordinator, head: str, body: bytes = b"") -> tuple[str, bytes]:
    """One request on a real mTLS socket as site-a; the status line and everything answered."""
    ctx = ssl.create_default_context(cafile=str(coord.pki_dir / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(coord.pki_dir / "site-a" / "cert.pem"), str(coord.pki_dir / "site-a" / "key.pem"))
    host, port = coord.url.removeprefix("https://").rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(head.encode() + body)
        answer = b""
        while chunk := s.recv(65536):  # the server closes: a refusal with its body unread
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode(), answer


def test_an_oversized_or_chunked_body_is_refused_413_before_it_is_read(coord: Coordinator) -> None:
    """Only the headers are sent: an answer at all proves the server read none of the declared body."""
    big = CHECKPOINT_BODY_MAX + 1
    status, answer = _raw(
        coord,
        f"POST {CHECKPOINT_ROUTE} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {big}\r\n\r\n",
    )
    assert " 413 " in status, answer
    assert b"at most 16384 bytes" in answer
    status, answer = _raw(
        coord, f"POST {CHECKPOINT_ROUTE} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"
    )
    assert " 413 " in status and b"no chunked body" in answer
    # Every other route still takes no body at all.
    status, answer = _raw(coord, "GET /v1/admin/sites HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n", b"{}")
    assert " 413 " in status and b"takes no request body" in answer


def test_a_body_that_stops_arriving_is_refused_408_at_its_deadline(coord: Coordinator) -> None:
    """A site that declares a checkpoint and sends a tenth of it: 408 and the connection closed at the
    body's deadline (before, the route waited for the rest for as long as the site kept the socket)."""
    started = time.monotonic()
    status, answer = _raw(
        coord,
        f"POST {CHECKPOINT_ROUTE} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n",
        b'{"kind": "audit.ch',
    )
    took = time.monotonic() - started
    assert " 408 " in status and b"not received within 1 s" in answer, answer
    assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 5, took


def test_a_round_checkpoint_older_than_a_pushed_one_is_old_news_but_a_rollback_is_not(tmp_path: Path) -> None:
    """The two channels: a round's reply waits in the SuperLink while the agent pushes a newer checkpoint."""
    pki_dir = tmp_path / "pki"
    keys = ensure_auth_keypair(pki_dir / "site-a")
    key = load_public_key(keys.public_key)
    trail = AuditTrail(
        tmp_path / "audit.jsonl", signer=CheckpointSigner(load_private_key(keys.private_key), "site-a"), interval_s=3600
    )
    store = WitnessStore(tmp_path / "witness")
    at_readiness = _grow(trail, 3)
    assert witness_audit_checkpoint(store, "site-a", [at_readiness], key=key) is not None  # the round's
    in_the_reply = _grow(trail, 2)  # signed for the update, still on its way
    pushed = _grow(trail, 2)
    assert witness_audit_checkpoint(store, "site-a", [pushed], key=key, channel="push") is not None
    assert witness_audit_checkpoint(store, "site-a", [in_the_reply], key=key) is not None  # not a rollback
    assert [e.get("note") for e in store.entries("site-a", KIND)] == [None, "push", None]
    # A round checkpoint signed after the pushed one but holding fewer records: the log was rolled back.
    rolled = AuditTrail(
        tmp_path / "rolled" / "audit.jsonl",
        signer=CheckpointSigner(load_private_key(keys.private_key), "site-a"),
        interval_s=3600,
    )
    later_but_smaller = _grow(rolled, 6)
    with pytest.raises(WitnessRefused, match="rolled back or cut"):
        witness_audit_checkpoint(store, "site-a", [later_but_smaller], key=key)
    # The same size as a pushed checkpoint with another root: a fork, whichever channel brings it.
    fork = _grow(rolled, 1)
    with pytest.raises(WitnessRefused, match="forked"):
        witness_audit_checkpoint(store, "site-a", [fork], key=key)
    # The push channel holds each push to the last push: an older one goes back.
    with pytest.raises(WitnessRefused, match="rolled back or cut"):
        witness_audit_checkpoint(store, "site-a", [in_the_reply], key=key, channel="push")
