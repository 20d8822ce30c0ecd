"""The node's HTTP apps: `create_app` (the node agent) and `create_serving_app` (`fedseek serve`).

Both share one base: OpenAI-shaped errors (federation.security.refusals), a body limit, `/healthz`,
and the access policy every route checks its caller against (node/access.py, via deps.caller).
The routes live one family per module and are mounted here:

| module            | routes                                              | who (node/access.py) |
| ----------------- | --------------------------------------------------- | -------------------- |
| completions.py    | `/v1/chat/completions`, `/v1/completions`           | application          |
| models.py         | `/v1/models`, `/metrics`                            | application          |
| explanations.py   | `/v1/explanations`, `/v1/explanations/{id}`         | reviewer             |
| admin.py          | `/v1/admin/status`                                  | admin                |
| internal.py       | `/internal/train`, `/internal/deploy`               | self                 |

`fedseek serve` mounts the first two only.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from federation.protocol import wire
from federation.security.refusals import error_response, error_response_for, install_error_handlers
from node.access import AccessPolicy
from node.api import admin, completions, explanations, internal, models
from node.api.deps import GetServing
from node.explain_service import Explanations
from node.service import Loading, NodeService

MAX_BODY_BYTES = 1024 * 1024
"""The largest body an API route accepts; `/internal/*` routes take up to a whole adapter."""


def create_app(service: NodeService, *, access: AccessPolicy) -> FastAPI:
    """Everything the node agent serves, behind its mTLS endpoint (`access`: node.build.node_access)."""
    app = _base(f"FedSeek node {service.config.name}", access, site=service.config.name)
    app.state.get_serving = lambda: service.serving
    app.state.service = service
    app.state.explanations = Explanations(service)
    for module in (completions, models, explanations, internal, admin):
        app.include_router(module.router)
    return app


def create_serving_app(get_serving: GetServing, policy: AccessPolicy, *, name: str) -> FastAPI:
    """The OpenAI API alone (`fedseek serve`); `get_serving` returns None while the model loads (503)."""
    app = _base(f"FedSeek serve {name}", policy, site=name)
    app.state.get_serving = get_serving
    for module in (completions, models):
        app.include_router(module.router)
    return app


def _base(title: str, policy: AccessPolicy, *, site: str) -> FastAPI:
    """An app with the shared error handlers, body limit, `/healthz` and the access policy."""
    app = FastAPI(title=title, version="0.1.0")
    app.state.access = policy
    install_error_handlers(app)

    @app.exception_handler(Loading)
    async def _loading(_: Request, exc: Loading) -> JSONResponse:
        response = error_response_for(exc)  # 503 `model_loading`, and when to come back
        response.headers["retry-after"] = "5"
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "site": site}

    app.add_middleware(BodyLimit)
    return app


class BodyLimit:
    """Refuse a body larger than the route allows, from its Content-Length, before reading it.

    Pure ASGI (not `@app.middleware`), so streamed responses and client disconnects pass straight through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length")
            limit = wire.MAX_ADAPTER_BYTES if scope["path"].startswith("/internal/") else MAX_BODY_BYTES
            if length is not None and length.isdigit() and int(length) > limit:
                await error_response(413, f"request body of {length} bytes exceeds {limit}")(scope, receive, send)
                return
        await self.app(scope, receive, send)
