"""The coordinator's admin API through TestClient: admin role only, refusals audited, views correct.

Real handshakes against the running coordinator's admin port: tests/e2e/test_fleet_revocation.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from coordinator.admin_api import create_admin_app
from coordinator.registry import AdapterRegistry
from coordinator.sites import SiteAccess
from privacy.audit import AuditTrail
from tests.fake_peer import as_peer, header_peer
from tests.federation.security.refusal_record import content, refusal


@pytest.fixture
def setup(pki_dir: Path, tmp_path: Path) -> tuple[TestClient, AuditTrail, SiteAccess]:
    audit = AuditTrail(tmp_path / "audit.jsonl")
    sites = SiteAccess(
        pki_dir=pki_dir,
        site_keys_dir=tmp_path / "no-keys",
        audit=audit,
        register=lambda key, name: 1,
        unregister=lambda node_id: None,
    )
    sites.registered["site-a"] = 7
    registry = AdapterRegistry(tmp_path / "registry")
    (registry.root / "runs").mkdir(parents=True)
    (registry.root / "runs" / "r1.json").write_text(json.dumps({"run": "r1", "rounds_completed": 2}))
    (registry.root / "runs" / "broken.json").write_text("{not json")
    app = create_admin_app(sites=sites, registry=registry, audit=audit, peer=header_peer)
    return TestClient(app, raise_server_exceptions=False), audit, sites


def records(audit: AuditTrail) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit.path.read_text().splitlines()]


def test_sites_view_shows_certificate_status_and_registration(
    setup: tuple[TestClient, AuditTrail, SiteAccess],
) -> None:
    client, audit, _ = setup
    r = client.get("/v1/admin/sites", headers=as_peer("olga", "admin"))
    assert r.status_code == 200, r.text
    rows = {row["name"]: row for row in r.json()["data"]}
    assert rows["site-a"]["role"] == "node" and rows["site-a"]["registered_node_id"] == 7
    assert rows["site-b"]["registered_node_id"] is None
    assert rows["reviewer"]["status"] == "valid"
    assert records(audit)[-1]["action"] == "admin.sites" and records(audit)[-1]["actor"] == "olga"


def test_runs_and_versions_views(setup: tuple[TestClient, AuditTrail, SiteAccess]) -> None:
    client, _, _ = setup
    runs = client.get("/v1/admin/runs", headers=as_peer("olga", "admin")).json()["data"]
    assert {"run": "r1", "rounds_completed": 2} in runs
    assert any("unreadable summary" in r.get("error", "") for r in runs)  # shown, not hidden
    versions = client.get("/v1/admin/versions", headers=as_peer("olga", "admin")).json()
    assert versions == {"object": "list", "latest": None, "data": []}


@pytest.mark.parametrize(
    ("headers", "status", "actor", "role"),
    [
        ({}, 401, "testclient:50000", None),  # no certificate: the client's address
        (as_peer("site-a", "node"), 403, "site-a", "node"),
        (as_peer("rita", "reviewer"), 403, "rita", "reviewer"),
    ],
    ids=["no-cert", "node-cert", "reviewer-cert"],
)
def test_only_admins_get_in_and_refusals_are_audited(
    setup: tuple[TestClient, AuditTrail, SiteAccess], headers: dict[str, str], status: int, actor: str, role: str | None
) -> None:
    """One `access.refused` record per refusal, the very record the node writes (refusal_record.refusal)."""
    client, audit, _ = setup
    before = len(audit)
    r = client.get("/v1/admin/sites", headers=headers)
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["type"] == ("authentication_error" if status == 401 else "permission_error")
    assert "role 'admin'" in err["message"]
    expected = refusal(actor=actor, resource="/v1/admin/sites", status=status, reason=err["message"], role=role)
    assert [content(record) for record in records(audit)[before:]] == [expected]


def test_unknown_route_is_an_openai_error(setup: tuple[TestClient, AuditTrail, SiteAccess]) -> None:
    client, _, _ = setup
    r = client.get("/v1/admin/nowhere", headers=as_peer("olga", "admin"))
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_health_view_shows_a_child_being_restarted(pki_dir: Path, tmp_path: Path) -> None:
    """The supervisor's Health as the operator reads it: a gateway waiting out its back-off is
    `degraded` with its restart count; only admins see it, and each look is audited."""
    from federation.ops.supervise import Health

    audit = AuditTrail(tmp_path / "audit.jsonl")
    sites = SiteAccess(
        pki_dir=pki_dir,
        site_keys_dir=tmp_path / "no-keys",
        audit=audit,
        register=lambda key, name: 1,
        unregister=lambda node_id: None,
    )
    health = Health(["superlink", "fleet-gateway"])
    app = create_admin_app(
        sites=sites,
        registry=AdapterRegistry(tmp_path / "registry"),
        audit=audit,
        peer=header_peer,
        health=health.snapshot,
    )
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/v1/admin/health", headers=as_peer("olga", "admin")).json()["state"] == "ok"
    health.update("fleet-gateway", state="restarting", restarts=3, failures=2, last_exit=-9)
    body = client.get("/v1/admin/health", headers=as_peer("olga", "admin")).json()
    assert body["state"] == "degraded" and body["down"] == ["fleet-gateway"]
    assert body["children"]["fleet-gateway"]["restarts"] == 3 and body["children"]["superlink"]["state"] == "running"
    assert records(audit)[-1]["action"] == "admin.health"
    assert client.get("/v1/admin/health", headers=as_peer("rita", "reviewer")).status_code == 403
