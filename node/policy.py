"""A site's access policy: which certificates and API keys may call which routes and models.

The policy is a file in the site's state directory (`NodeLayout.access_policy`), written with a
safe default on first start (`default_policy`), and evaluated by casbin, a maintained policy
engine, deny by default: a request is allowed only if some `allow` line matches it and no `deny`
line does. The file is casbin's CSV policy format:

    p, KIND, NAME, ROLE, ORG, ROUTE, MODEL, EFFECT
    g, NAME, ORG

- KIND: `cert` (a consortium certificate the TLS layer verified) or `key` (an API key);
- NAME: the certificate's name (CN) or the key's id (`key-<12 hex>`), or `*`;
- ROLE: the certificate's role (`node`, `reviewer`, `admin`, `coordinator`, `monitor`), `key` for keys,
  or `*` (a `monitor` certificate may read `metrics` only, whatever a line allows: node/access.py);
- ORG: an organisation, or `*`. Consortium certificates name their consortium (O), not their
  hospital, so the site says who belongs to which organisation with `g, NAME, ORG` lines; the
  party whose name IS the organisation's belongs to it too (site `site-a`'s own node is in `site-a`);
- ROUTE: a route family (`ROUTES`) or `*`; MODEL: a model name, `*` matching any part (keyMatch);
- EFFECT: `allow` or `deny`; a deny wins.

A request is decided twice: by the request guard before the body is read (the model is not known
yet: allow lines of any model admit the route, deny lines apply only when they name every model),
then, for a request naming a model, with that model (node.api.deps).

The file is re-read when it changes, without a restart: its stat is checked at every decision
(about a microsecond) and every `WATCH_S` by the node's watcher thread, and a change applies once
the file has stayed unchanged for `SETTLE_S` (0.2 s: an editor's in-place rewrite is never read
half-done), so within about 0.3 s of the edit; each change is audited (`policy.changed`,
old and new sha256). A malformed file is refused: the last good policy stays in force and the
refusal is logged and audited once per content (`policy.invalid`); it never opens access.
`/internal/*` (the site's own node and agent token) and `/healthz` are not governed by this file.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import casbin

from federation.errors import InvalidInput
from federation.ops.atomic import private_dir, write_atomic
from federation.ops.layout import NodeLayout
from federation.security.pki.identity import NAME_RE, ROLES
from federation.security.refusals import AuditSink

__all__ = [
    "KEY_ID_RE",
    "ROUTES",
    "PolicyFileError",
    "SitePolicy",
    "Subject",
    "add_members",
    "default_policy",
    "ensure_policy",
    "parse_policy",
    "site_policy",
]

log = logging.getLogger("fedseek.node.policy")

ROUTES = ("chat", "completions", "models", "metrics", "explanations", "admin")
"""The route families a policy line may name (node.access.route_of maps paths to them)."""
KEY_ID_RE = re.compile(r"^key-[0-9a-f]{12}$")
KINDS = ("cert", "key")
EFFECTS = ("allow", "deny")
MODEL_RE = re.compile(r"^[A-Za-z0-9._:/*@+-]{1,256}$")

# The casbin model: request attributes, policy columns, the deny-wins effect and the matcher.
# `r.model == ""` is the guard's first pass (model not read yet): allow lines of any model admit
# the route, deny lines only when they name every model (`*`).
MODEL_TEXT = """
[request_definition]
r = kind, name, role, route, model

[policy_definition]
p = kind, name, role, org, route, model, eft

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = r.kind == p.kind && (p.name == "*" || r.name == p.name) && (p.role == "*" || r.role == p.role) \
&& (p.org == "*" || g(r.name, p.org)) && (p.route == "*" || r.route == p.route) \
&& ((r.model == "" && (p.eft == "allow" || p.model == "*")) || (r.model != "" && keyMatch(r.model, p.model)))
"""


class PolicyFileError(InvalidInput):
    """The policy file cannot be read or is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Subject:
    """Who a request comes from, as the policy sees it: a certificate or an API key."""

    kind: str  # "cert" or "key"
    name: str  # the certificate's CN or the key's id
    role: str  # the certificate's role, or "key"


