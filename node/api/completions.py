"""`/v1/chat/completions` and `/v1/completions`, whole or streamed as server-sent events.

Both routes queue the request the same way (`complete`); what differs between chat and text
completions in OpenAI's format is a `Format`, whose per-request `Renderer` shapes the answer (chat:
the reasoning block split off as `reasoning_content`, logprobs as `content` entries; text: the
legacy logprobs shape). A refusal (a parameter the engine does not implement, unknown model, full
queue, prompt too long for the context, a response format it cannot hold) is an error before any
output, so a stream never starts with one; an unknown model is a FedSeekError carrying its 404
`model_not_found`, answered by the app's handler.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
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
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    FinishReason,
    Refusal,
    Sampling,
    TopLogprob,
    Usage,
)
from node.api.protocol import TokenLogprob as OpenAITokenLogprob
from node.api.reasoning import ReasoningSplitter, prompt_opens_block
from node.api.reasoning import split as split_reasoning
from node.service import Serving
from node.serving import Event, QueueFull, TokenLogprob
from node.serving.grammar import TokenTable

router = APIRouter(dependencies=[caller("application")])

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 500, 503)
}
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}

FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}

Head = dict[str, Any]  # id, created, model: what every response and chunk of one request starts with
Logprobs = Sequence[TokenLogprob] | None  # None: the request did not ask for logprobs


class Renderer(Protocol):
    """One request's answer in OpenAI's shape: whole, or as stream chunks."""

    def response(
        self, text: str, logprobs: Logprobs, finish: FinishReason | None, usage: Usage, fingerprint: str
    ) -> BaseModel:
        """The whole answer of a request that did not stream."""

    def delta(self, text: str, logprobs: Logprobs, *, first: bool) -> BaseModel | None:
        """A chunk of new output (None: nothing to send yet); the first chunk is sent even when empty."""

    def flush(self) -> BaseModel | None:
        """Output held back until the end (a partial reasoning tag), if any."""

    def finish(self, finish: FinishReason | None) -> BaseModel:
        """The chunk carrying the finish reason."""

    def usage(self, usage: Usage) -> BaseModel:
        """The last chunk, with no choices, when the request asked for usage."""


class Format(Protocol):
    """Chat or text: the id prefix, and a renderer per request."""

    prefix: str

    def renderer(self, head: Head, *, tokens: TokenTable | None, opened: bool, split: bool) -> Renderer:
        """`tokens` names logprob tokens (None: no logprobs asked); `opened`: the prompt opened a
        reasoning block; `split`: split one off at all (not for a constrained answer)."""


class ChatRenderer:
    def __init__(self, head: Head, *, tokens: TokenTable | None, opened: bool, split: bool) -> None:
        self.head, self.tokens, self.opened = head, tokens, opened
        self.splitter = ReasoningSplitter(opened=opened) if split else None

    def _logprobs(self, logprobs: Logprobs) -> ChoiceLogprobs | None:
        if logprobs is None or self.tokens is None:
            return None
        table = self.tokens

        def top(token: int, logprob: float) -> TopLogprob:
            text, raw = table.text(token)
            return TopLogprob(token=text, logprob=logprob, bytes=list(raw))

        content = [
            OpenAITokenLogprob(**top(lp.token, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
            for lp in logprobs
        ]
        return ChoiceLogprobs(content=content)

    def response(
        self, text: str, logprobs: Logprobs, finish: FinishReason | None, usage: Usage, fingerprint: str
    ) -> ChatCompletionResponse:
        reasoning, content = split_reasoning(text, opened=self.opened) if self.splitter else (None, text)
        message = ChatCompletionMessage(content=content, reasoning_content=reasoning)
        choice = ChatCompletionChoice(message=message, logprobs=self._logprobs(logprobs), finish_reason=finish)
        return ChatCompletionResponse(**self.head, choices=[choice], usage=usage, system_fingerprint=fingerprint)

    def _chunk(self, reasoning: str, content: str, logprobs: Logprobs, *, first: bool) -> ChatCompletionStreamResponse:
        delta = DeltaMessage(
            role="assistant" if first else None,  # the role comes once
            content=content or ("" if first and not reasoning else None),
            reasoning_content=reasoning or None,
        )
        choice = ChatCompletionStreamChoice(delta=delta, logprobs=self._logprobs(logprobs))
        return ChatCompletionStreamResponse(**self.head, choices=[choice])

    def delta(self, text: str, logprobs: Logprobs, *, first: bool) -> ChatCompletionStreamResponse | None:
        reasoning, content = self.splitter.push(text) if self.splitter else ("", text)
        if not (first or reasoning or content or logprobs):
            return None
        return self._chunk(reasoning, content, logprobs, first=first)

    def flush(self) -> ChatCompletionStreamResponse | None:
        reasoning, content = self.splitter.flush() if self.splitter else ("", "")
        return self._chunk(reasoning, content, None, first=False) if reasoning or content else None

    def finish(self, finish: FinishReason | None) -> ChatCompletionStreamResponse:
        choice = ChatCompletionStreamChoice(delta=DeltaMessage(), finish_reason=finish)
        return ChatCompletionStreamResponse(**self.head, choices=[choice])

    def usage(self, usage: Usage) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(**self.head, choices=[], usage=usage)


class ChatFormat:
    prefix = "chatcmpl"

    def renderer(self, head: Head, *, tokens: TokenTable | None, opened: bool, split: bool) -> ChatRenderer:
        return ChatRenderer(head, tokens=tokens, opened=opened, split=split)


class TextRenderer:
    def __init__(self, head: Head, *, tokens: TokenTable | None) -> None:
        self.head, self.tokens = head, tokens
        self.offset = 0  # characters of the completion before the next token (`text_offset`)

    def _logprobs(self, logprobs: Logprobs) -> CompletionLogprobs | None:
        if logprobs is None or self.tokens is None:
            return None
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for lp in logprobs:
            text = self.tokens.text(lp.token)[0]
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            # OpenAI: "the logprob of the sampled token is always returned", so up to logprobs + 1 entries
            out.top_logprobs.append({self.tokens.text(t)[0]: v for t, v in (*lp.top, (lp.token, lp.logprob))})
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out

    def response(
        self, text: str, logprobs: Logprobs, finish: FinishReason | None, usage: Usage, fingerprint: str
    ) -> CompletionResponse:
        choice = CompletionChoice(text=text, logprobs=self._logprobs(logprobs), finish_reason=finish)
        return CompletionResponse(**self.head, choices=[choice], usage=usage, system_fingerprint=fingerprint)

    def delta(self, text: str, logprobs: Logprobs, *, first: bool) -> CompletionStreamResponse | None:
        if not (first or text or logprobs):
            return None
        choice = CompletionChoice(text=text, logprobs=self._logprobs(logprobs))
        return CompletionStreamResponse(**self.head, choices=[choice])

    def flush(self) -> None:
        return None

    def finish(self, finish: FinishReason | None) -> CompletionStreamResponse:
        return CompletionStreamResponse(**self.head, choices=[CompletionChoice(text="", finish_reason=finish)])

    def usage(self, usage: Usage) -> CompletionStreamResponse:
        return CompletionStreamResponse(**self.head, choices=[], usage=usage)


class TextFormat:
    prefix = "cmpl"

    def renderer(self, head: Head, *, tokens: TokenTable | None, opened: bool, split: bool) -> TextRenderer:
        return TextRenderer(head, tokens=tokens)  # legacy completions have no reasoning field


CHAT, TEXT = ChatFormat(), TextFormat()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**STREAMED, **ERRORS})
async def chat(req: ChatCompletionRequest, request: Request) -> BaseModel | Response:
    messages = [m.for_template() for m in req.messages]  # text parts joined; developer -> system
    return await complete(serving_of(request), req, messages, actor=current_caller(request).actor, fmt=CHAT)


@router.post("/v1/completions", response_model=CompletionResponse, responses={**STREAMED, **ERRORS})
async def completions(req: CompletionRequest, request: Request) -> BaseModel | Response:
    return await complete(serving_of(request), req, req.prompt, actor=current_caller(request).actor, fmt=TEXT)


def _usage(ev: Event) -> Usage:
    return Usage.of(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)


def _unsupported(refused: list[Refusal]) -> JSONResponse:
    """400 naming every parameter the engine does not implement (OpenAI's `param` holds the first)."""
    names = ", ".join(f"{r.param} ({r.why})" for r in refused)
    detail = ErrorDetail(
        message=f"unsupported parameters: {names}",
        type="invalid_request_error",
        param=refused[0].param,
        code="unsupported_parameter",
    )
    return JSONResponse(status_code=400, content=ErrorResponse(error=detail).model_dump())


async def complete(
    serving: Serving, req: Sampling, prompt: list[dict[str, str]] | str | list[int], *, actor: str, fmt: Format
) -> BaseModel | Response:
    """Queue the request (refusals become OpenAI errors before any output), then answer or stream it."""
    if refused := req.unsupported():
        return _unsupported(refused)
    receipt: dict[str, str] = {}
    try:
        params = req.params()
        prep = serving.prepare(prompt, req.model)
        # the token table names logprob tokens; built once, about 1 s for a 129k vocabulary: off the loop
        tokens = await asyncio.to_thread(serving.engine.grammars.table) if params.logprobs is not None else None
        events = serving.generate(prep, params, actor=actor, receipt=receipt)
        first = await anext(events)
    except QueueFull as exc:
        return error_response(
            exc.status, f"the server is busy ({exc}); retry later", type_=exc.openai_type, code=exc.code
        )
    except ValueError as exc:  # too long for the context, a bad stop string, a response format (GrammarError)
        code = getattr(exc, "code", None) or ("context_length_exceeded" if "context" in str(exc) else None)
        return error_response(400, str(exc), code=code)
    head: Head = {"id": f"{fmt.prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": prep.served}
    opened = prompt_opens_block(serving.host.tokenizer, prep.prompt_ids)
    render = fmt.renderer(head, tokens=tokens, opened=opened, split=params.constraint is None)
    if req.stream:
        return StreamingResponse(
            _sse(events, first, render, include_usage=req.include_usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    text, last = [first.text], first
    logprobs: list[TokenLogprob] | None = list(first.logprobs) if tokens is not None else None
    async for ev in events:
        text.append(ev.text)
        if logprobs is not None:
            logprobs.extend(ev.logprobs)
        last = ev
    if last.finish_reason == "error":
        return error_response(500, f"generation failed: {last.error}", type_="server_error")
    fingerprint = receipt.get("audit_hash", "")[:16]
    return render.response("".join(text), logprobs, FINISH.get(last.finish_reason), _usage(last), fingerprint)


async def _sse(
    events: AsyncGenerator[Event, None], first: Event, render: Renderer, *, include_usage: bool
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
            if (chunk := render.delta(ev.text, ev.logprobs or None, first=is_first)) is not None:
                yield data(chunk)
                is_first = False
            if finish := FINISH.get(ev.finish_reason) if ev.finish_reason else None:
                if (rest := render.flush()) is not None:
                    yield data(rest)
                yield data(render.finish(finish))
            ev = await anext(events, None)
        if include_usage and last.finish_reason != "error":
            yield data(render.usage(_usage(last)))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
