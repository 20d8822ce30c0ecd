"""The OpenAI routes of a node that serves through the site's vLLM (`serving_backend: "vllm"`).

`/v1/chat/completions` and `/v1/completions` (whole or streamed) are forwarded to vLLM; `/v1/models`
is node/api/models.py's, unchanged (what the node serves: the base model and every installed version,
with their release status); `/metrics` here has the node's `fedseek_upstream_*` and the site's metrics
(vLLM's own `vllm:*` are on vLLM's `/metrics`). Before a request reaches vLLM the node has done all it
does for its own engine: the request guard (body size, the caller's key or certificate and scope, the
site's access policy, node/api/guard.py), then here the model it names resolved to a version the node
serves (default traffic routed by the gray release, node/release.py) and that version loaded in vLLM.
The body goes on as the client sent it, with `model` set to vLLM's name for it (a version's id is its
LoRA name in vLLM) and the final usage chunk asked for; vLLM validates the sampling parameters itself.

Each answered request is one `serve` audit record, as the engine writes it (prompt and output as
digests keyed by the site's secret, the adapter's sha256, token counts from vLLM's usage, finish reason,
latency) plus `backend` and vLLM's response id; a refusal before any generation (vLLM's 4xx, vLLM down)
is not a model call and writes none. vLLM's errors come back in OpenAI's shape with vLLM's status and
message; vLLM unreachable is 503 `upstream_unavailable` with one line naming it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest

from federation.errors import InvalidInput
from federation.protocol.names import LATEST_ALIAS
from federation.security.refusals import ErrorDetail, ErrorResponse
from node.api.deps import caller, current_caller, node_of
from node.api.metrics import SITE_METRICS_STATE
from node.engine import BASE
from node.metrics import CONTENT_TYPE
from node.service import NodeService
from node.upstream import Outcome, SseRelay, UpstreamUnavailable, VllmBackend
from node.upstream.relay import DONE, read_whole

router = APIRouter()

UPSTREAM_STATE = "upstream"
"""The app state key of the node's VllmBackend (node.api.app.create_app sets it)."""

SAMPLING_KEYS = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
    "response_format",
)
"""What of a request's sampling the audit record keeps (as the engine's record keeps its SamplingParams)."""

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def upstream_of(request: Request) -> VllmBackend:
    backend: VllmBackend = getattr(request.app.state, UPSTREAM_STATE)
    return backend


@router.post("/v1/chat/completions", response_model=None, dependencies=[caller("application")])
async def chat(request: Request) -> Response:
    return await forward(request, path="/v1/chat/completions", prompt_field="messages")


@router.post("/v1/completions", response_model=None, dependencies=[caller("application")])
async def completions(request: Request) -> Response:
    return await forward(request, path="/v1/completions", prompt_field="prompt")


@router.get("/metrics", dependencies=[caller("metrics")])
def metrics(request: Request) -> Response:
    body = upstream_of(request).metrics.render()
    site: CollectorRegistry | None = getattr(request.app.state, SITE_METRICS_STATE, None)
    if site is not None:
        body += generate_latest(site)
    return Response(body, media_type=CONTENT_TYPE)


class _Request:
    """One forwarded request: who asked, for which version, and what it produced."""

    def __init__(self, node: NodeService, backend: VllmBackend, *, actor: str, body: dict[str, Any], prompt: Any):
        self.node, self.backend, self.actor, self.body = node, backend, actor, body
        self.started = time.perf_counter()
        self.version = _resolve(node, body.get("model"))
        self.served = node.host.model_name if self.version is None else self.version
        self.prompt_hmac = node.serving.keys.digest(json.dumps(prompt, sort_keys=True))

    def done(self, outcome: Outcome, *, status: int, finish: str | None = None) -> None:
        """Count, audit and judge one request vLLM took (no awaits: it runs in a cancelled stream too)."""
        m = self.backend.metrics
        elapsed = time.perf_counter() - self.started
        m.requests.labels(self.served, str(status)).inc()
        m.latency.labels(self.served).observe(elapsed)
        if outcome.first_chunk_at is not None:
            m.first_chunk.labels(self.served).observe(outcome.first_chunk_at - self.started)
        m.prompt_tokens.labels(self.served).inc(outcome.prompt_tokens or 0)
        m.generation_tokens.labels(self.served).inc(outcome.completion_tokens or 0)
        failed = status >= 500 or outcome.error is not None
        release = self.node.serving.release
        if release is not None:  # the gray release judges a candidate by its error rate
            release.served(self.version, ok=not failed)
        adapter = self.node.host.adapters.get(self.version) if self.version is not None else None
        self.node.audit.append(
            actor=self.actor,
            action="serve",
            resource=self.served,
            details={
                "prompt_hmac": self.prompt_hmac,
                "response_hmac": self.node.serving.keys.digest(outcome.output()),
                "adapter_sha256": adapter.sha256 if adapter is not None else None,
                "sampling": {k: self.body[k] for k in SAMPLING_KEYS if k in self.body},
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": (
                    outcome.completion_tokens if outcome.completion_tokens is not None else outcome.pieces_seen
                ),
                "finish_reason": finish or ("error" if failed else outcome.finish_reason) or "cancelled",
                "latency_s": round(elapsed, 4),
                "backend": self.backend.name,
                "upstream_id": outcome.upstream_id,
                **({"error": outcome.error} if outcome.error else {}),
            },
        )


