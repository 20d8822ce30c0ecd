"""Tamper-evident audit trail of every model call.

Each record is one canonical JSON line whose ``hash`` covers its content and
the previous record's hash, so editing, deleting or reordering a line breaks
the chain. A separate head file remembers the last ``seq``/``hash`` so that
cutting records off the end is detected as well.

Both live on the site's disk, so an insider who can write it can rewrite them together. The log
is therefore also a transparency log (`privacy.merkle`, RFC 6962): each line is a Merkle leaf,
and with a `CheckpointSigner` the trail signs a checkpoint (size, root, time) with the site's
node key at least every second while records arrive, from a background thread so an append
waits only for its own fsync. The coordinator witnesses those checkpoints, and
`privacy.transparency` holds a log against them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from federation.errors import FedSeekError
from federation.ops.atomic import write_atomic
from privacy.checkpoints import (
    Checkpoint,
    CheckpointSigner,
    TreeState,
    checkpoint_path,
    parse_checkpoint,
    read_latest,
    read_tree,
    tree_path,
    write_latest,
    write_tree,
)
from privacy.merkle import Frontier, leaf_hash

log = logging.getLogger(__name__)

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


def companion_paths(path: Path) -> list[Path]:
    """The files kept beside the log: its head, latest signed checkpoint and Merkle frontier cache."""
    return [head_path(path), checkpoint_path(path), tree_path(path)]


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


def _last_line(path: Path, end: int | None = None) -> str | None:
    """Read only the final line (of the first `end` bytes), so opening a large log stays cheap."""
    with path.open("rb") as fh:
        end = fh.seek(0, os.SEEK_END) if end is None else end
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


_LIVE: weakref.WeakSet[AuditTrail] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Sign a last checkpoint for the records of the final second when the process exits normally."""
    for trail in list(_LIVE):
        with contextlib.suppress(Exception):
            trail.close()