@dataclass(frozen=True)
class Rules:
    """A parsed policy: its `p` and `g` lines (as casbin takes them) and the text's sha256."""

    policies: tuple[tuple[str, ...], ...]
    groupings: tuple[tuple[str, str], ...]
    sha256: str


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise PolicyFileError(f"{where}: {message}")


def _check_p(fields: list[str], where: str) -> tuple[str, ...]:
    _check(len(fields) == 7, where, f"a p line has 7 fields after 'p', got {len(fields)}")
    kind, name, role, org, route, model, eft = fields
    _check(kind in KINDS, where, f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "cert":
        _check(name == "*" or bool(NAME_RE.match(name)), where, f"{name!r} is not a party name or *")
        _check(role == "*" or role in ROLES, where, f"role {role!r} is not one of {', '.join(sorted(ROLES))} or *")
    else:
        _check(name == "*" or bool(KEY_ID_RE.match(name)), where, f"{name!r} is not a key id (key-<12 hex>) or *")
        _check(role in ("*", "key"), where, f"an API key's role is 'key' or *, not {role!r}")
    _check(org == "*" or bool(NAME_RE.match(org)), where, f"organisation {org!r} is not a valid name or *")
    _check(route == "*" or route in ROUTES, where, f"route {route!r} is not one of {', '.join(ROUTES)} or *")
    _check(bool(MODEL_RE.match(model)), where, f"model pattern {model!r} is not a model name or * pattern")
    _check(eft in EFFECTS, where, f"effect {eft!r} is not allow or deny")
    return tuple(fields)


def parse_policy(text: str, *, source: str) -> Rules:
    """The rules of a policy file's text; PolicyFileError names the first bad line."""
    policies: list[tuple[str, ...]] = []
    groupings: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source} line {number}"
        try:
            fields = [f.strip() for f in next(csv.reader(io.StringIO(stripped), skipinitialspace=True))]
        except csv.Error as exc:
            raise PolicyFileError(f"{where}: {exc}") from exc
        kind, rest = fields[0], fields[1:]
        if kind == "p":
            policies.append(_check_p(rest, where))
        elif kind == "g":
            _check(len(rest) == 2, where, f"a g line is 'g, NAME, ORG', got {len(rest)} fields after 'g'")
            _check(all(NAME_RE.match(x) for x in rest), where, f"{rest} are not valid party/organisation names")
            groupings.append((rest[0], rest[1]))
        else:
            raise PolicyFileError(f"{where}: a line starts with 'p' or 'g', not {kind!r}")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Rules(tuple(policies), tuple(groupings), digest)


MAX_MODEL_LEN = 256
"""A longer model name (the request's own, unchecked yet) is refused without evaluating or caching it."""
CACHE_SIZE = 4096


class Decisions:
    """One policy's casbin enforcer, with its decisions cached: a decision depends only on the
    policy and the request's five attributes, and casbin evaluates the matcher once per line
    (hundreds of microseconds for the default policy on a loaded CPU; bench/access_policy.py)."""

    def __init__(self, rules: Rules) -> None:
        enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=MODEL_TEXT))
        if rules.policies:
            enforcer.add_policies([list(p) for p in rules.policies])
        if rules.groupings:
            enforcer.add_grouping_policies([list(g) for g in rules.groupings])
        self.enforcer: Any = enforcer
        self.decide = functools.lru_cache(maxsize=CACHE_SIZE)(self._evaluate)

    def _evaluate(self, kind: str, name: str, role: str, route: str, model: str) -> bool:
        return bool(self.enforcer.enforce(kind, name, role, route, model))


