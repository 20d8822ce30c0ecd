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

Appends are group-committed: the threads appending at once have their lines written together
and one fsync covers them all; each `append` returns only after the fsync that covers its record.
A long log rolls over into sealed segments (`privacy.segments`) that continue the same chain and
the same tree; `verify` checks a sealed segment by its recorded sha256 and reads only the active
one line by line.
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation.errors import FedSeekError
from federation.ops.atomic import fsync_dir, private_dir, write_atomic
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
from privacy.segments import Seal, file_digest, read_seals, segment_name, segments_dir, write_seal
from privacy.treestore import NodeStore, nodes_path

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
_TAIL_CHUNK = 8192
_HEAD_BYTES = 128  # the head is rewritten in place, padded to this: one write within one disk sector
_GROUP_MAX = 4096  # records one fsync may cover: bounds a group's memory and its wait
SEGMENT_BYTES = 64 << 20


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
    parsed: int = 0  # lines parsed and hashed (the active segment only, unless deep)
    sealed: int = 0  # sealed segments checked by their seal (file digest, and start/end state)
    deleted: int = 0  # sealed segments a retention sweep deleted (their seals remain)


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


def lock_path(path: Path) -> Path:
    """The file the writers `flock`: it never moves, while the active log is renamed when sealed."""
    return path.with_suffix(path.suffix + ".lock")


