"""What every request to a node API passes before any route runs: its size, then its caller.

FastAPI reads and parses a request's body BEFORE it runs the route's dependencies, so a check
there comes too late: an unauthenticated client could make the node read, hold and parse a
body of any size (a chunked one has no Content-Length to refuse it by). `RequestGuard` is pure
ASGI and runs first:

1. a declared Content-Length over the route's limit is answered 413;
2. the caller is checked against the route's rule and the site's access policy (node/access.py,
   node/policy.py) from the headers and the TLS peer alone, and refused (401/403, one
   `access.refused` audit record) before a byte of the body is read (the model a body names is
   held to the policy after it is parsed: node.api.deps);
3. the body is counted as it arrives (chunked included): past the limit the request is
   answered 413 and nothing more is read or kept; and it must arrive whole within
   `BODY_TIMEOUT_S` of the route's first read, else 408 (a caller trickling a body a byte at a
   time would hold a connection and a worker for ever: the request head is on
   federation.security.mtls_server's clock, the body was on none).

A request refused with its body unread is answered with `Connection: close`, so the server
drops the rest instead of reading it. Routes read the admitted caller with
node.api.deps.current_caller.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from federation.protocol import wire
from federation.security.refusals import closing, error_response, error_response_for
from node.access import AccessDenied, AccessPolicy, rule_for

MAX_BODY_BYTES = 1024 * 1024
"""The largest body an API route accepts; `/internal/*` routes take up to a whole adapter."""

BODY_TIMEOUT_S = 30.0
"""The most a whole request body may take, from the route's first read. A 1 MiB chat body crosses a
site LAN in milliseconds and the largest adapter (`/internal/*`, 512 MiB) the local socket in about a
second; nginx allows 60 s between two reads, which a trickling client never reaches. An app may lower
it in `app.state.body_timeout_s` (tests)."""

RULE_STATE_KEY = "access_rule"
CALLER_STATE_KEY = "caller"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes its limit. An HTTPException, so FastAPI passes it
    through its body parsing unchanged and the app's handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds {limit} bytes")


class BodyTimeout(HTTPException):
    """Raised from `receive` when a body has not arrived whole in time; answered 408 like BodyTooLarge."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(status_code=408, detail=f"request body not received within {timeout_s:g} s")


def body_limit(path: str) -> int:
    return wire.MAX_ADAPTER_BYTES if path.startswith("/internal/") else MAX_BODY_BYTES


def has_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))


class RequestGuard:
    """Size and caller checks ahead of routing, with the app's AccessPolicy (`app.state.access`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = body_limit(scope["path"])
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await closing(error_response(413, f"request body of {length} bytes exceeds {limit}"))(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        rule = rule_for(scope["path"])
        if rule is not None:
            policy: AccessPolicy = scope["app"].state.access
            try:
                state[CALLER_STATE_KEY] = policy.require(Request(scope), rule)  # a refusal is audited there
            except AccessDenied as exc:
                response = error_response_for(exc)
                await (closing(response) if has_body(headers) else response)(scope, receive, send)
                return
        state[RULE_STATE_KEY] = rule
        timeout_s = float(getattr(scope["app"].state, "body_timeout_s", BODY_TIMEOUT_S))
        body = _Body(receive, limit, timeout_s, done=not has_body(headers))
        await self.app(scope, body.receive, body.sending(send))


class _Body:
    """The request body as the app reads it: counted against `limit`, on a clock of `timeout_s` from
    the first read, and whether it was all read."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float, *, done: bool) -> None:
        self._receive = receive
        self._limit = limit
        self._timeout = timeout_s
        self._deadline: float | None = None
        self._seen = 0
        self._done = done

    async def receive(self) -> Message:
        if self._done:  # past the body: a disconnect, which a streamed answer waits for as long as it runs
            return await self._receive()
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + self._timeout
        try:
            message = await asyncio.wait_for(self._receive(), self._deadline - loop.time())
        except TimeoutError:
            raise BodyTimeout(self._timeout) from None
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                raise BodyTooLarge(self._limit)
            self._done = not message.get("more_body", False)
        return message

    def sending(self, send: Send) -> Send:
        async def sending(message: Message) -> None:
            # A response that starts before the body was all read (a refusal, 413, a route that
            # ignores it) closes the connection: uvicorn would otherwise read and discard the rest.
            if message["type"] == "http.response.start" and not self._done:
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        return sending
