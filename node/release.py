"""Gray release at a site: which global version serves default traffic, and when a new one may.

A deployed global version does not take over at once. It becomes the *candidate*: it serves
`share` of the default traffic (requests naming no model, or `latest`; with share 0 only requests
that name it) while the current *stable* version serves the rest. It is held to two measures:

- its held-out evaluation: the site's eval loss of it, taken at deployment, against the stable
  version's (the base model's before any version is stable). Worse by more than `tolerance`
  (relative) and it is rolled back at once: it never served default traffic.
- its error rate: after `min_requests` requests it served, its share of failed generations may
  exceed the stable version's by at most `error_margin`; else it is rolled back.

It is promoted when it holds up: after `min_requests` requests, or, when traffic is too thin for
that, at the next deployment (a candidate that held up through a whole round is promoted before
the new version is compared with it). A rolled-back version stays installed, served only to
requests that name it; the stable version keeps serving. People promote and roll back any
installed version by hand (`fedseek model promote|rollback`, node/api/admin.py).

Every step is one audit record (`release.candidate`, `release.promoted`, `release.rolled_back`,
`release.policy`) and the state is one JSON file written atomically (`<adapters>/release.json`),
so a restart serves what was served before. Request counters are saved with every step and every
`SAVE_EVERY` requests: a crash loses at most that many counts, never a decision.

Default traffic is split deterministically, not by chance: the n-th default request goes to the
candidate when floor((n+1) * share) > floor(n * share), so any window of requests gives the
candidate its share to within one request (and a test can count it).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from federation.errors import Conflict, InvalidInput, NotFound
from federation.ops.atomic import write_atomic
from federation.protocol.names import BASE_ALIAS
from privacy.audit import AuditTrail, utc_now

__all__ = [
    "CANDIDATE",
    "RETIRED",
    "SAVE_EVERY",
    "STABLE",
    "Release",
    "ReleaseError",
    "ReleasePolicy",
    "VersionRecord",
]

Status = Literal["stable", "candidate", "retired"]
STABLE: Status = "stable"
CANDIDATE: Status = "candidate"
RETIRED: Status = "retired"

SAVE_EVERY = 25
"""Request counters are written to disk at least every this many requests (and at every decision)."""


class ReleaseError(Conflict):
    """A promote or rollback that the release state does not allow (409)."""


class UnknownVersion(NotFound):
    """A promote or rollback names a version this node has not installed (404)."""

    default_code = "model_not_found"


@dataclass(frozen=True)
class ReleasePolicy:
    """How a candidate is judged; the site's own choice (`fedseek model policy`)."""

    share: float = 0.1
    """Share of default traffic the candidate serves; 0: only requests that name it."""
    tolerance: float = 0.05
    """The candidate's eval loss may exceed the stable version's by at most this fraction of it."""
    min_requests: int = 20
    """Requests the candidate serves before its error rate decides (0: promoted once its eval holds)."""
    error_margin: float = 0.0
    """The candidate's error rate may exceed the stable version's by at most this."""

    def __post_init__(self) -> None:
        checks = {
            "share": 0 <= self.share <= 1,
            "tolerance": math.isfinite(self.tolerance) and self.tolerance >= 0,
            "min_requests": isinstance(self.min_requests, int) and self.min_requests >= 0,
            "error_margin": 0 <= self.error_margin <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InvalidInput(
                f"invalid release policy {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}: share and "
                "error_margin in [0, 1], tolerance >= 0, min_requests a whole number >= 0",
                code="invalid_release_policy",
            )

    @classmethod
    def from_json(cls, data: Any) -> ReleasePolicy:
        if not isinstance(data, dict) or set(data) - {f for f in cls.__dataclass_fields__}:
            raise InvalidInput(f"release policy must be an object with keys {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


@dataclass
class VersionRecord:
    """One version's place in the release, and what it has served since it was installed."""

    version: str
    status: Status
    eval_loss: float | None
    since: str
    requests: int = 0
    errors: int = 0
    reason: str = ""

    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass
class _State:
    policy: ReleasePolicy = field(default_factory=ReleasePolicy)
    stable: str | None = None  # None: the base model
    candidate: str | None = None
    versions: dict[str, VersionRecord] = field(default_factory=dict)
    history: list[str | None] = field(default_factory=list)  # earlier stables, newest last (None: the base)
    base: VersionRecord | None = None  # the base model's own record: its eval loss and its counters


class Release:
    """A site's release state: the stable version, the candidate, and their record (thread-safe)."""

    def __init__(self, path: Path, *, audit: AuditTrail, base_eval_loss: float, installed: Iterable[str] = ()) -> None:
        """Load the state from `path` (or start one); `installed` are the versions the host serves.

        A node that ran before gray release existed has versions but no state file: its newest
        installed version stays the default (stable), the others retired, as it served them.
        """
        self.path = path
        self.audit = audit
        self._lock = threading.Lock()
        self._default_seen = 0  # default requests routed since the candidate came (the split's counter)
        self._unsaved = 0
        self._listeners: list[Callable[[], None]] = []
        self.state = self._load() if path.exists() else _State()
        if self.state.base is None:
            self.state.base = VersionRecord(BASE_ALIAS, STABLE, base_eval_loss, utc_now())
        else:
            self.state.base.eval_loss = base_eval_loss  # the same eval data: taken afresh at every start
        installed = list(installed)
        known = self.state.versions
        if not path.exists() and installed:
            for v in installed[:-1]:
                known[v] = VersionRecord(v, RETIRED, None, utc_now(), reason="installed before gray release")
            known[installed[-1]] = VersionRecord(installed[-1], STABLE, None, utc_now(), reason="adopted")
            self.state.stable = installed[-1]
        for v in [v for v in known if v not in installed]:  # its directory was removed: forget it
            self._forget(v)
        self._save()

    # ---- persistence ---------------------------------------------------------------
    def _load(self) -> _State:
        try:
            raw = json.loads(self.path.read_text())
            versions = {v: VersionRecord(**rec) for v, rec in raw["versions"].items()}
            return _State(
                policy=ReleasePolicy.from_json(raw["policy"]),
                stable=raw["stable"],
                candidate=raw["candidate"],
                versions=versions,
                history=list(raw.get("history", [])),
                base=VersionRecord(**raw["base"]) if raw.get("base") else None,
            )
        except (OSError, ValueError, KeyError, TypeError, InvalidInput) as exc:
            raise ReleaseError(f"release state {self.path} is unreadable ({exc}); move it aside to start anew") from exc

    def _save(self) -> None:
        s = self.state
        doc = {
            "policy": asdict(s.policy),
            "stable": s.stable,
            "candidate": s.candidate,
            "history": s.history,
            "base": asdict(s.base) if s.base else None,
            "versions": {v: asdict(r) for v, r in s.versions.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(doc, indent=1))
        self._unsaved = 0

    def _forget(self, version: str) -> None:
        s = self.state
        s.versions.pop(version, None)
        s.history = [h for h in s.history if h != version]
        if s.candidate == version:
            s.candidate = None
        if s.stable == version:
            s.stable = s.history.pop() if s.history else None

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every decision (each `release.*` record): a serving backend that holds
        adapters of its own (node/upstream/vllm.py) follows the release so. It runs in the deciding thread,
        under the release's lock, the event loop's too: it must only signal, never block or call back."""
        self._listeners.append(listener)

    # ---- reading ---------------------------------------------------------------------
    @property
    def policy(self) -> ReleasePolicy:
        return self.state.policy

    @property
    def stable(self) -> str | None:
        return self.state.stable

    @property
    def candidate(self) -> str | None:
        return self.state.candidate

    def status_of(self, version: str | None) -> Status:
        """A version's status; None (the base model) is stable while no version is."""
        if version is None:
            return STABLE if self.state.stable is None else RETIRED
        rec = self.state.versions.get(version)
        return rec.status if rec is not None else RETIRED

    def share_of(self, version: str | None) -> float:
        """The share of default traffic `version` (None: the base model) gets now."""
        s = self.state
        cand = s.policy.share if s.candidate is not None else 0.0
        if version is not None and version == s.candidate:
            return cand
        return 1.0 - cand if version == s.stable else 0.0

    def record_of(self, version: str | None) -> VersionRecord | None:
        return self.state.base if version is None else self.state.versions.get(version)

    def to_json(self) -> dict[str, Any]:
        """What `GET /v1/admin/models` answers: the policy, stable, candidate and every version's record."""
        with self._lock:
            s = self.state
            rows = [self._row(None)] + [self._row(v) for v in s.versions]
            return {
                "policy": asdict(s.policy),
                "stable": s.stable,
                "candidate": s.candidate,
                "history": list(s.history),
                "versions": rows,
            }

    def _row(self, version: str | None) -> dict[str, Any]:
        rec = self.record_of(version)
        assert rec is not None
        return {
            **asdict(rec),
            "version": version if version is not None else BASE_ALIAS,
            "status": self.status_of(version),
            "share": self.share_of(version),
            "error_rate": rec.error_rate(),
        }

    # ---- serving ---------------------------------------------------------------------
    def route(self) -> str | None:
        """The version a default request goes to (None: the base model)."""
        with self._lock:
            s = self.state
            if s.candidate is None or s.policy.share <= 0:
                return s.stable
            n, share = self._default_seen, s.policy.share
            self._default_seen += 1
            return s.candidate if math.floor((n + 1) * share) > math.floor(n * share) else s.stable

    def served(self, version: str | None, *, ok: bool) -> None:
        """Count one request `version` served (None: the base model); a candidate that has served
        `min_requests` is then judged on its error rate."""
        with self._lock:
            rec = self.record_of(version)
            if rec is None:
                return
            rec.requests += 1
            rec.errors += 0 if ok else 1
            self._unsaved += 1
            s = self.state
            if version is not None and version == s.candidate and rec.requests >= s.policy.min_requests:
                self._judge_errors(version, actor="node")
            elif self._unsaved >= SAVE_EVERY:
                self._save()

    # ---- decisions ---------------------------------------------------------------------
    def offer(self, version: str, *, eval_loss: float, actor: str = "coordinator") -> Status:
        """A version just deployed and scored: a candidate, promoted at once (`min_requests` 0), or
        rolled back if its eval loss is worse than the stable version's. A pending candidate is
        settled first. Deploying a known version again changes nothing."""
        with self._lock:
            s = self.state
            if version in s.versions:
                return s.versions[version].status
            if s.candidate is not None:
                self._settle_pending(superseded_by=version)
            finite = math.isfinite(eval_loss)
            rec = VersionRecord(version, CANDIDATE, eval_loss if finite else None, utc_now())  # JSON has no NaN
            s.versions[version] = rec
            against = self._stable_eval_loss()
            limit = against * (1 + s.policy.tolerance) if against is not None else math.inf
            details = {"eval_loss": rec.eval_loss, "stable": s.stable or BASE_ALIAS, "stable_eval_loss": against}
            if not (finite and eval_loss <= limit):
                why = (
                    f"eval loss {eval_loss:.4f} worse than the stable's {against:.4f} "
                    f"by more than {s.policy.tolerance:g}"
                    if finite
                    else f"eval loss is {eval_loss}"
                )
                s.versions[version] = replace(rec, status=RETIRED, reason=why)
                self._append("release.rolled_back", version, actor, {**details, "reason": why, "automatic": True})
                self._save()
                return RETIRED
            s.candidate = version
            self._default_seen = 0
            self._append("release.candidate", version, actor, {**details, "share": s.policy.share})
            if s.policy.min_requests == 0:
                self._promote(version, actor="node", reason="eval loss held; no request threshold")
            self._save()
            return s.versions[version].status

    def promote(self, version: str, *, actor: str, reason: str = "by hand") -> None:
        """Make an installed version (candidate, retired, or an earlier stable) the stable one."""
        with self._lock:
            self._known(version)
            if version == self.state.stable:
                raise ReleaseError(f"{version} is already the stable version")
            self._promote(version, actor=actor, reason=reason)
            self._save()

    def rollback(self, version: str | None = None, *, actor: str, reason: str = "by hand") -> str | None:
        """Roll back `version` (default: the candidate if there is one, else the stable version).
        A candidate is retired; a stable version gives way to the stable before it (or the base
        model). Returns the version that now serves default traffic (None: the base model)."""
        with self._lock:
            s = self.state
            target = version if version is not None else (s.candidate or s.stable)
            if target is None:
                raise ReleaseError("nothing to roll back: the base model serves and there is no candidate")
            self._known(target)
            if target not in (s.candidate, s.stable):
                raise ReleaseError(f"{target} is {self.status_of(target)}: only the candidate or the stable version")
            self._rollback(target, actor=actor, reason=reason, automatic=False)
            self._save()
            return s.stable

    def set_policy(self, policy: ReleasePolicy, *, actor: str) -> None:
        with self._lock:
            self.state.policy = policy
            self._default_seen = 0
            self._append("release.policy", BASE_ALIAS, actor, asdict(policy))
            self._save()

    # ---- under the lock ------------------------------------------------------------------
    def _known(self, version: str) -> None:
        if version not in self.state.versions:
            raise UnknownVersion(f"version {version!r} is not installed here; see GET /v1/models")

    def _stable_eval_loss(self) -> float | None:
        rec = self.record_of(self.state.stable)
        return rec.eval_loss if rec is not None else None

    def _judge_errors(self, version: str, *, actor: str) -> None:
        s = self.state
        cand = s.versions[version]
        stable = self.record_of(s.stable)
        stable_rate = stable.error_rate() if stable is not None else 0.0
        if cand.error_rate() <= stable_rate + s.policy.error_margin:
            self._promote(version, actor=actor, reason=f"held up over {cand.requests} requests")
        else:
            why = (
                f"error rate {cand.error_rate():.3f} over {cand.requests} requests above the stable's "
                f"{stable_rate:.3f} by more than {s.policy.error_margin:g}"
            )
            self._rollback(version, actor=actor, reason=why, automatic=True)
        self._save()

    def _settle_pending(self, *, superseded_by: str) -> None:
        """A new version arrives while a candidate is still judged: the candidate passed its eval (or
        it would not be one), so it is promoted unless its error rate so far is already too high."""
        s = self.state
        assert s.candidate is not None
        cand, stable = s.versions[s.candidate], self.record_of(s.stable)
        stable_rate = stable.error_rate() if stable is not None else 0.0
        if cand.error_rate() <= stable_rate + s.policy.error_margin:
            self._promote(s.candidate, actor="node", reason=f"held up until {superseded_by} came")
        else:
            why = f"error rate {cand.error_rate():.3f} above the stable's {stable_rate:.3f} when {superseded_by} came"
            self._rollback(s.candidate, actor="node", reason=why, automatic=True)

    def _promote(self, version: str, *, actor: str, reason: str) -> None:
        s = self.state
        previous = s.stable
        if previous is not None:
            s.versions[previous].status = RETIRED
            s.versions[previous].reason = f"superseded by {version}"
        s.history = [h for h in s.history if h != version] + [previous]
        if s.candidate == version:
            s.candidate = None
        elif s.candidate is not None:  # a person promoted another version: the candidate is no longer judged
            s.versions[s.candidate].status = RETIRED
            s.versions[s.candidate].reason = f"{version} promoted by hand"
            s.candidate = None
        rec = s.versions[version]
        rec.status, rec.reason = STABLE, reason
        s.stable = version
        details = {"previous": previous or BASE_ALIAS, "reason": reason, "eval_loss": rec.eval_loss}
        self._append("release.promoted", version, actor, {**details, "requests": rec.requests, "errors": rec.errors})

    def _rollback(self, version: str, *, actor: str, reason: str, automatic: bool) -> None:
        s = self.state
        rec = s.versions[version]
        if version == s.candidate:
            s.candidate = None
            now = s.stable
        else:  # the stable version: the one before it serves again
            now = s.history.pop() if s.history else None
            while now is not None and now not in s.versions:
                now = s.history.pop() if s.history else None
            s.stable = now
            if now is not None:
                s.versions[now].status = STABLE
                s.versions[now].reason = f"restored when {version} was rolled back"
        rec.status, rec.reason = RETIRED, reason
        details = {"reason": reason, "automatic": automatic, "serving": now or BASE_ALIAS}
        self._append("release.rolled_back", version, actor, {**details, "requests": rec.requests, "errors": rec.errors})

    def _append(self, action: str, version: str, actor: str, details: dict[str, Any]) -> None:
        self.audit.append(actor=actor, action=action, resource=version, details=details)
        for listener in self._listeners:
            listener()
