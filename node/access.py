"""Who may call which node route and model, decided in one place.

Each request path falls under a rule (`rule_for`), which says which credential is asked for:

| routes                              | rule          | credential                                        |
| ----------------------------------- | ------------- | ------------------------------------------------- |
| `/v1/explanations*`                 | `reviewer`    | a consortium certificate (or an API key)          |
| `/v1/admin/*`                       | `admin`       | a consortium certificate                          |
| `/internal/*`                       | `self`        | this site's own `node` certificate AND the agent token |
| `/metrics`                          | `metrics`     | an API key (if one is sent), else a certificate   |
| any other path (OpenAI)             | `application` | an API key, or a certificate (`openai_auth = "mtls"`) |
| `/healthz`                          | (open)        | anyone who completed the TLS handshake            |

Whether that credential may call the route, and the model a request names, is the site's access
policy (node/policy.py: a per-site file evaluated by casbin, deny by default): by certificate
name, role and organisation, or by API key id; a key is also held to its own scopes
(node/api_keys.py). `/internal/*` is not the policy's: only the site's own node with the agent
token, checked here. An unknown path needs a valid credential and then answers 404. A `monitor`
certificate (a metrics scraper: Prometheus) may call `/metrics` and nothing else, whatever the
policy says; the policy decides which monitors (the default: this site's organisation's, listed
with a `g` line).

`rule_for` and `route_of` read the path alone, so the caller is decided from the headers and the
TLS peer before the body is read (node.api.guard.RequestGuard); the model, which is in the body,
is checked once FastAPI has parsed it (node.api.deps). Each route also names its rule, and a route
whose rule differs from the table's is refused (node.api.deps.caller).

Certificates are verified by the TLS layer (federation.security.mtls_server); here only their name
and role are read. Every refusal is logged and written to the audit trail
(federation.security.refusals.audit_refusal, as the coordinator's admin API does).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from fastapi import Request

from federation.security.mtls_server import peer_of
from federation.security.pki import Identity
from federation.security.refusals import audit_refusal
from federation.security.roles import AccessDenied, NotAuthenticated, NotPermitted, require_role
from node.api_keys import ApiKeys, KeyRecord
from node.policy import SitePolicy, Subject
from privacy.audit import AuditTrail

log = logging.getLogger("fedseek.node.access")

__all__ = ["SCOPE_OF", "AccessDenied", "AccessPolicy", "Caller", "Rule", "route_of", "rule_for"]

Rule = Literal["reviewer", "admin", "self", "metrics", "application"]

OPEN_PATHS = frozenset({"/healthz"})
PREFIX_RULES: tuple[tuple[str, Rule], ...] = (
    ("/v1/explanations/", "reviewer"),
    ("/v1/admin/", "admin"),
    ("/internal/", "self"),
)
ROUTE_OF_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/metrics": "metrics",
    "/v1/explanations": "explanations",
}
SCOPE_OF = {"chat": "chat", "completions": "chat", "models": "models", "metrics": "metrics", "explanations": "explain"}
"""The API key scope each route family needs (node/api_keys.py); `admin` needs a certificate."""


def rule_for(path: str) -> Rule | None:
    """The rule a request path falls under; None for the open paths (`/healthz`)."""
    if path in OPEN_PATHS:
        return None
    if path == "/metrics":
        return "metrics"
    if path == "/v1/explanations":
        return "reviewer"
    for prefix, rule in PREFIX_RULES:
        if path.startswith(prefix):
            return rule
    return "application"


def route_of(path: str) -> str | None:
    """The route family the access policy names a path by (node.policy.ROUTES); None for paths
    it does not govern (`/internal/*`, `/healthz`, unknown paths)."""
    if path in ROUTE_OF_PATH:
        return ROUTE_OF_PATH[path]
    if path.startswith("/v1/explanations/"):
        return "explanations"
    if path.startswith("/v1/admin/"):
        return "admin"
    return None


OpenAIAuth = Literal["api_key", "mtls"]
PeerFn = Callable[[Request], Identity | None]


@dataclass(frozen=True)
class Caller:
    actor: str  # the name written to the audit trail
    identity: Identity | None = None
    subject: Subject | None = None  # whom the site policy decided on (None on /internal)
    scopes: tuple[str, ...] = ()  # an API key's scopes


def _who(subject: Subject) -> str:
    return subject.name if subject.kind == "key" else f"{subject.name} ({subject.role})"


class AccessPolicy:
    def __init__(
        self,
        *,
        site: str,
        audit: AuditTrail,
        api_keys: ApiKeys,
        agent_token: str,
        policy: SitePolicy,
        openai_auth: OpenAIAuth = "api_key",
        peer: PeerFn = peer_of,
    ) -> None:
        if openai_auth not in ("api_key", "mtls"):
            raise ValueError(f"openai_auth must be 'api_key' or 'mtls', got {openai_auth!r}")
        self.site = site
        self.audit = audit
        self.api_keys = api_keys
        self.agent_token = agent_token
        self.policy = policy
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

    def require_model(self, request: Request, caller: Caller, model: str) -> None:
        """The second decision, once the body named `model`: AccessDenied (audited) unless the site
        policy allows the caller that model on this route."""
        route = route_of(request.url.path)
        if caller.subject is None or route is None or self.policy.allows(caller.subject, route, model):
            return
        shown = model if len(model) <= 64 else model[:61] + "..."
        exc = NotPermitted(f"the site's access policy does not allow {_who(caller.subject)} model {shown!r} on {route}")
        audit_refusal(request, exc, identity=caller.identity, audit=self.audit, log=log)
        raise exc

    def may_use(self, caller: Caller, model: str) -> bool:
        """Whether the site policy lets `caller` generate with `model` on any route (chat or completions):
        what `/v1/models` lists to it, so a listed model is one it may call and a denied one stays unnamed."""
        if caller.subject is None:
            return True
        return any(self.policy.allows(caller.subject, route, model) for route in ("chat", "completions"))

    def _decide(self, request: Request, rule: Rule, identity: Identity | None) -> Caller:
        if rule == "self":
            identity = require_role(identity, "node")
            if identity.name != self.site:
                raise NotPermitted(f"only this site's own node ({self.site}) may call internal routes")
            if not hmac.compare_digest(_bearer(request), self.agent_token):
                raise NotAuthenticated("missing or wrong agent token")
            return Caller(actor=identity.name, identity=identity)
        caller = self._authenticate(request, rule, identity)
        route = route_of(request.url.path)
        if route is None or caller.subject is None:
            return caller  # no route there: a credential was enough to be told 404
        subject = caller.subject
        if subject.kind == "cert" and subject.role == "monitor" and route != "metrics":
            raise NotPermitted("a monitor certificate may read /metrics only")
        if subject.kind == "key":
            scope = SCOPE_OF.get(route)
            if scope is None:
                raise NotPermitted(f"API keys may not call {route} routes; they need a consortium certificate")
            if scope not in caller.scopes:
                raise NotPermitted(f"API key {subject.name} lacks the '{scope}' scope for {route}")
        if not self.policy.allows(subject, route):
            raise NotPermitted(f"the site's access policy does not allow {_who(subject)} on {route}")
        return caller

    def _authenticate(self, request: Request, rule: Rule, identity: Identity | None) -> Caller:
        """Who the request comes from (401 without a valid credential of the kind `rule` asks for).

        Reviewer and admin routes take a certificate; an API key stands in on the explanation
        routes only, and only a key with the `explain` scope (the site policy must allow it too).
        """
        if rule == "metrics" and identity is not None and not _bearer(request):
            return _cert_caller(identity)  # Prometheus over mTLS; a key, when sent, is what the caller chose
        if rule == "application" and self.openai_auth == "mtls":
            if identity is None:
                raise NotAuthenticated("this site requires a consortium client certificate for the API")
            return _cert_caller(identity)
        if rule in ("reviewer", "admin"):
            if identity is not None:
                return _cert_caller(identity)
            record = self.api_keys.lookup(_bearer(request)) if rule == "reviewer" and _bearer(request) else None
            if record is None or "explain" not in record.scopes:
                raise NotAuthenticated(f"this route needs a client certificate with role '{rule}'")
            return self._key_caller(record, identity)
        key = _bearer(request)
        if not key:
            raise NotAuthenticated("missing API key: send 'Authorization: Bearer <key>'")
        record = self.api_keys.lookup(key)
        if record is None:
            raise NotAuthenticated("invalid API key")
        return self._key_caller(record, identity)

    @staticmethod
    def _key_caller(record: KeyRecord, identity: Identity | None) -> Caller:
        refusal = record.refusal(datetime.now(UTC))
        if refusal is not None:
            raise NotAuthenticated(refusal)
        return Caller(
            actor=record.id, identity=identity, subject=Subject("key", record.id, "key"), scopes=record.scopes
        )


def _cert_caller(identity: Identity) -> Caller:
    return Caller(actor=identity.name, identity=identity, subject=Subject("cert", identity.name, identity.role))


def _bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""
