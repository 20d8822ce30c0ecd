"""federation.security.refusals on a small FastAPI app: OpenAI's error body for every error, one audit
record per refused caller (the node's and coordinator's apps: tests/node/test_server.py,
tests/coordinator/test_admin_api.py)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from federation.errors import Busy, Conflict, FedSeekError, Forbidden, InvalidInput, NotFound, Unauthenticated
from federation.security.pki import Identity
from federation.security.refusals import audit_refusal, error_response_for, install_error_handlers
from federation.security.roles import AccessDenied, NotAuthenticated, NotPermitted, require_role
from tests.fake_peer import as_peer, header_peer
from tests.federation.security.refusal_record import refusal

log = logging.getLogger("fedseek.test.refusals")


class Sink:
    """Collects what an audit trail would append."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, **record: Any) -> None:
        self.records.append(record)


class Body(BaseModel):
    count: int = Field(ge=1)


RAISED: dict[str, FedSeekError] = {
    "invalid": InvalidInput("bad setting"),
    "missing": NotFound("no such version", code="model_not_found"),
    "conflict": Conflict("budget spent"),
    "busy": Busy("queue full", code="queue_full"),
}


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def client(sink: Sink) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    def admin(request: Request) -> Identity:
        identity = header_peer(request)
        try:
            return require_role(identity, "admin")
        except AccessDenied as exc:
            audit_refusal(request, exc, identity=identity, audit=sink, log=log)
            raise

    @app.get("/v1/admin/thing")
    def thing(who: Identity = Depends(admin)) -> dict[str, str]:  # noqa: B008 - FastAPI dependency
        return {"name": who.name}

    @app.post("/count")
    def count(body: Body) -> dict[str, int]:
        return {"count": body.count}

    @app.get("/raise/{name}")
    def fail(name: str) -> None:
        raise RAISED[name]

    return TestClient(app, raise_server_exceptions=False)


def openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@pytest.mark.parametrize(
    ("headers", "status", "type_", "actor", "role"),
    [
        ({}, 401, "authentication_error", "testclient:50000", None),
        (as_peer("site-a", "node"), 403, "permission_error", "site-a", "node"),
    ],
    ids=["no-cert", "wrong-role"],
)
def test_a_refused_caller_gets_one_audit_record_and_an_openai_error(
    client: TestClient,
    sink: Sink,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    status: int,
    type_: str,
    actor: str,
    role: str | None,
) -> None:
    with caplog.at_level(logging.WARNING, logger=log.name):
        err = openai_error(client.get("/v1/admin/thing", headers=headers), status)
    assert err["type"] == type_ and err["code"] is None
    expected = refusal(actor=actor, resource="/v1/admin/thing", status=status, reason=err["message"], role=role)
    assert sink.records == [expected]
    assert [r.name for r in caplog.records] == [log.name] and "refused GET /v1/admin/thing" in caplog.text


def test_an_admitted_caller_leaves_no_refusal(client: TestClient, sink: Sink) -> None:
    r = client.get("/v1/admin/thing", headers=as_peer("olga", "admin"))
    assert r.status_code == 200 and r.json() == {"name": "olga"}
    assert sink.records == []


@pytest.mark.parametrize("name", sorted(RAISED))
def test_a_fedseek_error_answers_its_status_type_and_code(client: TestClient, name: str) -> None:
    exc = RAISED[name]
    err = openai_error(client.get(f"/raise/{name}"), exc.status)
    assert err == {"message": str(exc), "type": exc.openai_type, "param": None, "code": exc.code}


def test_invalid_body_and_unknown_route_are_openai_errors(client: TestClient) -> None:
    err = openai_error(client.post("/count", json={"count": 0}), 400)
    assert err["message"].startswith("count: ") and err["type"] == "invalid_request_error"
    openai_error(client.post("/count", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert openai_error(client.get("/nowhere"), 404)["type"] == "invalid_request_error"


def test_access_denied_is_a_fedseek_error_of_the_right_kind() -> None:
    assert isinstance(NotAuthenticated("x"), Unauthenticated) and NotAuthenticated("x").status == 401
    assert isinstance(NotPermitted("x"), Forbidden) and NotPermitted("x").status == 403
    for exc in (NotAuthenticated("x"), NotPermitted("x")):
        assert isinstance(exc, AccessDenied) and isinstance(exc, FedSeekError)
    response = error_response_for(NotPermitted("role 'node' may not call this route"))
    assert response.status_code == 403