def default_policy(site: str) -> str:
    """The policy a site starts with: API keys within their scopes; certificates of this site's
    organisation only (its own node, and whom the site lists with `g` lines) on the OpenAI routes
    (`openai_auth = "mtls"`), and reviewers and admins of that organisation. Another hospital's
    node certificate, and any reviewer or admin the site has not listed, is refused."""
    return f"""\
# FedSeek access policy of site {site} (node/policy.py): who may call which route and model.
# Evaluated by casbin on every request, deny by default (a deny line wins over any allow).
# Edits apply at the next request without a restart; each change is audited (policy.changed).
# A malformed file is refused (policy.invalid): the last good policy stays in force.
#
#   p, KIND, NAME, ROLE, ORG, ROUTE, MODEL, EFFECT
#     KIND    cert (a consortium certificate) or key (an API key: fedseek key create)
#     NAME    the certificate's name (CN) or the key's id (fedseek key list), or *
#     ROLE    node, reviewer, admin, coordinator, monitor (certificates), key (keys), or *
#     ORG     an organisation (see g lines), or *
#     ROUTE   chat, completions, models, metrics, explanations, admin, or *
#     MODEL   a model name; * matches any part (site-a-* is every adapter version named so)
#     EFFECT  allow or deny
#   g, NAME, ORG    certificate NAME belongs to organisation ORG (certificates name their consortium,
#                   not their hospital; the party named ORG belongs to ORG itself)
#
# To admit a reviewer or admin of this site's organisation:   g, rita, {site}
# To let a key with the `explain` scope ask for explanations:  p, key, *, key, *, explanations, *, allow
# To let the monitoring's Prometheus read /metrics:           g, prometheus, {site}

# API keys, each within its own scopes (fedseek key create --scope ...).
p, key, *, key, *, chat, *, allow
p, key, *, key, *, completions, *, allow
p, key, *, key, *, models, *, allow
p, key, *, key, *, metrics, *, allow

# Certificates on the OpenAI routes (openai_auth = "mtls"): this site's organisation only.
p, cert, *, *, {site}, chat, *, allow
p, cert, *, *, {site}, completions, *, allow
p, cert, *, *, {site}, models, *, allow
p, cert, *, *, {site}, metrics, *, allow

# Reviewers and admins of this site's organisation (listed with g lines).
p, cert, *, reviewer, {site}, explanations, *, allow
p, cert, *, admin, {site}, admin, *, allow
"""


def ensure_policy(path: Path, *, site: str) -> Path:
    """`path`, written with `default_policy(site)` (0600) if there is none yet."""
    if not path.exists():
        private_dir(path.parent)  # the state directory, as the node makes it (0700)
        write_atomic(path, default_policy(site))
    return path


