"""API keys for the site's applications: scopes, expiry and revocation, with only digests kept.

The keys file (`NodeLayout.api_key_digests`) holds one JSON record a line: the key's SHA-256
digest (never the key, so a copied state directory leaks no usable key), its id (`key-` and the
first 12 hex digits of the digest, the name the audit trail and the access policy use), its
scopes, when it was made, when it expires and when it was revoked. A bare hex digest line (the
format before scopes) is a key with the default scopes and no expiry.

`fedseek key create|list|revoke` (federation/cli/keys.py) change the file under an exclusive
`flock` of a lock file beside it, so a create and a revoke never lose each other's line; a
revocation rewrites the file atomically, keeping the revoked record for the inventory. The node
re-reads the file when it changes (a stat per request), so a key is added or withdrawn without a
restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from federation.errors import InvalidInput, NotFound
from federation.ops.atomic import write_atomic
from federation.ops.layout import NodeLayout

__all__ = [
    "DEFAULT_SCOPES",
    "KEY_PREFIX",
    "SCOPES",
    "ApiKeys",
    "KeyRecord",
    "UnknownKey",
    "digest",
    "ensure_first_key",
    "key_id",
]

log = logging.getLogger("fedseek.node.api_keys")

KEY_PREFIX = "fsk-"
SCOPES = ("chat", "models", "metrics", "explain")
"""What a key may be used for: `chat` (/v1/chat/completions, /v1/completions), `models`
(/v1/models), `metrics` (/metrics), `explain` (/v1/explanations, where the site policy lets keys)."""
DEFAULT_SCOPES = ("chat", "models", "metrics")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class UnknownKey(NotFound):
    """No key with that id in this site's keys file."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key_digest: str) -> str:
    return f"key-{key_digest[:12]}"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(when: datetime | None) -> str | None:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


def _time(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a time: {value!r}")
    when = datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """`scopes` in SCOPES order, without repeats; InvalidInput names an unknown one."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise InvalidInput(f"unknown API key scope {', '.join(unknown)}: use {', '.join(SCOPES)}")
    if not wanted:
        raise InvalidInput(f"an API key needs at least one scope ({', '.join(SCOPES)})")
    return tuple(s for s in SCOPES if s in wanted)


@dataclass(frozen=True)
class KeyRecord:
    """One key as the keys file holds it (its digest, never the key)."""

    id: str
    sha256: str
    scopes: tuple[str, ...]
    created: datetime | None = None
    expires: datetime | None = None
    revoked: datetime | None = None
    label: str = ""

    def refusal(self, now: datetime) -> str | None:
        """Why this key may not be used at `now`, or None if it may."""
        if self.revoked is not None:
            return f"API key {self.id} was revoked at {_iso(self.revoked)}"
        if self.expires is not None and now >= self.expires:
            return f"API key {self.id} expired at {_iso(self.expires)}"
        return None

    def state(self, now: datetime) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def to_line(self) -> str:
        record = asdict(self)
        record["scopes"] = list(self.scopes)
        for name in ("created", "expires", "revoked"):
            record[name] = _iso(getattr(self, name))
        return json.dumps(record, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_line(cls, line: str) -> KeyRecord:
        """A record from one line of the keys file; ValueError if it is not one."""
        line = line.strip()
        if _HEX64.match(line.lower()):  # the format before scopes: a bare digest
            return cls(id=key_id(line.lower()), sha256=line.lower(), scopes=DEFAULT_SCOPES)
        raw = json.loads(line)
        if not isinstance(raw, dict) or not _HEX64.match(str(raw.get("sha256", ""))):
            raise ValueError("not a key record (no sha256)")
        sha = str(raw["sha256"])
        return cls(
            id=key_id(sha),
            sha256=sha,
            scopes=check_scopes(raw.get("scopes") or ()),
            created=_time(raw.get("created")),
            expires=_time(raw.get("expires")),
            revoked=_time(raw.get("revoked")),
            label=str(raw.get("label") or ""),
        )


_Stamp = tuple[int, int, int]


class ApiKeys:
    """The keys file of one node, re-read on change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: _Stamp | None = None
        self._records: tuple[KeyRecord, ...] = ()

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _read(self) -> tuple[KeyRecord, ...]:
        records = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            try:
                records.append(KeyRecord.from_line(line))
            except (ValueError, InvalidInput) as exc:  # that line's key works nowhere: fail closed
                log.error("%s line %d is not a key record, ignored: %s", self.path, number, exc)
        return tuple(records)

    def records(self) -> tuple[KeyRecord, ...]:
        """Every key on file (revoked and expired ones included), as of the file's last change."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return ()
        with self._lock:
            if stamp != self._stamp:
                self._records = self._read()
                self._stamp = stamp
            return self._records

    def lookup(self, key: str) -> KeyRecord | None:
        """The record of `key` (usable or not: see KeyRecord.refusal), or None if it is no key of
        this site. Each digest is compared in constant time."""
        got = digest(key)
        found = None
        for record in self.records():
            if hmac.compare_digest(got, record.sha256):
                found = record
        return found

    def verify(self, key: str) -> str | None:
        """The key's id if it is a current, unexpired, unrevoked key, else None."""
        record = self.lookup(key)
        return record.id if record is not None and record.refusal(_now()) is None else None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Held while the file is changed: by `fedseek key` and by a first start alike."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def create(self) -> str:
        """A new key with the default scopes and no expiry, to hand out once (see `issue`)."""
        return self.issue()[0]

    def issue(
        self, *, scopes: Iterable[str] = DEFAULT_SCOPES, expires: datetime | None = None, label: str = ""
    ) -> tuple[str, KeyRecord]:
        """A new key and its record; only the digest is kept. Returns the key, to hand out once."""
        scopes = check_scopes(scopes)
        now = _now()
        if expires is not None:  # kept to the second, as the file writes it
            expires = expires.astimezone(UTC).replace(microsecond=0)
        if expires is not None and expires <= now:
            raise InvalidInput(f"expiry {_iso(expires)} is not in the future")
        if "\n" in label or len(label) > 200:
            raise InvalidInput("a key label is one line of at most 200 characters")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        sha = digest(key)
        record = KeyRecord(id=key_id(sha), sha256=sha, scopes=scopes, created=now, expires=expires, label=label)
        with self._exclusive():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, f"{record.to_line()}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return key, record

    def revoke(self, kid: str) -> KeyRecord:
        """Mark key `kid` revoked (the file is rewritten atomically); its record, as revoked.
        Revoking a revoked key changes nothing. UnknownKey if there is none."""
        with self._exclusive():
            current = self._read() if self.path.exists() else ()
            if not any(r.id == kid for r in current):
                raise UnknownKey(f"no API key {kid!r} in {self.path} (fedseek key list shows the ids)")
            now = _now()
            updated = tuple(replace(r, revoked=r.revoked or now) if r.id == kid else r for r in current)
            write_atomic(self.path, "".join(f"{r.to_line()}\n" for r in updated))
        return next(r for r in updated if r.id == kid)

    def __len__(self) -> int:
        now = _now()
        return sum(1 for r in self.records() if r.refusal(now) is None)


def ensure_first_key(layout: NodeLayout) -> ApiKeys:
    """The node's keys; on first start, one key (default scopes, no expiry) is created and left in
    `layout.api_key` (0600) for the operator to hand to the site's application."""
    keys = ApiKeys(layout.api_key_digests)
    if not keys.path.exists():
        key, _ = keys.issue(label="first key (made on first start)")
        fd = os.open(layout.api_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{key}\n".encode())
        finally:
            os.close(fd)
    return keys
