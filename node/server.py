"""HTTP layer of the node agent: OpenAI-compatible API, explanations, internal federation routes.

Errors use OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).
Who may call which route is node/access.py's table; each route names its rule as a
dependency, so the caller is checked before the request body is even parsed.
`create_serving_app` is the OpenAI part alone, for `fedseek serve`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from explain.attribution import NonFiniteScores
from federation.protocol import wire
from federation.security.roles import openai_error
from node.access import AccessDenied, AccessPolicy, Caller, Rule
from node.api_keys import ensure_first_key
from node.client_app import CONFIG_HEADER, REPORT_HEADER
from node.engine import UnknownModel
from node.explain_service import ExplainRequest, ExplanationNotFound, Explanations
from node.explain_service import QueueFull as ExplanationQueueFull
from node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from node.service import Loading, NodeService, Serving
from node.serving import Event, QueueFull, SamplingParams, UnknownAdapter
from node.trainer import TrainingError
from privacy.ledger import BudgetExceeded, LedgerError

MAX_BODY_BYTES = 1024 * 1024


INT64 = 2**63


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """The generation parameters both OpenAI endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, max_length=256)
    max_tokens: int = Field(default=32, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = Field(default=None, max_length=4)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s or len(s) > 256 for s in stop):
            raise ValueError("stop: each stop string must have 1 to 256 characters")
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=tuple(stop)
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class CompletionRequest(Sampling):
    max_tokens: int = Field(default=16, ge=1, le=4096)
    prompt: str | list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(min_length=1, max_length=100_000)


error = openai_error  # one error shape for every FedSeek HTTP API


def default_access(service: NodeService) -> AccessPolicy:
    return AccessPolicy(
        site=service.config.name,
        audit=service.audit,
        api_keys=ensure_first_key(service.state_dir),
        agent_token=service.token,
        openai_auth=service.config.openai_auth,  # type: ignore[arg-type]  # checked by AccessPolicy
    )


CallerDep = Callable[[Rule], Any]


def _app(title: str, policy: AccessPolicy, *, site: str) -> tuple[FastAPI, CallerDep]:
    """An app with the shared error handlers, body limit and `/healthz`; and its `caller(rule)` dependency."""
    app = FastAPI(title=title, version="0.1.0")

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

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (an unparsable body, an unknown route) in the same shape."""
        return error(
            exc.status_code, str(exc.detail), type_="invalid_request_error" if exc.status_code < 500 else "server_error"
        )

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "site": site}

    app.add_middleware(BodyLimit)
    return app, caller


def create_app(service: NodeService, *, access: AccessPolicy | None = None) -> FastAPI:
    app, caller = _app(
        f"FedSeek node {service.config.name}", access or default_access(service), site=service.config.name
    )
    add_openai_routes(app, caller, lambda: service.serving)

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
        except ExplanationQueueFull as exc:
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
            content=wire.encode_update(result.update()),  # FFA-LoRA: B only, with A's digest
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

    return app


def _caller(request: Request) -> Caller:
    who: Caller = request.state.caller
    return who


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
                await error(413, f"request body of {length} bytes exceeds {limit}")(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the OpenAI API ------------------------------------------------------------------------------


def create_serving_app(get_serving: Callable[[], Serving | None], policy: AccessPolicy, *, name: str) -> FastAPI:
    """The OpenAI API alone (`fedseek serve`); `get_serving` returns None while the model loads (503)."""
    app, caller = _app(f"FedSeek serve {name}", policy, site=name)
    add_openai_routes(app, caller, get_serving)
    return app


def add_openai_routes(app: FastAPI, caller: CallerDep, get_serving: Callable[[], Serving | None]) -> None:
    """`/v1/models`, `/v1/chat/completions`, `/v1/completions` (streaming too) and `/metrics`."""

    def serving() -> Serving:
        s = get_serving()
        if s is None:
            raise Loading("the model is still loading; retry shortly")
        return s

    @app.exception_handler(Loading)
    async def _loading(_: Request, exc: Loading) -> JSONResponse:
        response = error(503, str(exc), type_="service_unavailable", code="model_loading")
        response.headers["retry-after"] = "5"
        return response

    @app.get("/v1/models", dependencies=[caller("application")])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": serving().models()}

    @app.post("/v1/chat/completions", response_model=None, dependencies=[caller("application")])
    async def chat(req: ChatRequest, request: Request) -> Response:
        return await _complete(serving(), req, [m.model_dump() for m in req.messages], _caller(request).actor, CHAT)

    @app.post("/v1/completions", response_model=None, dependencies=[caller("application")])
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await _complete(serving(), req, req.prompt, _caller(request).actor, TEXT)

    @app.get("/metrics", dependencies=[caller("application")])
    def metrics() -> Response:
        return Response(serving().metrics.render(), media_type=METRICS_CONTENT_TYPE)


@dataclass(frozen=True)
class Shape:
    """What differs between chat and text completions in OpenAI's format."""

    prefix: str
    object: str
    chunk_object: str

    def choice(self, text: str, finish: str | None, *, stream: bool, first: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"index": 0}
        if self is TEXT:
            body["text"] = text
        elif not stream:
            body["message"] = {"role": "assistant", "content": text}
        elif first:
            body["delta"] = {"role": "assistant", "content": text}
        else:
            body["delta"] = {"content": text} if text or finish is None else {}
        return {**body, "logprobs": None, "finish_reason": finish}


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk")
TEXT = Shape("cmpl", "text_completion", "text_completion")
FINISH = {"stop": "stop", "length": "length"}


