"""Role checks shared by every party's HTTPS routes (node and coordinator alike).

The TLS layer (federation.security.mtls_server) proves who the peer is; these helpers decide whether
that role may call a route, with one wording for 401 (no certificate) and 403 (wrong role).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from federation.security.pki import Identity, Role


class AccessDenied(Exception):
    """401 (no credentials) or 403 (credentials of the wrong kind); the message names what is needed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def kind(self) -> str:
        """OpenAI's error type for this status."""
        return "authentication_error" if self.status == 401 else "permission_error"


def require_role(identity: Identity | None, role: Role) -> Identity:
    if identity is None:
        raise AccessDenied(401, f"this route needs a client certificate with role '{role}'")
    if identity.role != role:
        raise AccessDenied(403, f"role '{identity.role}' may not call this route; it needs role '{role}'")
    return identity


def openai_error(
    status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    """An error in OpenAI's shape, which every FedSeek HTTP API uses (clients parse one format)."""
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": type_, "param": None, "code": code}}
    )
