"""Role checks shared by every party's HTTPS routes (node and coordinator alike).

The TLS layer (federation.security.mtls_server) proves who the peer is; these helpers decide whether
that role may call a route, with one wording for 401 (no certificate) and 403 (wrong role).
A refusal is an `AccessDenied`, which federation.security.refusals logs, audits and answers.
"""

from __future__ import annotations

from federation.errors import FedSeekError, Forbidden, Unauthenticated
from federation.security.pki import Identity, Role


class AccessDenied(FedSeekError):
    """A caller turned away by a route's access rule; the message names what is needed.

    Raise one of its two kinds. The base exists so that the access check can audit exactly
    its own refusals (`except AccessDenied`), apart from every other 401/403 in the code.
    """


class NotAuthenticated(AccessDenied, Unauthenticated):
    """401: no credential, or one that does not verify (API key, agent token, certificate)."""


class NotPermitted(AccessDenied, Forbidden):
    """403: a valid credential of the wrong kind for the route."""


def require_role(identity: Identity | None, role: Role) -> Identity:
    if identity is None:
        raise NotAuthenticated(f"this route needs a client certificate with role '{role}'")
    if identity.role != role:
        raise NotPermitted(f"role '{identity.role}' may not call this route; it needs role '{role}'")
    return identity