def _usage(ev: Event) -> dict[str, int]:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
    }


async def _complete(
    serving: Serving, req: Sampling, prompt: list[dict[str, str]] | str | list[int], actor: str, shape: Shape
) -> Response:
    """Queue the request (refusals become OpenAI errors before any output), then answer or stream it."""
    receipt: dict[str, str] = {}
    try:
        prep = serving.prepare(prompt, req.model)
        events = serving.generate(prep, req.params(), actor=actor, receipt=receipt)
        first = await anext(events)
    except (UnknownModel, UnknownAdapter) as exc:
        return error(404, str(exc), code="model_not_found")
    except QueueFull as exc:
        return error(429, f"the server is busy ({exc}); retry later", type_="rate_limit_error", code="queue_full")
    except ValueError as exc:
        return error(400, str(exc), code="context_length_exceeded" if "context" in str(exc) else None)
    head = {"id": f"{shape.prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": prep.served}
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(events, first, head, shape, usage=usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    text, last = [first.text], first
    async for ev in events:
        text.append(ev.text)
        last = ev
    if last.finish_reason == "error":
        return error(500, f"generation failed: {last.error}", type_="server_error")
    return JSONResponse(
        {
            **head,
            "object": shape.object,
            "choices": [shape.choice("".join(text), FINISH.get(str(last.finish_reason)), stream=False)],
            "usage": _usage(last),
            "system_fingerprint": receipt.get("audit_hash", "")[:16],
        }
    )


async def _sse(
    events: AsyncGenerator[Event, None], first: Event, head: dict[str, Any], shape: Shape, *, usage: bool
) -> AsyncIterator[str]:
    """Server-sent chunks as OpenAI sends them: the role first, text deltas, the finish reason, usage, [DONE].

    Starlette cancels this generator when the client disconnects; closing `events` then cancels
    the request in the engine, so its slot is free at once.
    """

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {**head, "object": shape.chunk_object, "choices": choices, **({"usage": None} if usage else {}), **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        ev: Event | None = first
        is_first = True
        last = first
        while ev is not None:
            last = ev
            if ev.finish_reason == "error":
                yield f"data: {json.dumps({'error': {'message': str(ev.error), 'type': 'server_error'}})}\n\n"
                break
            finish = FINISH.get(str(ev.finish_reason)) if ev.finish_reason else None
            if ev.text or is_first:
                yield chunk([shape.choice(ev.text, None, stream=True, first=is_first)])
                is_first = False
            if finish:
                yield chunk([shape.choice("", finish, stream=True)])
            ev = await anext(events, None)
        if usage and last.finish_reason != "error":
            yield chunk([], usage=_usage(last))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