def companion_paths(path: Path) -> list[Path]:
    """The files kept beside the log: its head, latest signed checkpoint, Merkle frontier cache, node
    store and writers' lock (sealed segments are in the directory `privacy.segments.segments_dir`)."""
    return [head_path(path), checkpoint_path(path), tree_path(path), nodes_path(path), lock_path(path)]


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
    for attempt in range(3):  # read again if a writer's in-place rewrite was caught half done
        try:
            raw = json.loads(head_path(path).read_text(encoding="utf-8"))
            return int(raw["seq"]), str(raw["hash"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            if attempt == 2:
                raise _Invalid("head file is malformed") from None
    return None


def _write_head(path: Path, *, seq: int, hash_: str) -> None:
    """Move the head forward: one in-place write of a fixed-size file and fdatasync (2 ms here,
    where a temporary file, rename and directory fsync take 12 ms), atomic on disk because the
    128 bytes lie within one sector. The first head, or one of another size, is written atomically."""
    data = canonical_json({"seq": seq, "hash": hash_}).encode("utf-8").ljust(_HEAD_BYTES - 1) + b"\n"
    target = head_path(path)
    try:
        fd = os.open(target, os.O_WRONLY)
    except FileNotFoundError:
        write_atomic(target, data)
        return
    try:
        if os.fstat(fd).st_size != len(data):
            write_atomic(target, data)
            return
        os.pwrite(fd, data, 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)


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


def _first_line(path: Path) -> bytes | None:
    with contextlib.suppress(FileNotFoundError), path.open("rb") as fh:
        line = fh.readline().rstrip(b"\n")
        return line or None
    return None


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


@dataclass(frozen=True)
class SegmentPolicy:
    """When the active segment is sealed: past `max_bytes`, or when a record falls in another
    calendar month (UTC) than the segment's first."""

    max_bytes: int = SEGMENT_BYTES
    monthly: bool = True


class _Pending:
    """One caller's record waiting for the group commit that writes it."""

    __slots__ = ("action", "actor", "details", "error", "record", "resource", "wake")

    def __init__(self, actor: str, action: str, resource: str, details: dict[str, Any]) -> None:
        self.actor, self.action, self.resource, self.details = actor, action, resource, details
        self.record: AuditRecord | None = None
        self.error: AuditError | None = None
        self.wake = threading.Event()  # set when written (or failed), or when this caller is to lead the next group

    @property
    def done(self) -> bool:
        return self.record is not None or self.error is not None


@dataclass(frozen=True)
class _Prepared:
    """A group's lines ready to write, chained onto the log's end `after` (ino, size, seq, hash)."""

    after: tuple[int, int, int, str]
    data: bytes
    nodes: bytes
    records: list[AuditRecord]
    seq: int
    hash: str
    frontier: Frontier


class _Locked:
    """The active log open for appending while this process holds the writers' lock."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


def _segment_state(path: Path) -> tuple[TreeState, Seal | None]:
    """Where the active segment starts (the last seal's end, or the empty tree) and that seal."""
    try:
        seals = read_seals(path)
    except ValueError as exc:
        raise _Invalid(f"segments: {exc}") from None
    if not seals:
        return TreeState(Frontier(), 0, GENESIS_HASH), None
    last = seals[-1]
    return TreeState(last.end.frontier.copy(), 0, last.end.hash), last


def _recover_rollover(path: Path) -> bool:
    """Finish a seal a crash interrupted: the seal was written but the active file not yet moved."""
    try:
        seals = read_seals(path)
    except ValueError:
        return False  # reported by the caller's own read
    if not seals:
        return False
    last = seals[-1]
    if last.file(path).exists() or last.tombstone(path).exists():
        return False
    if path.exists() and file_digest(path) == (last.size, last.sha256):
        os.rename(path, last.file(path))
        fsync_dir(segments_dir(path))
        fsync_dir(path.parent)
        log.warning("%s: completed the seal of segment %s a crash interrupted", path, last.name)
        return True
    last.seal_file(path).unlink()
    log.warning("%s: dropped the seal of segment %s: its file was never moved (crash while sealing)", path, last.name)
    return False


class AuditTrail:
    """Append-only, hash-chained log; many threads, and more than one writer process.

    A site's app guard (`node/app_guard`) appends to the agent's trail from its own process, so
    each group of appends holds an exclusive `flock` (on `lock_path`, which never moves) while it
    writes its lines and the head, and first takes the chain's end from the log again if the log
    changed since this process last wrote: two writers never fork the chain.

    Group commit: the first caller to find no write in progress leads; it takes every record
    queued so far (up to `_GROUP_MAX`), writes them in one write, fsyncs once and moves the head;
    the others wait and get their record once that fsync returned (durable before acknowledged).
    Records queued meanwhile form the next group, which is prepared while this one's fsync runs.

    The Merkle frontier over the lines is kept in memory (O(log n) per append) and cached beside
    the log (`privacy.checkpoints.tree_path`) once a second, so opening a long log reads only the
    records after the cache. Every node is appended to a store (`privacy.treestore`) for O(log² n)
    proofs. With `signer`, a background thread signs a checkpoint each `interval_s` while records
    arrive (`latest_checkpoint`). With `segments`, the active file is sealed (`privacy.segments`)
    when it grows past the policy's size or month; only the process holding the signer seals a
    signed log.
    """

    def __init__(
        self,
        path: Path,
        *,
        signer: CheckpointSigner | None = None,
        interval_s: float = 1.0,
        segments: SegmentPolicy | None = SegmentPolicy(),
    ) -> None:
        self._path = path
        self._lock = threading.Lock()  # this process's state; held by the group's leader until its lines are written
        self._file_lock = threading.Lock()  # with the flock: the log's file, held until the group's fsync returned
        self._queue_lock = threading.Lock()  # the records waiting for a group, and whether one is being written
        self._queue: list[_Pending] = []
        self._leading = False
        self._failed = False
        self.append_failures = 0
        """Appends this process was refused since it opened the trail (node/metrics.py exports it)."""
        self._ino, self._size = -1, -1  # the active file and its size when this process last read or wrote it
        self._seq, self._hash = 0, GENESIS_HASH
        self._durable = (0, GENESIS_HASH)  # the last record an fsync covered (what head() cites)
        self._frontier = Frontier()  # over the first self._seq lines, which end at byte self._size
        self._base = TreeState(Frontier(), 0, GENESIS_HASH)  # where the active segment starts
        self._last_seal: Seal | None = None
        self._first_ts: str | None = None  # the active segment's first record's time
        self._policy = segments
        self._nodes = NodeStore(nodes_path(path))
        self._signer = signer
        self._interval = interval_s
        self._saved = -1  # tree size this process last cached (and signed)
        self._sign_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        try:
            if not path.exists() and not segments_dir(path).is_dir():
                _check_head(path, records=0, last_hash=GENESIS_HASH)  # a head without its log is refused
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
            with self._exclusive() as locked:
                self._sync(locked)
        except _Invalid as exc:
            raise AuditError(f"{path}: {exc}") from None
        if signer is not None:
            self._note_unsigned_tail(signer)
            _LIVE.add(self)
            self.checkpoint()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            os.close(self._lock_fd)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[_Locked]:
        """The active log open for appending, locked against the other writer processes until closed."""
        self._lock_file()
        locked = _Locked(-1)
        try:
            locked.fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            yield locked
        finally:
            if locked.fd >= 0:
                os.close(locked.fd)
            self._unlock_file()

    def _lock_file(self) -> None:
        # A flock belongs to the open file, which this process's threads share: a thread lock keeps them
        # apart too (a group's fsync runs under the file lock after the in-process lock is released).
        self._file_lock.acquire()
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except BaseException:
            self._file_lock.release()
            raise

    def _unlock_file(self) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._file_lock.release()

    def _sync(self, locked: _Locked) -> None:
        """Take the chain's end and the frontier from the log if another process appended or sealed
        since (raises _Invalid). A file this process never saw starts from the last seal's end."""
        st = os.fstat(locked.fd)
        if (st.st_ino, st.st_size) == (self._ino, self._size):
            return
        if st.st_ino == self._ino and 0 <= self._size < st.st_size:
            grown = TreeState(self._frontier, self._size, self._hash)  # another writer appended: only its lines
            if self._catch_up(grown, st.st_size, link=True):
                self._size = st.st_size
                return
        if _recover_rollover(self._path):  # the active file moved into the segments: open the new one
            os.close(locked.fd)
            locked.fd = -1
            locked.fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            fsync_dir(self._path.parent)
            st = os.fstat(locked.fd)
        self._base, self._last_seal = _segment_state(self._path)
        self._first_ts = None
        self._catch_up(self._cached_tree(st.st_size), st.st_size, link=False)
        self._ino, self._size = st.st_ino, st.st_size
        self._nodes.truncate(self._seq)  # nodes a crash left for records that never reached the log

    def _cached_tree(self, size: int) -> TreeState:
        """The cached frontier if it still describes a prefix of the active segment, else its start."""
        state = read_tree(self._path)
        base = self._base
        if state is None or state.offset == 0 or state.offset > size or state.frontier.size <= base.frontier.size:
            return base
        try:
            line = _last_line(self._path, state.offset)
            record = _parse_record(line, where="cached tree") if line is not None else None
        except (_Invalid, UnicodeDecodeError):
            return base
        if record is None or (record.seq, record.hash) != (state.frontier.size, state.hash):
            log.warning("%s: frontier cache does not match the log; rebuilding from the segment's start", self._path)
            return base
        return state

    def _catch_up(self, start: TreeState, size: int, *, link: bool) -> bool:
        """Hash the lines after `start` into the frontier; trust the end only if it matches the head file.

        With `link`, the first new line must follow `start` (else False: the file is not the one
        this process last saw, and the caller starts over from the segment's start)."""
        frontier, last, count = start.frontier.copy(), None, start.frontier.size
        nodes, first_leaf = bytearray(), start.frontier.size
        try:
            with self._path.open("rb") as fh:
                fh.seek(start.offset)
                remaining = size - start.offset
                for raw in fh:
                    if remaining <= 0:
                        break
                    remaining -= len(raw)
                    line = raw[:-1] if raw.endswith(b"\n") else raw
                    if link and last is None:
                        try:
                            head = json.loads(line)
                        except ValueError:
                            return False
                        if not isinstance(head, dict) or (head.get("seq"), head.get("prev_hash")) != (
                            count + 1,
                            start.hash,
                        ):
                            return False
                    for node in frontier.append(leaf_hash(line)):
                        nodes += node
                    last, count = line, count + 1
                    if len(nodes) >= 1 << 20:
                        self._store(first_leaf, bytes(nodes))
                        first_leaf, nodes = count, bytearray()
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
        self._durable = (seq, hash_)  # read under the file lock, which writers hold until their fsync returned
        self._store(first_leaf, bytes(nodes))
        return True

    def _store(self, first: int, nodes: bytes) -> None:
        """Add nodes to the proof store; it is a cache, so a failure only costs proofs their speed."""
        if nodes:
            try:
                self._nodes.extend(first, nodes)
            except OSError as exc:
                log.warning("%s: node store not updated: %s", self._path, exc)

    def append(
        self,
        *,
        actor: str,
        action: str,
        resource: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Log one action; returns its record once an fsync covering it returned (group commit)."""
        # Round-trip so the record owns a plain copy and bad values fail before writing.
        detail_copy: dict[str, Any] = json.loads(canonical_json(dict(details or {})))
        pending = _Pending(actor, action, resource, detail_copy)
        with self._queue_lock:
            self._queue.append(pending)
            lead = not self._leading  # no group being written: the queue was empty, this caller writes one now
            self._leading = True
        if not lead:
            pending.wake.wait()  # woken once: written, failed, or first in the queue when the last group ended
        if not pending.done:
            self._lead(pending)
        if pending.error is not None:
            with self._queue_lock:
                self.append_failures += 1
            raise pending.error
        assert pending.record is not None
        return pending.record

    @property
    def refusing(self) -> bool:
        """Whether an append failed and every later one is refused until the trail is reopened."""
        return self._failed

    def _lead(self, pending: _Pending) -> None:
        """Write the next group (`pending` is first in the queue, so in it) and hand the lead on as soon as
        its lines are written, so the next group is prepared while this one's fsync runs. Each waiting
        caller is woken exactly once: when its group is durable, or to lead (no thundering herd)."""
        with self._queue_lock:
            batch, self._queue = self._queue[:_GROUP_MAX], self._queue[_GROUP_MAX:]
        handed = [False]

        def hand_off() -> None:
            if not handed[0]:
                handed[0] = True
                with self._queue_lock:
                    if self._queue:
                        self._queue[0].wake.set()  # it leads the next group
                    else:
                        self._leading = False

        try:
            self._commit(batch, hand_off)
        finally:
            hand_off()
            for p in batch:
                if p is not pending:
                    p.wake.set()

    def _fail(self, batch: list[_Pending], message: str) -> None:
        self._failed = True
        for p in batch:
            p.error = AuditError(f"{self._path}: {message}")

    def _commit(self, batch: list[_Pending], hand_off: Callable[[], None]) -> None:
        """Write `batch` as one group; every member gets its record, once an fsync covered it, or an error.

        Pipelined: the lines are prepared (JSON, hashes, Merkle nodes) while the previous group's
        fsync still runs under the file lock; once they are written the in-process lock and the lead
        are released, and this group's fsync and head update run while the next group is prepared.
        A process with the signer prepares before it holds the file lock (no other process signs, and
        its own checkpoints take the in-process lock first, so no checkpoint falls between a record's
        time and its write); any other process stamps its records under the file lock."""
        self._lock.acquire()
        held = True
        try:
            if self._failed:
                self._fail(batch, "an earlier append failed; reopen after checking")
                return
            ready = self._prepare(batch) if self._signer is not None else None
            self._lock_file()
            locked = _Locked(-1)
            try:
                locked.fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                if self._failed:  # the group before this one failed its fsync while this one waited
                    self._fail(batch, "an earlier append failed; reopen after checking")
                    return
                self._sync(locked)
                self._maybe_seal(locked)
                if ready is None or ready.after != self._state_key():
                    ready = self._prepare(batch)
                view = memoryview(ready.data)
                while view:
                    view = view[os.write(locked.fd, view) :]
                first_leaf, opened = self._frontier.size, self._size == 0
                self._seq, self._hash, self._frontier = ready.seq, ready.hash, ready.frontier
                self._size += len(ready.data)
                if opened:
                    self._first_ts = ready.records[0].ts
                self._ensure_checkpointer()
                self._lock.release()
                held = False
                hand_off()
                os.fsync(locked.fd)
                _write_head(self._path, seq=ready.seq, hash_=ready.hash)
                if opened and self._last_seal is not None:
                    fsync_dir(self._path.parent)  # the new segment's directory entry, before any record is acknowledged
                self._durable = (ready.seq, ready.hash)
                self._store(first_leaf, ready.nodes)
            except (_Invalid, OSError):
                self._failed = True  # before the file lock is released: the next group must not write after it
                raise
            finally:
                if locked.fd >= 0:
                    os.close(locked.fd)
                self._unlock_file()
        except _Invalid as exc:  # another writer left the chain broken: stop, as on a failed append
            self._fail(batch, str(exc))
            return
        except OSError as exc:  # the file may now hold a partial or unsynced group
            self._fail(batch, f"append failed: {exc}")
            return
        finally:
            if held:
                self._lock.release()
        for p, record in zip(batch, ready.records[len(ready.records) - len(batch) :], strict=True):
            p.record = record

    def _state_key(self) -> tuple[int, int, int, str]:
        return self._ino, self._size, self._seq, self._hash

    def _prepare(self, batch: list[_Pending]) -> _Prepared:
        """The group's lines, records and Merkle nodes, chained onto this process's view of the log's end
        (the caller holds self._lock; `after` says which end, so a stale preparation is redone)."""
        frontier, seq, prev = self._frontier.copy(), self._seq, self._hash
        data, nodes, records = bytearray(), bytearray(), []
        items: list[tuple[str, str, str, dict[str, Any]]] = [(p.actor, p.action, p.resource, p.details) for p in batch]
        if self._size == 0 and self._last_seal is not None:  # a new segment starts by naming the file it follows
            seal = self._last_seal
            opened = {"sealed": seal.name, "first": seal.first, "last": seal.last, "sha256": seal.sha256}
            items.insert(0, ("audit", "audit.segment", seal.name, {**opened, "bytes": seal.size, "root": seal.root}))
        for actor, action, resource, details in items:
            content: dict[str, Any] = {
                "seq": seq + 1,
                "ts": utc_now(),
                "actor": actor,
                "action": action,
                "resource": resource,
                "details": details,
                "prev_hash": prev,
            }
            digest = _record_hash(content)
            line = canonical_json({**content, "hash": digest}).encode("utf-8")  # asdict would deep-copy details
            data += line + b"\n"
            for node in frontier.append(leaf_hash(line)):
                nodes += node
            seq, prev = seq + 1, digest
            records.append(AuditRecord(**content, hash=digest))
        return _Prepared(self._state_key(), bytes(data), bytes(nodes), records, seq, prev, frontier)

    # ---- segments -------------------------------------------------------------------------------
    def _may_seal(self) -> bool:
        # A signed log is sealed only by the process that holds its key (the app guard never seals).
        return self._policy is not None and (self._signer is not None or read_latest(self._path) is None)

    def _maybe_seal(self, locked: _Locked) -> None:
        """Seal the active segment first if it is past its size or month (the caller holds both locks)."""
        if self._size <= 0 or self._policy is None:
            return
        due = self._size >= self._policy.max_bytes
        if not due and self._policy.monthly:
            if self._first_ts is None:
                first = _first_line(self._path)
                self._first_ts = str(json.loads(first)["ts"]) if first else None
            due = self._first_ts is not None and self._first_ts[:7] != utc_now()[:7]
        if due and self._may_seal():
            self._seal(locked)

    def seal(self) -> Seal | None:
        """Seal the active segment now (None if it is empty); the next record starts a new one."""
        with self._lock:
            try:
                with self._exclusive() as locked:
                    self._sync(locked)
                    if self._size <= 0:
                        return None
                    return self._seal(locked)
            except _Invalid as exc:
                self._failed = True
                raise AuditError(f"{self._path}: {exc}") from None

    def _seal(self, locked: _Locked) -> Seal:
        """Write the seal (with a final signed checkpoint), move the file into the segments directory
        and open a new active file; the caller holds both locks."""
        size, digest = file_digest(self._path)
        if size != self._size:
            raise _Invalid(f"the active segment is {size} bytes, {self._size} were written (changed while locked)")
        first = _first_line(self._path)
        last = _last_line(self._path)
        if first is None or last is None:
            raise _Invalid("the active segment has no records to seal")
        sealed_at = utc_now()
        end = TreeState(self._frontier.copy(), 0, self._hash)
        statement = None
        if self._signer is not None:
            root = self._frontier.root().hex()
            statement = self._signer.sign(Checkpoint(self._signer.origin, self._seq, root, sealed_at))
        seal = Seal(
            name=segment_name(self._base.frontier.size + 1),
            first=self._base.frontier.size + 1,
            last=self._seq,
            size=size,
            sha256=digest,
            start=self._base,
            end=end,
            first_ts=str(json.loads(first)["ts"]),
            last_ts=str(json.loads(last)["ts"]),
            sealed_at=sealed_at,
            checkpoint=statement,
        )
        private_dir(segments_dir(self._path))
        write_seal(self._path, seal)
        os.rename(self._path, seal.file(self._path))
        fsync_dir(segments_dir(self._path))
        if statement is not None:
            write_latest(self._path, statement)
            self._saved = self._seq
        os.close(locked.fd)
        locked.fd = -1
        locked.fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fsync_dir(self._path.parent)
        self._base, self._last_seal, self._first_ts = end, seal, None
        self._ino, self._size = os.fstat(locked.fd).st_ino, 0
        log.info("%s: sealed segment %s (records %d..%d)", self._path, seal.name, seal.first, seal.last)
        return seal

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
                    with self._exclusive() as locked:
                        self._sync(locked)
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
        since; the point is still in the chain. A record still being written by another thread of this
        process (its fsync running) is not named before it is durable."""
        with self._lock:
            return self._durable

    def tree(self) -> tuple[int, str]:
        """``(size, root hex)`` of the Merkle tree over the records this process has seen."""
        with self._lock:
            return self._frontier.size, self._frontier.root().hex()

    def __len__(self) -> int:
        return self._seq


@dataclass(frozen=True)
class _Part:
    """One file of the log in order: a sealed segment (with its seal) or the active file (seal None)."""

    path: Path
    seal: Seal | None
    deleted: bool


def _parts(path: Path) -> tuple[list[_Part], TreeState]:
    """The log's files oldest first, each seal's start checked against the previous end; and the
    tree state where the active file starts. Raises _Invalid."""
    try:
        seals = read_seals(path)
    except ValueError as exc:
        raise _Invalid(f"segments: {exc}") from None
    state = TreeState(Frontier(), 0, GENESIS_HASH)
    parts: list[_Part] = []
    for seal in seals:
        if (seal.start.frontier.to_json(), seal.start.hash) != (state.frontier.to_json(), state.hash):
            raise _Invalid(
                f"segment {seal.name} does not start where the log before it ends (a segment removed or replaced)"
            )
        file = seal.file(path)
        deleted = not file.exists()
        if deleted and not seal.tombstone(path).exists():
            raise _Invalid(
                f"segment {seal.name} (records {seal.first}..{seal.last}) is missing and no retention sweep deleted it"
            )
        if deleted and parts and not parts[-1].deleted:
            raise _Invalid(f"segment {seal.name} was deleted before an older segment")
        parts.append(_Part(file, seal, deleted))
        state = seal.end
    parts.append(_Part(path, None, False))
    return parts, state


def log_start(path: Path) -> TreeState:
    """The tree state just before the first record the log still holds: the empty tree, or the end of
    the last segment a retention sweep deleted. Raises AuditError."""
    try:
        parts, _ = _parts(path)
    except _Invalid as exc:
        raise AuditError(f"{path}: {exc}") from None
    start = TreeState(Frontier(), 0, GENESIS_HASH)
    for part in parts:
        if part.deleted and part.seal is not None:
            start = part.seal.end
    return start


def seals(path: Path) -> list[Seal]:
    """The log's sealed segments, oldest first (AuditError if a seal is malformed)."""
    try:
        return read_seals(path)
    except ValueError as exc:
        raise AuditError(f"{path}: segments: {exc}") from None


def _lines(file: Path) -> Iterator[bytes]:
    if not file.exists():
        return
    with file.open("rb") as fh:
        for raw in fh:
            yield raw[:-1] if raw.endswith(b"\n") else raw


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Every line the log still holds, across its segments, with the seq it must carry; no checks
    (a reader such as `privacy.consistency` parses and checks the lines it needs)."""
    parts, _ = _parts_or_raise(path)
    seq = 0
    for part in parts:
        if part.deleted and part.seal is not None:
            seq = part.seal.last
            continue
        for line in _lines(part.path):
            seq += 1
            yield seq, line


def read_line(path: Path, seq: int) -> bytes | None:
    """The line of record `seq` (None if the log holds none), found by binary search over the byte
    offsets of the segment that holds it: O(log n) reads, no check (a proof's root checks it)."""
    parts, _ = _parts_or_raise(path)
    file = next((p.path for p in parts if p.seal is not None and p.seal.first <= seq <= p.seal.last), path)
    if not file.exists():
        return None

    def seq_of(line: bytes) -> int:
        raw = json.loads(line)
        return int(raw["seq"]) if isinstance(raw, dict) else -1

    with file.open("rb") as fh:
        lo, hi = 0, os.fstat(fh.fileno()).st_size  # lo: the start of a line numbered seq or less
        while hi - lo > _TAIL_CHUNK:
            mid = (lo + hi) // 2
            fh.seek(mid)
            fh.readline()
            start = fh.tell()
            line = fh.readline()
            if line and seq_of(line) <= seq:
                lo = start
            else:
                hi = mid
        fh.seek(lo)
        for raw in fh:
            found = seq_of(raw)
            if found == seq:
                return raw[:-1] if raw.endswith(b"\n") else raw
            if found > seq:
                return None
    return None


def _parts_or_raise(path: Path) -> tuple[list[_Part], TreeState]:
    try:
        return _parts(path)
    except _Invalid as exc:
        raise AuditError(f"{path}: {exc}") from None


def _check_opening(record: AuditRecord, previous: Seal) -> None:
    """A segment that starts with `audit.segment` must name the sealed file before it as sealed."""
    if record.action != "audit.segment":
        return
    named = {k: record.details.get(k) for k in ("sealed", "first", "last", "sha256")}
    if named != {"sealed": previous.name, "first": previous.first, "last": previous.last, "sha256": previous.sha256}:
        raise _Invalid(f"record {record.seq}: names another sealed segment than {previous.name} (segment replaced)")


def verify(path: Path, *, deep: bool = False) -> VerifyResult:
    """Check the log and its head file; never raises for a damaged log.

    A sealed segment is checked by its seal: its file's length and sha256, and its start and end
    tree states chaining to its neighbours'; only the active segment is parsed line by line (what
    a node does at start). With `deep`, every retained line is parsed, chained and hashed into the
    tree, and each seal's end state must be what its records give (`fedseek audit verify`).
    """
    records, last_hash, parsed, sealed, deleted = 0, GENESIS_HASH, 0, 0, 0
    try:
        parts, _ = _parts(path)
        previous: Seal | None = None
        frontier: Frontier | None = None
        for part in parts:
            seal = part.seal
            if seal is not None:
                sealed += 1
                if part.deleted:
                    deleted += 1
                    records, last_hash, previous, frontier = seal.last, seal.end.hash, seal, None
                    continue
                if not deep:
                    if file_digest(part.path) != (seal.size, seal.sha256):
                        raise _Invalid(f"segment {seal.name}: its file differs from its seal (edited after sealing)")
                    records, last_hash, previous, frontier = seal.last, seal.end.hash, seal, None
                    continue
            start_seq = seal.first - 1 if seal is not None else records
            if frontier is None:
                frontier = (seal.start if seal is not None else _active_start(parts)).frontier.copy()
            if start_seq != records:
                raise _Invalid(
                    f"segment {seal.name if seal else 'active'}: starts after record {start_seq}, not {records}"
                )
            for n, line in enumerate(_lines(part.path)):
                record = _parse_record(line.decode("utf-8"), where=_where(parts, part, n))
                _check_chain_link(record, seq=records + 1, prev_hash=last_hash)
                if n == 0 and previous is not None:
                    _check_opening(record, previous)
                frontier.append(leaf_hash(line))
                records, last_hash, parsed = record.seq, record.hash, parsed + 1
            if seal is not None:
                if (records, last_hash, frontier.root().hex()) != (seal.last, seal.end.hash, seal.root):
                    raise _Invalid(f"segment {seal.name}: its records do not give the end state its seal names")
                if file_digest(part.path) != (seal.size, seal.sha256):
                    raise _Invalid(f"segment {seal.name}: its file differs from its seal (edited after sealing)")
                previous = seal
        _check_head(path, records=records, last_hash=last_hash)
    except _Invalid as exc:
        return VerifyResult(False, records, str(exc), last_hash, parsed, sealed, deleted)
    except (OSError, UnicodeDecodeError) as exc:
        return VerifyResult(False, records, f"unreadable log: {exc}", last_hash, parsed, sealed, deleted)
    return VerifyResult(True, records, None, last_hash, parsed, sealed, deleted)


def _where(parts: list[_Part], part: _Part, n: int) -> str:
    return f"line {n + 1}" if len(parts) == 1 else f"{part.path.name} line {n + 1}"


def _active_start(parts: list[_Part]) -> TreeState:
    sealed = [p.seal for p in parts if p.seal is not None]
    return sealed[-1].end if sealed else TreeState(Frontier(), 0, GENESIS_HASH)


def scan(path: Path) -> Iterator[tuple[AuditRecord, bytes]]:
    """Each record the log still holds with its line (the Merkle leaf's data), across its segments, in
    order; the chain, each seal's end and at the end the head file checked; AuditError at the first
    fault. A missing log is an empty one. The first record follows `log_start(path)`."""
    records, last_hash = 0, GENESIS_HASH
    try:
        parts, _ = _parts(path)
        previous: Seal | None = None
        for part in parts:
            seal = part.seal
            if part.deleted and seal is not None:
                records, last_hash, previous = seal.last, seal.end.hash, seal
                continue
            for n, line in enumerate(_lines(part.path)):
                record = _parse_record(line.decode("utf-8"), where=_where(parts, part, n))
                _check_chain_link(record, seq=records + 1, prev_hash=last_hash)
                if n == 0 and previous is not None:
                    _check_opening(record, previous)
                records, last_hash = record.seq, record.hash
                yield record, line
            if seal is not None:
                if (records, last_hash) != (seal.last, seal.end.hash):
                    raise _Invalid(f"segment {seal.name}: its records end elsewhere than its seal says")
                previous = seal
        _check_head(path, records=records, last_hash=last_hash)
    except _Invalid as exc:
        raise AuditError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"unreadable log: {exc}") from None
