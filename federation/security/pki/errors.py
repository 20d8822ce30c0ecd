"""The one error the PKI raises on purpose."""

from __future__ import annotations

from federation.errors import FedSeekError

__all__ = ["PKIError"]


class PKIError(FedSeekError, RuntimeError):
    """A PKI operation failed; the message is meant for operators, not code.

    A `FedSeekError`, so the CLI prints it as one line and exits with `exit_code` (2);
    still a `RuntimeError`, so callers written before that family existed catch it as before.
    """