class AuditTrail:
    """Append-only, hash-chained log; many threads, and more than one writer process.

    A site's app guard (`node/app_guard`) appends to the agent's trail from its own process, so
    each append holds an exclusive `flock` on the log while it writes the line and the head, and
    first takes the chain's end from the log again if the log changed since this process last
    wrote: two writers never fork the chain.

    The Merkle frontier over the lines is kept in memory (O(log n) per append) and cached beside
    the log (`privacy.checkpoints.tree_path`) once a second, so opening a long log reads only the
    records after the cache. With `signer`, a background thread signs a checkpoint each
    `interval_s` while records arrive (`latest_checkpoint`); a record is durable (fsynced) when
    `append` returns, and signed within about `interval_s` after.
    """

    def __init__(self, path: Path, *, signer: CheckpointSigner | None = None, interval_s: float = 1.0) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._failed = False
        self._size = -1  # the log's size when this process last read or wrote its end
        self._seq, self._hash = 0, GENESIS_HASH
        self._frontier = Frontier()  # over the first self._seq lines, which end at byte self._size
        self._signer = signer
        self._interval = interval_s
        self._saved = -1  # tree size this process last cached (and signed)
        self._sign_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        try:
            if not path.exists():  # a head file without its log is refused before a log is created
                _check_head(path, records=0, last_hash=GENESIS_HASH)
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._exclusive() as fh:
                self._sync(fh)
        except _Invalid as exc:
            raise AuditError(f"{path}: {exc}") from None
        if signer is not None:
            self._note_unsigned_tail(signer)
            _LIVE.add(self)
            self.checkpoint()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[IO[str]]:
        """The log open for appending, locked against the other writer processes until closed."""
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when the file closes
            yield fh

    def _sync(self, fh: IO[str]) -> None:
        """Take the chain's end and the frontier from the log if another process appended since (raises _Invalid)."""
        size = os.fstat(fh.fileno()).st_size
        if size == self._size:
            return
        grown = 0 <= self._size < size  # another writer appended: read only its lines
        start = TreeState(self._frontier, self._size, self._hash) if grown else self._cached_tree(size)
        self._catch_up(start, size)
        self._size = size

    def _cached_tree(self, size: int) -> TreeState:
        """The cached frontier if it still describes a prefix of this log, else the empty tree."""
        state = read_tree(self._path)
        empty = TreeState(Frontier(), 0, GENESIS_HASH)
        if state is None or state.offset > size or (state.frontier.size == 0) != (state.offset == 0):
            return empty
        if state.offset == 0:
            return state
        try:
            line = _last_line(self._path, state.offset)
            record = _parse_record(line, where="cached tree") if line is not None else None
        except (_Invalid, UnicodeDecodeError):
            return empty
        if record is None or (record.seq, record.hash) != (state.frontier.size, state.hash):
            log.warning("%s: frontier cache does not match the log; rebuilding from the start", self._path)
            return empty
        return state

    def _catch_up(self, start: TreeState, size: int) -> None:
        """Hash the lines after `start` into the frontier; trust the end only if it matches the head file."""
        frontier, last, count = start.frontier.copy(), None, start.frontier.size
        try:
            with self._path.open("rb") as fh:
                fh.seek(start.offset)
                remaining = size - start.offset
                for raw in fh:
                    if remaining <= 0:
                        break
                    remaining -= len(raw)
                    line = raw[:-1] if raw.endswith(b"\n") else raw
                    frontier.append(leaf_hash(line))
                    last, count = line, count + 1
        except OSError as exc:
            raise _Invalid(f"unreadable log: {exc}") from None
        if last is None:
            seq, hash_ = start.frontier.size, start.hash
        else:
            try:
                record = _parse_record(last.decode("utf-8"), where="last line")
            except UnicodeDecodeError:
                raise _Invalid("last line is not UTF-8") from None
            if record.seq != count:
                raise _Invalid(f"log holds {count} records but the last is numbered {record.seq} (deleted or inserted)")
            seq, hash_ = record.seq, record.hash
        _check_head(self._path, records=seq, last_hash=hash_)
        self._seq, self._hash, self._frontier = seq, hash_, frontier

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
            self._ensure_checkpointer()
        return record

    def _write(self, fh: IO[str], record: AuditRecord) -> None:
        """Add the line (never rewriting old ones), then move the head forward; the caller holds the lock."""
        line = canonical_json(asdict(record))
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        _write_head(self._path, seq=record.seq, hash_=record.hash)
        self._frontier.append(leaf_hash(line.encode("utf-8")))
        self._size = os.fstat(fh.fileno()).st_size

    # ---- checkpoints ------------------------------------------------------------------------------
    def _ensure_checkpointer(self) -> None:
        """Start the background checkpointer if it is not running (the caller holds self._lock)."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name=f"audit-checkpoints:{self._path.name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        idle = 0
        while not self._stop.wait(self._interval):
            try:
                idle = 0 if self.checkpoint() else idle + 1
            except Exception:  # a signing or disk failure must not kill appends; the next tick retries
                log.exception("%s: checkpoint failed", self._path)
            if idle >= 5:
                with self._lock:  # quiet: end the thread; the next append starts another
                    self._thread = None
                return

    def checkpoint(self) -> dict[str, Any] | None:
        """Cache the frontier and, with a signer, sign a checkpoint, if the log grew since the last one.

        The time is read while the log is locked, so every record not in the checkpoint is dated
        at or after it (`privacy.transparency` flags a record dated before a checkpoint that lacks
        it: a backdated insertion). Returns the signed statement, or None if nothing was new.
        """
        with self._sign_lock:  # one at a time: a caller waits for the checkpoint being signed, then its own
            with self._lock:
                if self._failed:
                    return None
                try:
                    with self._exclusive() as fh:
                        self._sync(fh)
                        if self._frontier.size == self._saved:
                            return None
                        state = TreeState(self._frontier.copy(), self._size, self._hash)
                        time = utc_now()
                except _Invalid as exc:
                    self._failed = True
                    raise AuditError(f"{self._path}: {exc}") from None
            # Outside the log's locks: appends wait for neither these fsyncs nor ECDSA.
            write_tree(self._path, state)
            self._saved = state.frontier.size
            if self._signer is None:
                return None
            checkpoint = Checkpoint(self._signer.origin, state.frontier.size, state.frontier.root().hex(), time)
            statement = self._signer.sign(checkpoint)
            # Replaces whatever checkpoint is beside the log, even a larger one: after an older copy of the
            # log was restored, the witness must see (and refuses) the smaller tree this log now has.
            write_latest(self._path, statement)
            return statement

    def _note_unsigned_tail(self, signer: CheckpointSigner) -> None:
        """Records past the last signed checkpoint at start (a crash in the last second, or lines written
        while the node was down): say so in the log itself before signing them."""
        latest = read_latest(self._path)
        try:
            signed = parse_checkpoint(latest).size if latest is not None else 0
        except FedSeekError:
            signed = 0
        if signed < self._seq:
            self.append(
                actor="audit",
                action="audit.unsigned_tail",
                resource=signer.origin,
                details={"first": signed + 1, "last": self._seq, "checkpoint": latest is not None},
            )

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The latest signed checkpoint statement (what the site sends its witness), or None."""
        return read_latest(self._path)

    def close(self) -> None:
        """Stop the checkpointer after a last checkpoint, so the final records are signed too."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        with contextlib.suppress(AuditError):
            self.checkpoint()

    @property
    def path(self) -> Path:
        return self._path

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last record this process wrote or read: a point in the chain that
        another record (a privacy ledger entry) can cite. Another writer process may have appended
        since; the point is still in the chain."""
        with self._lock:
            return self._seq, self._hash

    def tree(self) -> tuple[int, str]:
        """``(size, root hex)`` of the Merkle tree over the records this process has seen."""
        with self._lock:
            return self._frontier.size, self._frontier.root().hex()

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


def scan(path: Path) -> Iterator[tuple[AuditRecord, bytes]]:
    """Each record of the log with its line (the Merkle leaf's data), in order, the chain and at the
    end the head file checked; AuditError at the first fault. A missing log is an empty one."""
    records, last_hash = 0, GENESIS_HASH
    try:
        if path.exists():
            with path.open("rb") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    line = raw[:-1] if raw.endswith(b"\n") else raw
                    record = _parse_record(line.decode("utf-8"), where=f"line {lineno}")
                    _check_chain_link(record, seq=records + 1, prev_hash=last_hash)
                    records, last_hash = record.seq, record.hash
                    yield record, line
        _check_head(path, records=records, last_hash=last_hash)
    except _Invalid as exc:
        raise AuditError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"unreadable log: {exc}") from None
