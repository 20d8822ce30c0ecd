"""API keys for the site's applications calling the OpenAI-compatible routes.

Only SHA-256 digests are stored (one per line, `NodeLayout.api_key_digests`), so a copied state
directory does not leak usable keys; the file is re-read when it changes, so keys are added
or withdrawn without restarting the node. A key's id (the first 12 hex digits of its digest)
names the caller in the audit trail.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from federation.ops.layout import NodeLayout

KEY_PREFIX = "fsk-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key_digest: str) -> str:
    return f"key-{key_digest[:12]}"


class ApiKeys:
    """The digests file of one node, re-read on change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._digests: frozenset[str] = frozenset()

    def _current(self) -> frozenset[str]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError:
            return frozenset()
        with self._lock:
            if stamp != self._stamp:
                lines = self.path.read_text(encoding="utf-8").splitlines()
                self._digests = frozenset(x.strip().lower() for x in lines if x.strip() and not x.startswith("#"))
                self._stamp = stamp
            return self._digests

    def verify(self, key: str) -> str | None:
        """The key's id if it is a current key, else None (constant-time per digest)."""
        got = digest(key)
        found = None
        for known in self._current():
            if hmac.compare_digest(got, known):
                found = known
        return key_id(found) if found else None

    def create(self) -> str:
        """A new key; only its digest is kept. Returns the key, to hand to the application once."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{digest(key)}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return key

    def __len__(self) -> int:
        return len(self._current())


def ensure_first_key(layout: NodeLayout) -> ApiKeys:
    """The node's keys; on first start, one key is created and left in `layout.api_key` (0600)
    for the operator to hand to the site's application."""
    keys = ApiKeys(layout.api_key_digests)
    if not keys.path.exists():
        key = keys.create()
        fd = os.open(layout.api_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{key}\n".encode())
        finally:
            os.close(fd)
    return keys
