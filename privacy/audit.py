"""Tamper-evident audit trail of every model call.

Each record is one canonical JSON line whose ``hash`` covers its content and
the previous record's hash, so editing, deleting or reordering a line breaks
the chain. A separate head file remembers the last ``seq``/``hash`` so that
cutting records off the end is detected as well.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from federation.errors import FedSeekError
from federation.ops.atomic import write_atomic

GENESIS_HASH = "0" * 64
_TAIL_CHUNK = 8192


class AuditError(FedSeekError):
    """The audit trail is damaged or cannot be written; callers must stop."""


@dataclass(frozen=True)
class AuditRecord:
    """One logged action; ``hash`` chains it to the record before."""

    seq: int
    ts: str
    actor: str
    action: str
    resource: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`; ``records`` counts those checked before any error."""

    ok: bool
    records: int
    error: str | None
    head_hash: str


class _Invalid(Exception):
    """Internal: a check failed; the message is the one-line reason."""


def canonical_json(obj: Any) -> str:
    """Serialise deterministically so equal content always hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utc_now() -> str:
    """Current UTC time as ISO-8601 with a ``Z`` suffix."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def head_path(path: Path) -> Path:
    """Location of the head file kept next to the log."""
    return path.with_suffix(path.suffix + ".head")


def _record_hash(content: Mapping[str, Any]) -> str:
    return sha256_hex(canonical_json({k: v for k, v in content.items() if k != "hash"}))


def _parse_record(line: str, *, where: str) -> AuditRecord:
    """Decode one log line and check it hashes to its own ``hash`` field."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError:
        raise _Invalid(f"{where}: malformed JSON") from None
    names = {f.name for f in fields(AuditRecord)}
    if not isinstance(raw, dict) or set(raw) != names:
        raise _Invalid(f"{where}: not an audit record")
    try:
        record = AuditRecord(**raw)
    except TypeError:
        raise _Invalid(f"{where}: not an audit record") from None
    if not isinstance(record.seq, int) or not isinstance(record.details, dict):
        raise _Invalid(f"{where}: not an audit record")
    if _record_hash(raw) != record.hash:
        raise _Invalid(f"record {record.seq}: hash mismatch (edited)")
    return record


def _read_head(path: Path) -> tuple[int, str] | None:
    """Return ``(seq, hash)`` from the head file, or None when it does not exist."""
    try:
        raw = json.loads(head_path(path).read_text(encoding="utf-8"))
        return int(raw["seq"]), str(raw["hash"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise _Invalid("head file is malformed") from None


def _write_head(path: Path, *, seq: int, hash_: str) -> None:
    """Atomically replace the head file so a crash leaves the old or new one."""
    write_atomic(head_path(path), canonical_json({"seq": seq, "hash": hash_}))


def _check_head(path: Path, *, records: int, last_hash: str) -> None:
    """Compare the chain's end with the head file; catches tail truncation."""
    head = _read_head(path)
    if head is None:
        if records:
            raise _Invalid("head file missing for non-empty log")
        return
    seq, hash_ = head
    if seq > records:
        raise _Invalid(f"truncated: head says {seq} records, log has {records}")
    if seq < records:
        raise _Invalid(f"head says {seq} records, log has {records} (head stale or records appended)")
    if hash_ != last_hash:
        raise _Invalid(f"record {seq}: head hash mismatch (truncated or rewritten)")


