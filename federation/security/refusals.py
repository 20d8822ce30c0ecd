"""How every FedSeek HTTP API says no: OpenAI's error body, the audit record of a refused caller,
and the exception handlers that turn errors into those bodies.

One error shape for the node's OpenAI API, its explanation/admin/internal routes and the
coordinator's admin API, so a client parses one format (`{"error": {"message", "type", "param",
"code"}}`); and one `access.refused` record, so an auditor reads refusals of every party alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from federation.errors import FedSeekError
from federation.security.pki import Identity
from federation.security.roles import AccessDenied

__all__ = [
    "AuditSink",
    "ErrorDetail",
    "ErrorResponse",
    "audit_refusal",
    "client_address",
    "closing",
    "error_body",
    "error_response",
    "error_response_for",
    "install_error_handlers",
]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every FedSeek HTTP API answers with."""

    error: ErrorDetail


def error_body(message: str, *, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, code=code)).model_dump()


def error_response(
    status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, type_=type_, code=code))


def closing(response: JSONResponse) -> JSONResponse:
    """`response` with `Connection: close`: a refusal sent before the body was read drops the rest of it
    with the connection instead of the server reading and discarding it."""
    response.headers["connection"] = "close"
    return response


def error_response_for(exc: FedSeekError) -> JSONResponse:
    """The answer a FedSeekError carries: its status, OpenAI type and code."""
    return error_response(exc.status, exc.one_line(), type_=exc.openai_type, code=exc.code)


class AuditSink(Protocol):
    """What a refusal is written to (privacy.audit.AuditTrail; a layer above, hence not imported)."""

    def append(
        self, *, actor: str, action: str, resource: str = "", details: Mapping[str, Any] | None = None
    ) -> object: ...


def client_address(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def audit_refusal(
    request: Request, exc: AccessDenied, *, identity: Identity | None, audit: AuditSink, log: logging.Logger
) -> None:
    """Log and audit one refused request: an `access.refused` record naming who, what and why.

    The actor is the certificate's name, or the client's address when none was presented.
    """
    address = client_address(request)
    who = f"{identity.name} ({identity.role})" if identity else address
    reason = exc.one_line()  # the very message the caller gets (error_response_for)
    log.warning("refused %s %s from %s: %s", request.method, request.url.path, who, reason)
    audit.append(
        actor=identity.name if identity else address,
        action="access.refused",
        resource=request.url.path,
        details={"status": exc.status, "reason": reason, "role": identity.role if identity else None},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer FedSeekError (AccessDenied included), invalid requests and Starlette's own refusals
    (an unparsable body, an unknown route) with OpenAI's error body."""

    @app.exception_handler(FedSeekError)
    async def _fedseek(_: Request, exc: FedSeekError) -> JSONResponse:
        return error_response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"{where}: {first['msg']}" if where else str(first["msg"]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_=type_)
