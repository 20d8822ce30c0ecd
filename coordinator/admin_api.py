"""The coordinator's admin API: HTTPS with consortium client certificates, `admin` role only.

Read-only views for the consortium operator: which sites may join and which are registered
with the SuperLink, the adapter versions in the registry with their lineage, and run
summaries; and `/metrics` (Prometheus, coordinator/metrics.py) for a `monitor` certificate (or an
admin's). Served through federation.security.mtls_server (TLS 1.3, CRL); refused callers are
logged, audited and answered by federation.security.refusals, exactly as the node's routes are.
A scrape is not audited (every 15 s would bury the operator's reads), its refusal is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coordinator.registry import AdapterRegistry, RegistryError
from coordinator.sites import SiteAccess
from federation.security import pki
from federation.security.mtls_server import peer_of
from federation.security.refusals import audit_refusal, error_response, install_error_handlers
from federation.security.roles import AccessDenied, require_role
from privacy.audit import AuditTrail

log = logging.getLogger("fedseek.coordinator.admin")

PeerFn = Callable[[Request], pki.Identity | None]


def create_admin_app(
    *,
    sites: SiteAccess,
    registry: AdapterRegistry,
    audit: AuditTrail,
    peer: PeerFn = peer_of,
    health: Callable[[], dict[str, Any]] | None = None,
    metrics: Callable[[], bytes] | None = None,
) -> FastAPI:
    """The admin routes; `health` reports the coordinator's supervised children (`Health.snapshot`),
    `metrics` renders `/metrics` (`CoordinatorMetrics.render`; none: the route answers 404)."""
    # No /docs, /redoc or /openapi.json: the API is described to nobody who reaches the port.
    app = FastAPI(title="FedSeek coordinator admin", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(NoBody)

    def admin(request: Request) -> pki.Identity:
        identity = peer(request)
        try:
            return require_role(identity, "admin")
        except AccessDenied as exc:
            audit_refusal(request, exc, identity=identity, audit=audit, log=log)
            raise

    def monitor(request: Request) -> pki.Identity:
        """A `monitor` certificate (Prometheus), or an admin's."""
        identity = peer(request)
        try:
            if identity is not None and identity.role == "admin":
                return identity
            return require_role(identity, "monitor")
        except AccessDenied as exc:
            audit_refusal(request, exc, identity=identity, audit=audit, log=log)
            raise

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if metrics is not None:
        render = metrics

        @app.get("/metrics", dependencies=[Depends(monitor)])
        def metrics_view() -> Response:
            return Response(render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/admin/sites")
    def site_list(who: pki.Identity = Depends(admin)) -> dict[str, Any]:  # noqa: B008 - FastAPI dependency
        registered = dict(sites.registered)
        rows = [
            {
                "name": ident.name,
                "role": ident.role,
                "status": status,
                "not_after": ident.not_after.isoformat(),
                "serial": f"{ident.serial:x}",
                "registered_node_id": registered.get(ident.name),
            }
            for ident, status in pki.list_status(sites.pki_dir)
        ]
        audit.append(actor=who.name, action="admin.sites", resource="/v1/admin/sites")
        return {"object": "list", "data": rows}

    @app.get("/v1/admin/versions")
    def versions(who: pki.Identity = Depends(admin)) -> dict[str, Any]:  # noqa: B008
        data = []
        for version in registry.versions():
            try:
                data.append(registry.manifest(version).to_json())
            except RegistryError as exc:  # a damaged version is shown, not hidden
                data.append({"version": version, "error": str(exc)})
        audit.append(actor=who.name, action="admin.versions", resource="/v1/admin/versions")
        return {"object": "list", "latest": registry.latest(), "data": data}

    @app.get("/v1/admin/health")
    def health_view(who: pki.Identity = Depends(admin)) -> dict[str, Any]:  # noqa: B008
        """Which of the coordinator's processes run, and which are being restarted (fleet degraded)."""
        audit.append(actor=who.name, action="admin.health", resource="/v1/admin/health")
        return health() if health is not None else {"state": "unknown", "down": [], "children": {}}

    @app.get("/v1/admin/runs")
    def runs(who: pki.Identity = Depends(admin)) -> dict[str, Any]:  # noqa: B008
        out = []
        for path in sorted((registry.root / "runs").glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                out.append({"run": path.stem, "error": f"unreadable summary: {exc}"})
        audit.append(actor=who.name, action="admin.runs", resource="/v1/admin/runs")
        return {"object": "list", "data": out}

    return app


class NoBody:
    """Every admin route is a GET: a request that brings a body is refused (413, connection closed)
    before authentication and before a byte of it is read, so the port cannot be made to take
    an upload (pure ASGI, ahead of FastAPI, which would otherwise let uvicorn drain it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            if "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0"):
                response = error_response(413, "the admin API takes no request body")
                response.headers["connection"] = "close"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