def _last_line(path: Path) -> str | None:
    """Read only the final line, so opening a large log stays cheap."""
    with path.open("rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos, data = end, b""
        while pos > 0 and data.rstrip(b"\n").count(b"\n") == 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    lines = data.rstrip(b"\n").split(b"\n")
    return lines[-1].decode("utf-8") if lines[-1] else None


def _check_chain_link(record: AuditRecord, *, seq: int, prev_hash: str) -> None:
    if record.seq != seq:
        raise _Invalid(f"record {record.seq}: seq gap, expected {seq} (deleted or reordered)")
    if record.prev_hash != prev_hash:
        raise _Invalid(f"record {record.seq}: prev_hash mismatch (deleted or reordered)")


class AuditTrail:
    """Append-only, hash-chained log; many threads, and more than one writer process.

    A site's app guard (`node/app_guard`) appends to the agent's trail from its own process, so
    each append holds an exclusive `flock` on the log while it writes the line and the head, and
    first takes the chain's end from the log again if the log changed since this process last
    wrote: two writers never fork the chain.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._failed = False
        self._size = -1  # the log's size when this process last read or wrote its end
        self._seq, self._hash = 0, GENESIS_HASH
        try:
            if not path.exists():  # a head file without its log is refused before a log is created
                _check_head(path, records=0, last_hash=GENESIS_HASH)
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._exclusive() as fh:
                self._sync(fh)
        except _Invalid as exc:
            raise AuditError(f"{path}: {exc}") from None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[IO[str]]:
        """The log open for appending, locked against the other writer processes until closed."""
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when the file closes
            yield fh

    def _sync(self, fh: IO[str]) -> None:
        """Take the chain's end from the log if another process appended since (raises _Invalid)."""
        size = os.fstat(fh.fileno()).st_size
        if size != self._size:
            self._seq, self._hash = self._open_tail()
            self._size = size

    def _open_tail(self) -> tuple[int, str]:
        """Trust the log only if its last record matches the head file."""
        try:
            line = _last_line(self._path) if self._path.exists() else None
        except UnicodeDecodeError:
            raise _Invalid("last line is not UTF-8") from None
        if line is None:
            _check_head(self._path, records=0, last_hash=GENESIS_HASH)
            return 0, GENESIS_HASH
        record = _parse_record(line, where="last line")
        _check_head(self._path, records=record.seq, last_hash=record.hash)
        return record.seq, record.hash

    def append(
        self,
        *,
        actor: str,
        action: str,
        resource: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Log one action durably (fsync) before returning its record."""
        # Round-trip so the record owns a plain copy and bad values fail before writing.
        detail_copy: dict[str, Any] = json.loads(canonical_json(dict(details or {})))
        with self._lock:
            if self._failed:
                raise AuditError(f"{self._path}: an earlier append failed; reopen after checking")
            try:
                with self._exclusive() as fh:
                    self._sync(fh)
                    content: dict[str, Any] = {
                        "seq": self._seq + 1,
                        "ts": utc_now(),
                        "actor": actor,
                        "action": action,
                        "resource": resource,
                        "details": detail_copy,
                        "prev_hash": self._hash,
                    }
                    record = AuditRecord(**content, hash=_record_hash(content))
                    self._write(fh, record)
            except _Invalid as exc:  # another writer left the chain broken: stop, as on a failed append
                self._failed = True
                raise AuditError(f"{self._path}: {exc}") from None
            except OSError as exc:
                self._failed = True  # the file may now hold a partial line
                raise AuditError(f"{self._path}: append failed: {exc}") from exc
            self._seq, self._hash = record.seq, record.hash
        return record

    def _write(self, fh: IO[str], record: AuditRecord) -> None:
        """Add the line (never rewriting old ones), then move the head forward; the caller holds the lock."""
        fh.write(canonical_json(asdict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        _write_head(self._path, seq=record.seq, hash_=record.hash)
        self._size = os.fstat(fh.fileno()).st_size

    @property
    def path(self) -> Path:
        return self._path

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last record this process wrote or read: a point in the chain that
        another record (a privacy ledger entry) can cite. Another writer process may have appended
        since; the point is still in the chain."""
        with self._lock:
            return self._seq, self._hash

    def __len__(self) -> int:
        return self._seq


def verify(path: Path) -> VerifyResult:
    """Check the whole chain and the head file; never raises for a damaged log."""
    records, last_hash = 0, GENESIS_HASH
    try:
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                record = _parse_record(line, where=f"line {lineno}")
                _check_chain_link(record, seq=records + 1, prev_hash=last_hash)
                records, last_hash = record.seq, record.hash
        _check_head(path, records=records, last_hash=last_hash)
    except _Invalid as exc:
        return VerifyResult(ok=False, records=records, error=str(exc), head_hash=last_hash)
    except (OSError, UnicodeDecodeError) as exc:
        return VerifyResult(
            ok=False,
            records=records,
            error=f"unreadable log: {exc}",
            head_hash=last_hash,
        )
    return VerifyResult(ok=True, records=records, error=None, head_hash=last_hash)
