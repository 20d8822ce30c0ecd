"""The coordinator's admin API: HTTPS with consortium client certificates, `admin` role only.

Read-only views for the consortium operator: which sites may join and which are registered
with the SuperLink, the adapter versions in the registry with their lineage, and run
summaries; and `/metrics` (Prometheus, coordinator/metrics.py) for a `monitor` certificate (or an
admin's). Served through federation.security.mtls_server (TLS 1.3, CRL); refused callers are
logged, audited and answered by federation.security.refusals, exactly as the node's routes are.
A scrape is not audited (every 15 s would bury the operator's reads), its refusal is.

One route takes a body: `POST /v1/witness/audit-checkpoint`, where a site's node agent pushes its
audit log's latest signed checkpoint between rounds (`node.checkpoint_push`), with its own `node`
certificate and for its own site only; `coordinator.audit_witness` checks and keeps it (channel
`push`). An accepted push is not audited (the witness store is its record); a refused one is.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.audit_witness import PUSH, witness_audit_checkpoint
from coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coordinator.registry import AdapterRegistry, RegistryError
from coordinator.sites import SiteAccess
from coordinator.witness import LedgerWitness, WitnessRefused
from federation.errors import InvalidInput
from federation.security import pki
from federation.security.mtls_server import peer_of
from federation.security.refusals import audit_refusal, closing, error_response, install_error_handlers
from federation.security.roles import AccessDenied, NotPermitted, require_role
from privacy.audit import AuditTrail

log = logging.getLogger("fedseek.coordinator.admin")

PeerFn = Callable[[Request], pki.Identity | None]

CHECKPOINT_ROUTE = "/v1/witness/audit-checkpoint"
CHECKPOINT_BODY_MAX = 16 * 1024  # a signed checkpoint is about 400 bytes
CHECKPOINT_BODY_TIMEOUT_S = 10.0
"""The most a pushed checkpoint's body may take to arrive (its 400 bytes take milliseconds): a site that
declares a body and sends it a byte at a time, or never, would otherwise hold a connection for ever."""


def create_admin_app(
    *,
    sites: SiteAccess,
    registry: AdapterRegistry,
    audit: AuditTrail,
    peer: PeerFn = peer_of,
    health: Callable[[], dict[str, Any]] | None = None,
    metrics: Callable[[], bytes] | None = None,
    witness: LedgerWitness | None = None,
    checkpoint_body_timeout_s: float = CHECKPOINT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The admin routes; `health` reports the coordinator's supervised children (`Health.snapshot`),
    `metrics` renders `/metrics` (`CoordinatorMetrics.render`; none: the route answers 404),
    `witness` holds the site keys and store the pushed audit checkpoints go to (none: 404)."""
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

    def node(request: Request) -> pki.Identity:
        identity = peer(request)
        try:
            return require_role(identity, "node")
        except AccessDenied as exc:
            audit_refusal(request, exc, identity=identity, audit=audit, log=log)
            raise

    if witness is not None:
        store_of = witness

        @app.post(CHECKPOINT_ROUTE, response_model=None)
        async def push_checkpoint(request: Request, who: pki.Identity = Depends(node)) -> dict[str, Any] | Response:  # noqa: B008
            """A site's audit checkpoint between rounds: signed by its registered key, for its own site."""
            try:  # at most CHECKPOINT_BODY_MAX bytes (NoBody refused more unread), on a clock
                body = await asyncio.wait_for(request.body(), checkpoint_body_timeout_s)
            except TimeoutError:
                late = f"request body not received within {checkpoint_body_timeout_s:g} s"
                return closing(error_response(408, late))
            try:
                statement = json.loads(body)
            except ValueError:  # UnicodeDecodeError included
                statement = None
            if not isinstance(statement, dict) or not isinstance(statement.get("payload"), dict):
                raise InvalidInput("the body must be one signed audit checkpoint (JSON)")
            origin = statement["payload"].get("origin")
            if origin != who.name:
                exc = NotPermitted(f"site '{who.name}' may push only its own audit checkpoints, not {origin!r}'s")
                audit_refusal(request, exc, identity=who, audit=audit, log=log)
                raise exc
            try:
                checkpoint = witness_audit_checkpoint(
                    store_of.store, who.name, [statement], key=store_of.site_key(who.name), channel=PUSH
                )
            except WitnessRefused as exc:
                log.warning("refused the audit checkpoint %s pushed: %s", who.name, exc.one_line())
                audit.append(
                    actor=who.name,
                    action="witness.refused",
                    resource=who.name,
                    details={"stage": PUSH, "error": exc.one_line()},
                )
                raise
            if checkpoint is None:  # the kind was not audit.checkpoint
                raise InvalidInput("the body must be a signed audit.checkpoint statement")
            return {"object": "audit.checkpoint", "site": who.name, "size": checkpoint.size, "root": checkpoint.root}

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
    an upload (pure ASGI, ahead of FastAPI, which would otherwise let uvicorn drain it). The one
    exception, a POST of a pushed audit checkpoint, takes a body of a declared length of at most
    `CHECKPOINT_BODY_MAX` bytes (no chunked upload), judged the same way from the headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            refusal = _body_refusal(scope, headers)
            if refusal is not None:
                await closing(error_response(413, refusal))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _body_refusal(scope: Scope, headers: Headers) -> str | None:
    """Why a request's body is refused unread, or None."""
    length = headers.get("content-length", "0").strip()
    if scope.get("path") == CHECKPOINT_ROUTE and scope.get("method") == "POST":
        if "transfer-encoding" in headers:
            return "a pushed audit checkpoint needs a Content-Length (no chunked body)"
        if not length.isdigit() or int(length) > CHECKPOINT_BODY_MAX:
            return f"a pushed audit checkpoint is at most {CHECKPOINT_BODY_MAX} bytes"
        return None
    if "transfer-encoding" in headers or length not in ("", "0"):
        return "the admin API takes no request body"
    return None