_Stamp = tuple[int, int, int]
SETTLE_S = 0.2
"""How long a changed policy file must stay unchanged before it applies (`SitePolicy._settled`)."""
WATCH_S = 0.1
"""How often a watched policy (`SitePolicy.watch`, as the node runs it) looks for changes."""


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class SitePolicy:
    """The policy file of one site, re-read when it changes; `allows` decides one request."""

    def __init__(self, path: Path, *, audit: AuditSink, actor: str = "policy") -> None:
        """Loads `path` now: a missing or malformed file at start is a PolicyFileError (there is
        no last good policy to keep)."""
        self.path = path
        self.audit = audit
        self.actor = actor
        self._lock = threading.Lock()
        self._stamp = _stamp(path)
        self._rules = self._read()
        self._decisions = Decisions(self._rules)
        self._refused: str | None = None  # sha256 of the last malformed content, audited once
        self._pending: tuple[_Stamp, float] | None = None  # a change seen, not yet settled
        self._watcher: tuple[threading.Thread, threading.Event] | None = None

    @property
    def sha256(self) -> str:
        """The digest of the policy in force."""
        return self._rules.sha256

    @property
    def rules(self) -> Rules:
        return self._rules

    def _read(self) -> Rules:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyFileError(f"cannot read access policy {self.path}: {exc}") from exc
        return parse_policy(text, source=str(self.path))

    def refresh(self) -> None:
        """Re-read the file if it changed since last seen and has settled: apply and audit a good
        change, keep the last good policy (and audit why) on a bad one."""
        now = _stamp(self.path)
        if now == self._stamp:
            return
        with self._lock:
            if now == self._stamp or not self._settled(now):
                return
            try:
                rules = self._read()
                decisions = Decisions(rules)
            except PolicyFileError as exc:
                if _stamp(self.path) == now:  # else it is still being written: look again later
                    self._stamp = now
                    self._keep_last_good(exc)
                return
            if _stamp(self.path) != now:
                return  # changed while read: not a content anyone finished writing
            self._stamp = now
            if rules.sha256 == self._rules.sha256:
                return  # touched, not changed
            old = self._rules.sha256
            self._rules, self._decisions, self._refused = rules, decisions, None
        log.warning("access policy %s changed (%s -> %s)", self.path, old[:12], rules.sha256[:12])
        self.audit.append(
            actor=self.actor,
            action="policy.changed",
            resource=str(self.path),
            details={
                "old_sha256": old,
                "new_sha256": rules.sha256,
                "lines": len(rules.policies) + len(rules.groupings),
            },
        )

    def _settled(self, stamp: _Stamp | None) -> bool:
        """Whether a changed file is done being written: its stat unchanged for SETTLE_S since this
        process first saw it. An editor that rewrites the file in place leaves it empty or cut
        short for a moment, and half a policy (its deny lines cut off) could open access. The
        file's own mtime cannot tell: a truncation shows size 0 beside the old mtime for a while."""
        if stamp is None:
            return True  # gone: the last good policy is kept (and the loss audited) at once
        seen = time.monotonic()
        if self._pending is None or self._pending[0] != stamp:
            self._pending = (stamp, seen)
            return False
        return seen - self._pending[1] >= SETTLE_S

    def watch(self, *, interval: float = WATCH_S) -> SitePolicy:
        """Look for changes every `interval` from a daemon thread too, so an edit is settled and
        applied within about SETTLE_S + interval whether requests come or not (`close` stops it)."""
        if self._watcher is None:
            stop = threading.Event()

            def run() -> None:
                while not stop.wait(interval):
                    try:
                        self.refresh()
                    except Exception:  # keep watching: the audit trail may be back at the next look
                        log.exception("checking the access policy %s failed", self.path)

            thread = threading.Thread(target=run, name="access-policy", daemon=True)
            self._watcher = (thread, stop)
            thread.start()
        return self

    def close(self) -> None:
        """Stop watching (the policy still refreshes on each decision)."""
        if self._watcher is not None:
            thread, stop = self._watcher
            stop.set()
            thread.join(timeout=5)
            self._watcher = None

    def _keep_last_good(self, exc: PolicyFileError) -> None:
        try:
            bad = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            bad = "missing"
        log.error("access policy refused, keeping the last good one (%s): %s", self._rules.sha256[:12], exc)
        if bad != self._refused:  # once per bad content, not once per request
            self._refused = bad
            self.audit.append(
                actor=self.actor,
                action="policy.invalid",
                resource=str(self.path),
                details={"error": exc.one_line(), "sha256": bad, "kept_sha256": self._rules.sha256},
            )

    def allows(self, subject: Subject, route: str, model: str = "") -> bool:
        """Whether the policy in force allows `subject` on `route` (and `model`; "" = not known yet)."""
        self.refresh()
        if len(model) > MAX_MODEL_LEN:
            return False
        decisions = self._decisions  # one policy per decision: a reload swaps the reference
        return decisions.decide(subject.kind, subject.name, subject.role, route, model)


def site_policy(layout: NodeLayout, *, site: str, audit: AuditSink) -> SitePolicy:
    """The site's policy from its state directory (the default written on first start), watched
    for changes for as long as the process runs."""
    return SitePolicy(ensure_policy(layout.access_policy, site=site), audit=audit).watch()


def add_members(path: Path, *, site: str, org: str, names: Iterable[str]) -> None:
    """List `names` as members of organisation `org` in the policy at `path` (the default for
    `site` if there is none yet), rewriting it atomically; a name already listed there is kept
    once. What an operator does by hand with a `g` line; the demo and tests do it before start."""
    ensure_policy(path, site=site)
    text = path.read_text(encoding="utf-8")
    have = set(parse_policy(text, source=str(path)).groupings)
    lines = [f"g, {name}, {org}\n" for name in names if (name, org) not in have]
    if lines:
        text = text if text.endswith("\n") else text + "\n"
        joined = text + "".join(lines)
        parse_policy(joined, source=str(path))  # a bad name is refused before the file changes
        write_atomic(path, joined)
