"""Who may call which node route, decided in one place.

| routes                         | caller                                                  |
| ------------------------------ | ------------------------------------------------------- |
| `/v1/explanations*`            | a `reviewer` certificate (regulators, clinical review)  |
| `/v1/admin/*`                  | an `admin` certificate                                  |
| `/internal/*`                  | this site's own `node` certificate AND the agent token  |
| any other path (OpenAI, `/metrics`) | an API key, or any consortium certificate (`openai_auth`) |
| `/healthz`                     | anyone who completed the TLS handshake                  |

`rule_for` reads this table by path, so the caller is decided from the headers and the TLS peer
before the body is read (node.api.guard.RequestGuard); each route also names its rule, and a
route whose rule differs from the table's is refused (node.api.deps.caller). An unknown path is
an OpenAI path: without credentials it is 401, whether or not it exists.

Certificates are verified by the TLS layer (federation.security.mtls_server); here only their role and
name are read. Every refusal is logged and written to the audit trail
(federation.security.refusals.audit_refusal, as the coordinator's admin API does).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from federation.security.mtls_server import peer_of
from federation.security.pki import Identity, Role
from federation.security.refusals import audit_refusal
from federation.security.roles import AccessDenied, NotAuthenticated, NotPermitted, require_role
from node.api_keys import ApiKeys
from privacy.audit import AuditTrail

log = logging.getLogger("fedseek.node.access")

__all__ = ["AccessDenied", "AccessPolicy", "Caller", "Rule", "rule_for"]

Rule = Literal["reviewer", "admin", "self", "application"]

OPEN_PATHS = frozenset({"/healthz"})
PREFIX_RULES: tuple[tuple[str, Rule], ...] = (
    ("/v1/explanations/", "reviewer"),
    ("/v1/admin/", "admin"),
    ("/internal/", "self"),
)


def rule_for(path: str) -> Rule | None:
    """The rule a request path falls under; None for the open paths (`/healthz`)."""
    if path in OPEN_PATHS:
        return None
    if path == "/v1/explanations":
        return "reviewer"
    for prefix, rule in PREFIX_RULES:
        if path.startswith(prefix):
            return rule
    return "application"


OpenAIAuth = Literal["api_key", "mtls"]
PeerFn = Callable[[Request], Identity | None]


@dataclass(frozen=True)
class Caller:
    actor: str  # the name written to the audit trail
    identity: Identity | None = None


class AccessPolicy:
    def __init__(
        self,
        *,
        site: str,
        audit: AuditTrail,
        api_keys: ApiKeys,
        agent_token: str,
        openai_auth: OpenAIAuth = "api_key",
        peer: PeerFn = peer_of,
    ) -> None:
        if openai_auth not in ("api_key", "mtls"):
            raise ValueError(f"openai_auth must be 'api_key' or 'mtls', got {openai_auth!r}")
        self.site = site
        self.audit = audit
        self.api_keys = api_keys
        self.agent_token = agent_token
        self.openai_auth = openai_auth
        self.peer = peer

    def require(self, request: Request, rule: Rule) -> Caller:
        """The caller, or AccessDenied after logging and auditing the refusal."""
        identity = self.peer(request)
        try:
            return self._decide(request, rule, identity)
        except AccessDenied as exc:
            audit_refusal(request, exc, identity=identity, audit=self.audit, log=log)
            raise

    def _decide(self, request: Request, rule: Rule, identity: Identity | None) -> Caller:
        if rule == "application":
            return self._application(request, identity)
        wanted: Role = {"reviewer": "reviewer", "admin": "admin", "self": "node"}[rule]  # type: ignore[assignment]
        identity = require_role(identity, wanted)
        if rule == "self":
            if identity.name != self.site:
                raise NotPermitted(f"only this site's own node ({self.site}) may call internal routes")
            if not hmac.compare_digest(_bearer(request), self.agent_token):
                raise NotAuthenticated("missing or wrong agent token")
        return Caller(actor=identity.name, identity=identity)

    def _application(self, request: Request, identity: Identity | None) -> Caller:
        if self.openai_auth == "mtls":
            if identity is None:
                raise NotAuthenticated("this site requires a consortium client certificate for the API")
            return Caller(actor=identity.name, identity=identity)
        key = _bearer(request)
        if not key:
            raise NotAuthenticated("missing API key: send 'Authorization: Bearer <key>'")
        kid = self.api_keys.verify(key)
        if kid is None:
            raise NotAuthenticated("invalid API key")
        return Caller(actor=kid, identity=identity)


def _bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""
