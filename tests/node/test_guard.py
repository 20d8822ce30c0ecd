"""node.api.guard: size and caller checked before any route runs or any body is read.

The real-server version (chunked 300 MB, RSS, timing) is tests/redteam/test_http_limits.py;
here the app alone, with the stand-in TLS peer (tests/fake_peer.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from federation.ops.layout import NodeLayout
from node.access import AccessPolicy, rule_for
from node.api import admin, completions, create_serving_app, explanations, internal, models
from node.api.deps import Admitted, caller
from node.api.guard import MAX_BODY_BYTES
from node.api_keys import ensure_first_key
from privacy.audit import AuditTrail
from tests.fake_peer import as_peer, header_peer
from tests.node.peers import site_policy


@pytest.fixture
def layout(tmp_path: Path) -> NodeLayout:
    return NodeLayout(tmp_path / "state")


@pytest.fixture
def policy(layout: NodeLayout) -> AccessPolicy:
    layout.root.mkdir(parents=True)
    audit = AuditTrail(layout.audit)
    return AccessPolicy(
        site="site-a",
        audit=audit,
        api_keys=ensure_first_key(layout),
        agent_token="t" * 32,
        policy=site_policy(layout, audit=audit),
        peer=header_peer,
    )


@pytest.fixture
def client(policy: AccessPolicy) -> Iterator[TestClient]:
    app = create_serving_app(lambda: None, policy, name="site-a")  # no model: admitted calls answer 503
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _key(layout: NodeLayout) -> dict[str, str]:
    return {"authorization": f"Bearer {layout.api_key.read_text().strip()}"}


def _audit(layout: NodeLayout) -> list[dict[str, object]]:
    return [json.loads(line) for line in layout.audit.read_text().splitlines()]


def test_every_route_declares_the_rule_the_table_gives_its_path() -> None:
    """The guard decides by path (node/access.py); each route's `caller(rule)` must agree."""
    checked = 0
    for module in (admin, completions, explanations, internal, models):  # what create_app mounts
        for route in module.router.routes:
            assert isinstance(route, APIRoute)
            deps = route.dependencies  # the router's, which carry the rule, included
            rules = [d.dependency.rule for d in deps if isinstance(d.dependency, Admitted)]
            assert rules == [rule_for(route.path)], route.path
            checked += 1
    assert checked >= 8


def test_unauthenticated_body_is_refused_before_it_is_read(client: TestClient, layout: NodeLayout) -> None:
    read: list[int] = []

    def body() -> Iterator[bytes]:
        for _ in range(64):
            read.append(1)
            yield b"{" * 65536

    r = client.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.headers["connection"] == "close"
    assert len(read) <= 1, f"{len(read)} chunks of the body were read before the refusal"
    assert [row["action"] for row in _audit(layout)] == ["access.refused"]


def test_malformed_json_without_a_key_is_401(client: TestClient, layout: NodeLayout) -> None:
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 401
    assert client.post("/v1/chat/completions", content=b'{"messages": [', headers=_key(layout)).status_code == 400


def test_a_refusal_without_a_body_keeps_the_connection(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 401 and "connection" not in r.headers


def test_streamed_body_past_the_limit_is_413(client: TestClient, layout: NodeLayout) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 65536 + 8):
            yield b" " * 65536

    r = client.post(
        "/v1/chat/completions", content=body(), headers={**_key(layout), "content-type": "application/json"}
    )
    assert r.status_code == 413 and r.headers["connection"] == "close", r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_declared_length_past_the_limit_is_413_before_the_caller_is_checked(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"x" * (MAX_BODY_BYTES + 1))
    assert r.status_code == 413


def test_a_route_whose_rule_differs_from_the_table_fails_closed(policy: AccessPolicy, layout: NodeLayout) -> None:
    router = APIRouter(dependencies=[caller("application")])

    @router.get("/v1/admin/mislabelled")
    def mislabelled() -> dict[str, str]:
        return {"leak": "yes"}

    app = create_serving_app(lambda: None, policy, name="site-a")
    app.include_router(router)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/admin/mislabelled", headers=as_peer("ops", "admin"))
    assert r.status_code == 500 and "leak" not in r.text


def test_healthz_needs_no_credentials(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
