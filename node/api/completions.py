"""`/v1/chat/completions` and `/v1/completions`, whole or streamed as server-sent events.

Both routes queue the request the same way (`complete`); what differs between chat and text
completions in OpenAI's format is a `Format`. A refusal (unknown model, full queue, prompt too
long for the context) is an error before any output, so a stream never starts with one; an
unknown model is a FedSeekError carrying its 404 `model_not_found`, answered by the app's handler.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from federation.security.refusals import ErrorDetail, ErrorResponse, error_response
from node.api.deps import caller, current_caller, serving_of
from node.api.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    FinishReason,
    Sampling,
    Usage,
)
from node.service import Serving
from node.serving import Event, QueueFull

router = APIRouter(dependencies=[caller("application")])

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 500, 503)
}
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}

FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}

Head = dict[str, Any]  # id, created, model: what every response and chunk of one request starts with


class Format(Protocol):
    """Chat or text: the id prefix, the whole response and the stream chunks in OpenAI's shape."""

    prefix: str

    def response(self, head: Head, text: str, finish: FinishReason | None, usage: Usage, fingerprint: str) -> BaseModel:
        """The whole answer of a request that did not stream."""

    def delta(self, head: Head, text: str, *, first: bool) -> BaseModel:
        """A chunk of new text; the first chunk of a stream is sent even when it has none."""

    def finish(self, head: Head, finish: FinishReason | None) -> BaseModel:
        """The chunk carrying the finish reason."""

    def usage(self, head: Head, usage: Usage) -> BaseModel:
        """The last chunk, with no choices, when the request asked for usage."""


class ChatFormat:
    prefix = "chatcmpl"

    def response(
        self, head: Head, text: str, finish: FinishReason | None, usage: Usage, fingerprint: str
    ) -> ChatCompletionResponse:
        choice = ChatCompletionChoice(message=ChatCompletionMessage(content=text), finish_reason=finish)
        return ChatCompletionResponse(**head, choices=[choice], usage=usage, system_fingerprint=fingerprint)

    def delta(self, head: Head, text: str, *, first: bool) -> ChatCompletionStreamResponse:
        delta = DeltaMessage(role="assistant" if first else None, content=text)  # the role comes once
        return ChatCompletionStreamResponse(**head, choices=[ChatCompletionStreamChoice(delta=delta)])

    def finish(self, head: Head, finish: FinishReason | None) -> ChatCompletionStreamResponse:
        choice = ChatCompletionStreamChoice(delta=DeltaMessage(), finish_reason=finish)
        return ChatCompletionStreamResponse(**head, choices=[choice])

    def usage(self, head: Head, usage: Usage) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(**head, choices=[], usage=usage)


class TextFormat:
    prefix = "cmpl"

    def response(
        self, head: Head, text: str, finish: FinishReason | None, usage: Usage, fingerprint: str
    ) -> CompletionResponse:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return CompletionResponse(**head, choices=[choice], usage=usage, system_fingerprint=fingerprint)

    def delta(self, head: Head, text: str, *, first: bool) -> CompletionStreamResponse:
        return CompletionStreamResponse(**head, choices=[CompletionChoice(text=text)])

    def finish(self, head: Head, finish: FinishReason | None) -> CompletionStreamResponse:
        return CompletionStreamResponse(**head, choices=[CompletionChoice(text="", finish_reason=finish)])

    def usage(self, head: Head, usage: Usage) -> CompletionStreamResponse:
        return CompletionStreamResponse(**head, choices=[], usage=usage)


CHAT, TEXT = ChatFormat(), TextFormat()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**STREAMED, **ERRORS})
async def chat(req: ChatCompletionRequest, request: Request) -> BaseModel | Response:
    messages = [m.model_dump() for m in req.messages]
    return await complete(serving_of(request), req, messages, actor=current_caller(request).actor, fmt=CHAT)


@router.post("/v1/completions", response_model=CompletionResponse, responses={**STREAMED, **ERRORS})
async def completions(req: CompletionRequest, request: Request) -> BaseModel | Response:
    return await complete(serving_of(request), req, req.prompt, actor=current_caller(request).actor, fmt=TEXT)


def _usage(ev: Event) -> Usage:
    return Usage.of(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)


async def complete(
    serving: Serving, req: Sampling, prompt: list[dict[str, str]] | str | list[int], *, actor: str, fmt: Format
) -> BaseModel | Response:
    """Queue the request (refusals become OpenAI errors before any output), then answer or stream it."""
    receipt: dict[str, str] = {}
    try:
        prep = serving.prepare(prompt, req.model)
        events = serving.generate(prep, req.params(), actor=actor, receipt=receipt)
        first = await anext(events)
    except QueueFull as exc:
        return error_response(
            exc.status, f"the server is busy ({exc}); retry later", type_=exc.openai_type, code=exc.code
        )
    except ValueError as exc:
        return error_response(400, str(exc), code="context_length_exceeded" if "context" in str(exc) else None)
    head: Head = {"id": f"{fmt.prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": prep.served}
    if req.stream:
        return StreamingResponse(
            _sse(events, first, head, fmt, include_usage=req.include_usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    text, last = [first.text], first
    async for ev in events:
        text.append(ev.text)
        last = ev
    if last.finish_reason == "error":
        return error_response(500, f"generation failed: {last.error}", type_="server_error")
    fingerprint = receipt.get("audit_hash", "")[:16]
    return fmt.response(head, "".join(text), FINISH.get(last.finish_reason), _usage(last), fingerprint)


async def _sse(
    events: AsyncGenerator[Event, None], first: Event, head: Head, fmt: Format, *, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent chunks as OpenAI sends them: the role first, text deltas, the finish reason, usage, [DONE].

    Starlette cancels this generator when the client disconnects; closing `events` then cancels
    the request in the engine, so its slot is free at once.
    """

    def data(chunk: BaseModel) -> str:
        # every chunk carries `usage` (null until the last) only when the request asked for it
        return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"

    try:
        ev: Event | None = first
        is_first = True
        last = first
        while ev is not None:
            last = ev
            if ev.finish_reason == "error":
                failed = ErrorResponse(error=ErrorDetail(message=str(ev.error), type="server_error"))
                yield f"data: {failed.model_dump_json(exclude_none=True)}\n\n"  # message and type, as OpenAI's
                break
            if ev.text or is_first:
                yield data(fmt.delta(head, ev.text, first=is_first))
                is_first = False
            if finish := FINISH.get(ev.finish_reason) if ev.finish_reason else None:
                yield data(fmt.finish(head, finish))
            ev = await anext(events, None)
        if include_usage and last.finish_reason != "error":
            yield data(fmt.usage(head, _usage(last)))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
