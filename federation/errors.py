"""One exception family for all of FedSeek.

Every error FedSeek raises on purpose is a `FedSeekError`: its message is one line an operator
can act on, and the class says how it leaves the process:
- the CLI (`federation/cli/main.py`, one `except FedSeekError`) prints `fedseek: error: <message>`
  and exits with `exit_code`;
- an HTTP API answers `http_status` with OpenAI's error body (`type` = `openai_type`, `code` =
  the instance's `code`), through `federation.security.refusals.error_response`.

The kinds below name what went wrong for the caller (bad input, no credentials, not found,
conflict, busy, unavailable); each module's own error subclasses the kind that fits and, where
callers already catch a builtin (`ValueError`, `LookupError`), that builtin too, so behaviour
stays as it was. This module imports nothing of FedSeek: every layer may use it.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "KINDS",
    "Busy",
    "Conflict",
    "FedSeekError",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "Unauthenticated",
    "Unavailable",
    "kind_for_status",
]


class FedSeekError(Exception):
    """Base of every deliberate FedSeek error: a one-line operator message, an exit code, an HTTP status.

    Subclassed directly, it is the kind for a failure on FedSeek's side that the caller cannot fix
    (a damaged audit trail, a model that returned NaN): 500, `server_error`.
    """

    exit_code: ClassVar[int] = 2
    http_status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init_subclass__(cls, *, http_status: int | None = None, openai_type: str | None = None, **kw: object) -> None:
        """A kind says how it answers in its class line (`class Busy(FedSeekError, http_status=429, ...)`),
        where the reader looks for it; a subclass that names neither answers as its kind does."""
        super().__init_subclass__(**kw)
        if http_status is not None:
            cls.http_status = http_status
        if openai_type is not None:
            cls.openai_type = openai_type

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code if code is not None else self.default_code

    @property
    def status(self) -> int:
        """The HTTP status this error answers with (an instance may override the class's)."""
        return self.http_status

    def one_line(self) -> str:
        """The operator message: the first line, or the class name when there is none."""
        text = str(self)
        return text.splitlines()[0] if text.strip() else type(self).__name__


class InvalidInput(FedSeekError, http_status=400, openai_type="invalid_request_error"):
    """The caller sent something malformed, oversized or out of range."""


class Unauthenticated(FedSeekError, http_status=401, openai_type="authentication_error"):
    """No credential, or one that does not verify."""


class Forbidden(FedSeekError, http_status=403, openai_type="permission_error"):
    """A valid credential of the wrong kind for what it asks."""


class NotFound(FedSeekError, LookupError, http_status=404, openai_type="invalid_request_error"):
    """What the caller names does not exist."""


class Conflict(FedSeekError, http_status=409, openai_type="invalid_request_error"):
    """The request is well formed but the state refuses it: a spent budget, a broken ledger."""


class Busy(FedSeekError, http_status=429, openai_type="rate_limit_error"):
    """A bounded queue is full; the caller should retry later."""


class Unavailable(FedSeekError, http_status=503, openai_type="service_unavailable"):
    """The service cannot answer yet or any more: loading, a child process down."""


KINDS: tuple[type[FedSeekError], ...] = (
    InvalidInput,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    Busy,
    Unavailable,
)
"""Every kind below the base, one per HTTP status."""


def kind_for_status(status: int) -> type[FedSeekError]:
    """The kind that answers `status`, so a client can raise a FedSeek server's refusal as what it is.

    A status no kind answers (500, or anything foreign) is a plain `FedSeekError`.
    """
    return next((kind for kind in KINDS if kind.http_status == status), FedSeekError)
