"""HTTP layer of the node agent: OpenAI-compatible API, explanations, internal federation routes.

Errors use OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).
Who may call which route is node/access.py's table; each route names its rule as a
dependency, so the caller is checked before the request body is even parsed.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from explain.attribution import NonFiniteScores
from federation import wire
from federation.roles import openai_error
from node.access import AccessDenied, AccessPolicy, Caller, Rule
from node.api_keys import ensure_first_key
from node.client_app import CONFIG_HEADER, REPORT_HEADER
from node.engine import UnknownModel
from node.explain_service import ExplainRequest, ExplanationNotFound, Explanations, QueueFull
from node.service import NodeService
from node.trainer import TrainingError
from privacy.ledger import BudgetExceeded, LedgerError

MAX_BODY_BYTES = 1024 * 1024


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int = Field(default=32, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False


error = openai_error  # one error shape for every FedSeek HTTP API


def default_access(service: NodeService) -> AccessPolicy:
    return AccessPolicy(
        site=service.config.name,
        audit=service.audit,
        api_keys=ensure_first_key(service.state_dir),
        agent_token=service.token,
        openai_auth=service.config.openai_auth,  # type: ignore[arg-type]  # checked by AccessPolicy
    )


def create_app(service: NodeService, *, access: AccessPolicy | None = None) -> FastAPI:
    app = FastAPI(title=f"FedSeek node {service.config.name}", version="0.1.0")
    policy = access or default_access(service)

    def caller(rule: Rule) -> Any:
        """A route dependency: runs before the body is parsed; the route reads `request.state.caller`."""

        def check(request: Request) -> None:
            request.state.caller = policy.require(request, rule)

        return Depends(check)

    @app.exception_handler(AccessDenied)
    async def _denied(_: Request, exc: AccessDenied) -> JSONResponse:
        return error(exc.status, str(exc), type_=exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where}: {first['msg']}" if where else str(first["msg"]))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "site": service.config.name}

    @app.get("/v1/models", dependencies=[caller("application")])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": service.models()}

    @app.post("/v1/chat/completions", response_model=None, dependencies=[caller("application")])
    def chat(req: ChatRequest, request: Request) -> dict[str, Any] | JSONResponse:
        if req.stream:
            return error(400, "stream=true is not supported by this node yet", code="unsupported")
        try:
            gen, served, audit_hash = service.chat(
                [m.model_dump() for m in req.messages],
                model=req.model,
                actor=_caller(request).actor,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
            )
        except UnknownModel as exc:
            return error(404, str(exc), code="model_not_found")
        except ValueError as exc:
            return error(400, str(exc), code="context_length_exceeded")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            },
            "system_fingerprint": audit_hash[:16],
        }

    explanations = Explanations(service)

    @app.post("/v1/explanations", response_model=None, dependencies=[caller("reviewer")])
    def explain(req: ExplainRequest, request: Request) -> dict[str, Any] | JSONResponse:
        """Validate synchronously (a refusal writes nothing), then explain now or in the background."""
        try:
            job = explanations.validate(req, requested_by=_caller(request).actor)
            if req.background:
                return JSONResponse(status_code=202, content=explanations.submit(job))
            return explanations.run(job)
        except UnknownModel as exc:
            return error(404, str(exc), code="model_not_found")
        except QueueFull as exc:
            return error(429, str(exc), type_="rate_limit_error", code="explanation_queue_full")
        except ValueError as exc:
            return error(400, str(exc))
        except NonFiniteScores as exc:
            return error(500, str(exc), type_="server_error", code="non_finite_scores")

    @app.get("/v1/explanations/{explanation_id}", response_model=None, dependencies=[caller("reviewer")])
    def explanation(explanation_id: str) -> dict[str, Any] | JSONResponse:
        try:
            return explanations.get(explanation_id)
        except ExplanationNotFound as exc:
            return error(404, str(exc), code="explanation_not_found")

    async def _body(request: Request) -> tuple[wire.Arrays | None, dict[str, Any]]:
        raw = await request.body()
        config = json.loads(request.headers.get(CONFIG_HEADER, "{}"))
        return (wire.decode(raw) if raw else None), config

    @app.post("/internal/train", response_model=None, dependencies=[caller("self")])
    async def internal_train(request: Request) -> Response:
        try:
            arrays, config = await _body(request)
            result = await run_in_threadpool(service.train, arrays, config)
        except (wire.WireError, json.JSONDecodeError) as exc:
            return error(400, str(exc))
        except (BudgetExceeded, LedgerError, TrainingError) as exc:
            return error(409, str(exc), code=type(exc).__name__)
        return Response(
            content=wire.encode(result.arrays),
            media_type="application/octet-stream",
            headers={REPORT_HEADER: json.dumps(result.report.to_dict())},
        )

    @app.post("/internal/deploy", response_model=None, dependencies=[caller("self")])
    async def internal_deploy(request: Request) -> dict[str, Any] | JSONResponse:
        try:
            arrays, config = await _body(request)
            if not arrays or "adapter-version" not in config:
                return error(400, "deploy needs adapter arrays and an adapter-version")
            return await run_in_threadpool(
                service.deploy, str(config["adapter-version"]), str(config["adapter-sha256"]), arrays
            )
        except KeyError as exc:
            return error(400, f"deploy config is missing {exc}")
        except (wire.WireError, json.JSONDecodeError) as exc:
            return error(400, str(exc))

    @app.get("/v1/admin/status", response_model=None, dependencies=[caller("admin")])
    def status() -> dict[str, Any] | JSONResponse:
        return service.status()

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        limit = wire.MAX_ADAPTER_BYTES if request.url.path.startswith("/internal/") else MAX_BODY_BYTES
        if length is not None and length.isdigit() and int(length) > limit:
            return error(413, f"request body of {length} bytes exceeds {limit}")
        response: Response = await call_next(request)
        return response

    return app


def _caller(request: Request) -> Caller:
    who: Caller = request.state.caller
    return who
