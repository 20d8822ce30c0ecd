"""Audit payload fields sealed at rest, with the log still verifiable by anyone without the key.

A record's `details` may carry free text or data values: an error message that quotes a file, an
operator's note, what minimisation rewrote or redacted. At a site with a key-encryption key
(`NodeConfig.kek`), `PayloadSealingTrail` moves those fields (`SENSITIVE_FIELDS`) into one
AES-256-GCM blob, `details["_sealed"] = {"key": "<YYYY-MM>", "blob": base64(nonce | ciphertext)}`,
before the record is hashed. So the hash chain, the Merkle leaves, checkpoints, proofs and
`fedseek audit verify` cover the ciphertext and need no key, while the identifiers an inspector
follows (adapter sha256, keyed prompt digests, explanation ids, counts, epsilons) stay in clear.

The blob's associated data is the record's clear part (actor, action, resource, the other details),
so it cannot be moved to another record unnoticed (the chain would catch that too). Its data key
is one per calendar month, kept beside the log as an envelope (`<log>.keys/<YYYY-MM>.key`, a data
key wrapped by the KEK like any other encrypted file): `fedseek keys rotate` re-wraps it, and
deleting a month's key file erases that month's sealed fields while every record still verifies.
Records appended by a process without the KEK (a CLI run without the node's config) keep their
fields in clear.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from federation.security.at_rest import Envelope, TamperedFile
from privacy.audit import AuditRecord, AuditTrail, canonical_json

__all__ = ["SEALED", "SENSITIVE_FIELDS", "PayloadSealer", "PayloadSealingTrail", "payload_keys_dir"]

SEALED = "_sealed"
SENSITIVE_FIELDS = frozenset({"error", "note", "file", "label", "batches", "text_rewrites", "redacted"})
"""Fields that can carry free text or data values (what a record's other fields never do)."""
_NONCE = 12


def payload_keys_dir(log: Path) -> Path:
    return Path(str(log) + ".keys")


class PayloadSealer:
    """Seal and open the sensitive fields of audit details under month keys wrapped by the site's KEK."""

    def __init__(self, envelope: Envelope, keys_dir: Path) -> None:
        self.envelope = envelope
        self.keys_dir = Path(keys_dir)
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _key_path(self, month: str) -> Path:
        return self.keys_dir / f"{month}.key"

    def _key(self, month: str, *, create: bool) -> bytes:
        with self._lock:
            if month not in self._keys:
                path = self._key_path(month)
                if not path.exists():
                    if not create:
                        raise TamperedFile(f"{path}: no audit payload key for {month} (deleted: its fields are erased)")
                    self._create(path, month)
                self._keys[month] = self.envelope.read(path, context=f"audit-payload/{month}")
            return self._keys[month]

    def _create(self, path: Path, month: str) -> None:
        """A new month key, made exclusively: a process that loses the race reads the winner's."""
        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        blob = self.envelope.encrypt_bytes(AESGCM.generate_key(bit_length=256), context=f"audit-payload/{month}")
        fd, tmp = tempfile.mkstemp(dir=self.keys_dir, prefix=f".{month}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)

    @staticmethod
    def _aad(actor: str, action: str, resource: str, clear: Mapping[str, Any]) -> bytes:
        return canonical_json({"actor": actor, "action": action, "resource": resource, "details": clear}).encode()

    def seal(self, *, actor: str, action: str, resource: str, details: Mapping[str, Any]) -> dict[str, Any]:
        """`details` with its sensitive fields in one sealed blob (unchanged if it has none)."""
        hidden = {k: v for k, v in details.items() if k in SENSITIVE_FIELDS}
        if not hidden or SEALED in details:
            return dict(details)
        clear = {k: v for k, v in details.items() if k not in SENSITIVE_FIELDS}
        month = datetime.now(UTC).strftime("%Y-%m")
        nonce = os.urandom(_NONCE)
        body = AESGCM(self._key(month, create=True)).encrypt(
            nonce, canonical_json(hidden).encode(), self._aad(actor, action, resource, clear)
        )
        return {**clear, SEALED: {"key": month, "blob": base64.b64encode(nonce + body).decode("ascii")}}

    def open(self, record: AuditRecord) -> dict[str, Any]:
        """The record's details with its sealed fields restored (TamperedFile if they do not open)."""
        sealed = record.details.get(SEALED)
        if not isinstance(sealed, dict):
            return dict(record.details)
        import json

        clear = {k: v for k, v in record.details.items() if k != SEALED}
        raw = base64.b64decode(str(sealed.get("blob", "")))
        key = self._key(str(sealed.get("key")), create=False)
        try:
            plain = AESGCM(key).decrypt(
                raw[:_NONCE], raw[_NONCE:], self._aad(record.actor, record.action, record.resource, clear)
            )
        except (InvalidTag, ValueError):
            raise TamperedFile(f"audit record {record.seq}: sealed fields altered or moved") from None
        return {**clear, **json.loads(plain)}


class PayloadSealingTrail(AuditTrail):
    """An `AuditTrail` whose records' sensitive fields are sealed before they are hashed and written."""

    def __init__(self, path: Path, *, payload: PayloadSealer, **options: Any) -> None:
        super().__init__(path, **options)
        self.payload = payload

    def append(
        self, *, actor: str, action: str, resource: str = "", details: Mapping[str, Any] | None = None
    ) -> AuditRecord:
        sealed = self.payload.seal(actor=actor, action=action, resource=resource, details=dict(details or {}))
        return super().append(actor=actor, action=action, resource=resource, details=sealed)