async def forward(request: Request, *, path: str, prompt_field: str) -> Response:
    node, backend = node_of(request), upstream_of(request)
    try:
        body = await request.json()  # parsed once, within the guard's size limit (node.api.deps read it too)
    except ValueError:
        body = None
    if not isinstance(body, dict) or prompt_field not in body:
        raise InvalidInput(f"the request body must be a JSON object with '{prompt_field}'")
    req = _Request(node, backend, actor=current_caller(request).actor, body=body, prompt=body[prompt_field])
    stream = body.get("stream") is True
    asked = body.get("stream_options")
    options: dict[str, Any] = asked if isinstance(asked, dict) else {}
    sent = {**body, "model": backend.upstream_model(req.version)}
    if stream:  # the node needs vLLM's token counts; the chunk is dropped unless the client asked for it
        sent["stream_options"] = {**options, "include_usage": True}
    payload = json.dumps(sent).encode()
    try:
        if req.version is not None and not backend.adapters.holds(req.version):
            await asyncio.to_thread(backend.adapters.ensure, req.version)  # blocking HTTP: off the event loop
        resp = await backend.client.open(path, payload)
        if resp.status_code == 404 and req.version is not None:  # vLLM restarted and forgot it: load, once more
            await resp.aclose()
            await asyncio.to_thread(backend.adapters.ensure, req.version, recheck=True)
            resp = await backend.client.open(path, payload)
    except UpstreamUnavailable:
        backend.metrics.up.set(0)
        backend.metrics.requests.labels(req.served, "503").inc()
        raise
    backend.metrics.up.set(1)
    rename = req.served if sent["model"] != req.served else None
    if resp.status_code >= 400:
        return await _refused(req, resp)
    if not stream:
        outcome = Outcome()
        try:
            raw = await resp.aread()
        except httpx.HTTPError as exc:
            req.done(Outcome(error=f"the answer broke off: {type(exc).__name__}"), status=502)
            raise backend.client.unreachable(exc) from exc
        finally:
            await resp.aclose()
        content = read_whole(raw, outcome, rename=rename)
        req.done(outcome, status=resp.status_code)
        return Response(content, status_code=resp.status_code, media_type="application/json")
    relay = SseRelay(strip_usage=not options.get("include_usage"), rename=rename)
    events = _relay(req, resp, relay)
    # Started before the response is: a generator that never ran has no `finally` to close vLLM's answer
    # and write the record, should the client leave before Starlette first iterates it.
    first = await anext(events, None)
    return StreamingResponse(
        _chained(first, events),
        status_code=resp.status_code,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _relay(req: _Request, resp: httpx.Response, relay: SseRelay) -> AsyncGenerator[bytes, None]:
    """vLLM's events as they come. Starlette closes this generator when the client goes away; closing
    vLLM's response then makes vLLM abort the request, and the record says `cancelled`."""
    finish: str | None = None
    recorded = False
    try:
        try:
            async for chunk in resp.aiter_bytes():
                if out := relay.feed(chunk):
                    yield out
            if tail := relay.flush():
                yield tail
            if relay.done:  # the record first, then the end: a client that saw [DONE] finds its record
                recorded = True
                req.done(relay.outcome, status=resp.status_code)
                yield DONE
            elif relay.outcome.error is None:
                relay.outcome.error = "the stream ended without [DONE]"
        except httpx.HTTPError as exc:  # vLLM went away mid-answer: tell the client in the stream, as OpenAI does
            relay.outcome.error = f"the serving backend broke off the answer: {type(exc).__name__}"
            failed = ErrorResponse(error=ErrorDetail(message=relay.outcome.error, type="server_error"))
            yield f"data: {failed.model_dump_json(exclude_none=True)}\n\n".encode()
            finish = "error"
    except (GeneratorExit, asyncio.CancelledError):
        finish = relay.outcome.finish_reason or "cancelled"
        raise
    finally:
        if not recorded:
            req.done(relay.outcome, status=resp.status_code, finish=finish)
        await asyncio.shield(resp.aclose())  # runs to the end even when this task is being cancelled


async def _chained(first: bytes | None, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


async def _refused(req: _Request, resp: httpx.Response) -> Response:
    """vLLM's error answer in OpenAI's shape, with its status; a 5xx is the model's failure (audited)."""
    try:
        raw = await resp.aread()
    finally:
        await resp.aclose()
    status = resp.status_code
    message, param = _error_of(raw, status)
    if status == 404 and req.version is None:  # the base model under another name: the node's settings
        status = 502
        message = (
            f"vLLM serves no model named {req.backend.settings.model!r}: set the node's vllm_model to vLLM's "
            f"--served-model-name ({message})"
        )
        req.backend.metrics.requests.labels(req.served, "404").inc()
    elif status >= 500:
        req.done(Outcome(error=message), status=status)
        message = f"the serving backend failed: {message}"
    else:
        req.backend.metrics.requests.labels(req.served, str(status)).inc()
    code = "model_not_found" if status == 404 else "upstream_misconfigured" if status == 502 else None
    detail = ErrorDetail(message=message, type=_OPENAI_TYPES.get(status, "server_error"), param=param, code=code)
    return Response(ErrorResponse(error=detail).model_dump_json(), status_code=status, media_type="application/json")


def _error_of(raw: bytes, status: int) -> tuple[str, str | None]:
    """vLLM's message (one line) and the parameter it names, from its error body."""
    try:
        error = json.loads(raw)["error"]
        message, param = str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = raw.decode("utf-8", "replace"), None
    line = message.strip().splitlines()[0][:500] if message.strip() else f"HTTP {status}"
    return line, param if isinstance(param, str) else None


def _resolve(node: NodeService, model: object) -> str | None:
    """The version a request's `model` names (None: the base model); default traffic goes where the gray
    release routes it. UnknownModel (404) for one the node does not serve."""
    if model is not None and not isinstance(model, str):
        raise InvalidInput("'model' must be a string")
    release = node.serving.release
    if release is not None and model in (None, "", LATEST_ALIAS):
        model = release.route() or BASE
    name = node.host.resolve(model)
    return None if name == BASE else name
