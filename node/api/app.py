"""The node's HTTP apps: `create_app` (the node agent) and `create_serving_app` (`fedseek serve`).

Both share one base: OpenAI-shaped errors (federation.security.refusals), `/healthz`, and the
request guard (node/api/guard.py), which checks the body size and the caller against the access
policy (node/access.py) before any route runs or any body is read. No interactive docs or
schema are served (`/docs`, `/redoc`, `/openapi.json`): the API's description is for its
callers' code (`app.openapi()` in-process), not for whoever reaches the port.
The routes live one family per module and are mounted here:

| module            | routes                                              | who (node/access.py) |
| ----------------- | --------------------------------------------------- | -------------------- |
| completions.py    | `/v1/chat/completions`, `/v1/completions`           | application          |
| models.py         | `/v1/models`                                        | application          |
| metrics.py        | `/metrics` (engine; at a node the site's too)       | metrics              |
| explanations.py   | `/v1/explanations`, `/v1/explanations/{id}`         | reviewer             |
| admin.py          | `/v1/admin/status`                                  | admin                |
| internal.py       | `/internal/train`, `/internal/ready`, `.../deploy`  | self                 |

`fedseek serve` mounts the first three only. A node with `serving_backend: "vllm"` mounts upstream.py
(completions and `/metrics`, forwarded to the site's vLLM) in place of completions.py and metrics.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from federation.security.refusals import error_response_for, install_error_handlers
from node.access import AccessPolicy
from node.api import admin, completions, explanations, internal, metrics, models, upstream
from node.api.deps import GetServing
from node.api.guard import MAX_BODY_BYTES, RequestGuard
from node.explain_service import Explanations
from node.metrics import NodeCollector, node_registry
from node.service import Loading, NodeService

__all__ = ["MAX_BODY_BYTES", "create_app", "create_serving_app"]


def create_app(service: NodeService, *, access: AccessPolicy) -> FastAPI:
    """Everything the node agent serves, behind its mTLS endpoint (`access`: node.build.node_access)."""
    app = _base(f"FedSeek node {service.config.name}", access, site=service.config.name)
    app.state.get_serving = lambda: service.serving
    app.state.service = service
    app.state.explanations = Explanations(service)
    collector = NodeCollector(
        site=service.config.name,
        ledger=service.ledger,
        audit=service.audit,
        pki_dir=Path(service.config.pki_dir),
        ledger_refusal=service.ledger_refusal,
    )
    setattr(app.state, metrics.SITE_METRICS_STATE, node_registry(collector))
    # Serving through the site's vLLM: the completion routes and /metrics forward (node/api/upstream.py).
    serving = (completions, models, metrics) if service.upstream is None else (upstream, models)
    setattr(app.state, upstream.UPSTREAM_STATE, service.upstream)
    for module in (*serving, explanations, internal, admin):
        app.include_router(module.router)
    return app


def create_serving_app(get_serving: GetServing, policy: AccessPolicy, *, name: str) -> FastAPI:
    """The OpenAI API alone (`fedseek serve`); `get_serving` returns None while the model loads (503)."""
    app = _base(f"FedSeek serve {name}", policy, site=name)
    app.state.get_serving = get_serving
    for module in (completions, models, metrics):
        app.include_router(module.router)
    return app


def _base(title: str, policy: AccessPolicy, *, site: str) -> FastAPI:
    """An app with the shared error handlers, the request guard, `/healthz` and the access policy."""
    app = FastAPI(title=title, version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
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

    app.add_middleware(RequestGuard)
    return app
