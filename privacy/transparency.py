"""A site's audit log held against the checkpoints it signed and the coordinator witnessed.

An insider who can write the site's disk can rewrite the log, its head file and its local
checkpoint together. What the site already sent its witness cannot be taken back, so
`verify_witnessed` refuses (one line) a log that:

- holds fewer records than a witnessed checkpoint (tail deleted, an older copy restored, the
  log emptied or removed);
- gives another Merkle root than a witnessed or signed checkpoint over the same records
  (history rewritten, re-chained, forked);
- holds a record dated before a signed checkpoint that does not hold it (a record inserted
  after the fact, back-dated to blend in);
- with the site's public key: ends in records no validly signed checkpoint covers (appended
  without the site's key, or signed less than a second ago), or carries a checkpoint the key
  did not sign.

`inclusion_proof` gives what an outsider needs to check that one record is in the log the site
signed (`privacy.inspector` checks it with nothing but the public key).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from federation.errors import InvalidInput
from federation.security.signed_statement import StatementError
from privacy.audit import AuditError, log_start, read_line, scan, seals
from privacy.checkpoints import Checkpoint, parse_checkpoint, parse_time, read_latest
from privacy.merkle import Frontier, ProofError, inclusion_proof, leaf_hash, root_from_inclusion
from privacy.treestore import NodeStore, nodes_path

__all__ = ["PROOF_FORMAT", "LogLeaves", "WitnessReport", "prove", "read_leaves", "verify_witnessed"]

PROOF_FORMAT = "fedseek-audit-inclusion/1"


class _Refused(Exception):
    """Internal: the one-line reason the log fails."""


@dataclass(frozen=True)
class WitnessReport:
    """Outcome of `verify_witnessed`; `covered` counts the records some signed checkpoint holds."""

    ok: bool
    records: int
    error: str | None
    witnessed: int
    covered: int
    root: str
    signatures_checked: bool

    def summary(self) -> str:
        if not self.ok:
            return f"FAILED: {self.error}"
        keyed = "signatures checked" if self.signatures_checked else "signatures NOT checked (no public key)"
        tail = "" if self.covered >= self.records else f"; records {self.covered + 1}..{self.records} not yet witnessed"
        return (
            f"OK: {self.records} records, root {self.root[:16]}, consistent with {self.witnessed} witnessed "
            f"checkpoint(s), {keyed}{tail}"
        )


@dataclass
class LogLeaves:
    """The log's Merkle leaves and record times, read once with the chain checked.

    A retention sweep may have deleted the oldest segments: then `start` is the tree's frontier
    before the first record still held (from its seal), and `leaves[0]` is leaf `start.size`."""

    leaves: list[bytes]
    times: list[datetime]
    lines: dict[int, bytes]  # only the lines asked for, by seq
    start: Frontier = field(default_factory=Frontier)
    sealed: dict[int, str] = field(default_factory=dict)  # tree size -> root, from the seals of deleted segments

    @property
    def count(self) -> int:
        return self.start.size + len(self.leaves)


def read_leaves(path: Path, *, keep: Sequence[int] = ()) -> LogLeaves:
    """Leaf hashes of every record (AuditError if the chain or head is broken); the lines of `keep` seqs."""
    start = log_start(path)
    out = LogLeaves([], [], {}, start.frontier.copy())
    out.sealed = {s.last: s.root for s in seals(path) if s.last <= start.frontier.size}
    wanted = set(keep)
    for record, line in scan(path):
        out.leaves.append(leaf_hash(line))
        out.times.append(parse_time(record.ts))
        if record.seq in wanted:
            out.lines[record.seq] = line
    return out


def _parse_all(
    statements: Sequence[Mapping[str, Any]], *, key: ec.EllipticCurvePublicKey | None, origin: str | None
) -> list[Checkpoint]:
    found = []
    for n, statement in enumerate(statements, start=1):
        try:
            checkpoint = parse_checkpoint(statement, key=key)
        except StatementError as exc:
            raise _Refused(f"witnessed checkpoint {n}: {exc}") from None
        if origin is not None and checkpoint.origin != origin:
            raise _Refused(f"witnessed checkpoint {n} is of {checkpoint.origin!r}'s log, not {origin!r}'s")
        found.append(checkpoint)
    return found


def _local(path: Path, *, key: ec.EllipticCurvePublicKey | None, origin: str | None) -> Checkpoint | None:
    """The checkpoint beside the log, if it can vouch for records: only with the key that must have signed it."""
    statement = read_latest(path)
    if statement is None or key is None:
        return None
    try:
        checkpoint = parse_checkpoint(statement, key=key)
    except StatementError as exc:
        raise _Refused(f"the log's own checkpoint: {exc} (forged or signed with another key)") from None
    if origin is not None and checkpoint.origin != origin:
        raise _Refused(f"the log's own checkpoint is of {checkpoint.origin!r}'s log, not {origin!r}'s")
    return checkpoint


def _hold(log: LogLeaves, witnessed: list[Checkpoint], local: Checkpoint | None) -> str:
    """Compare every checkpoint's root with the log's prefix of its size; returns the whole log's root."""
    count = log.count
    if witnessed:
        longest = max(witnessed, key=lambda c: c.size)
        if longest.size > count:
            raise _Refused(
                f"the log holds {count} records, fewer than the {longest.size} its site signed at {longest.time} "
                "and the coordinator witnessed: records deleted, or an older copy of the log restored"
            )
    if local is not None and local.size > count:
        raise _Refused(f"the log holds {count} records, fewer than its own signed checkpoint's {local.size}")
    checks: dict[int, list[tuple[str, Checkpoint]]] = {}
    for checkpoint in witnessed:
        checks.setdefault(checkpoint.size, []).append(("witnessed", checkpoint))
    if local is not None:
        checks.setdefault(local.size, []).append(("signed", local))
    for size, found in checks.items():  # inside segments a retention sweep deleted: only a seal can vouch
        for what, checkpoint in found:
            if size < log.start.size and size in log.sealed and log.sealed[size] != checkpoint.root:
                raise _Refused(
                    f"the log forks from the checkpoint {what} at {checkpoint.time}: the seal of its first {size} "
                    "records has another Merkle root (history rewritten)"
                )
    frontier = log.start.copy()
    for size in range(log.start.size, count + 1):
        if size > log.start.size:
            frontier.append(log.leaves[size - log.start.size - 1])
        for what, checkpoint in checks.get(size, ()):
            if frontier.root().hex() != checkpoint.root:
                raise _Refused(
                    f"the log forks from the checkpoint {what} at {checkpoint.time}: its first {size} records "
                    "have another Merkle root (history rewritten)"
                )
    return frontier.root().hex()


def _check_dates(log: LogLeaves, checkpoints: list[Checkpoint]) -> None:
    """No record outside a checkpoint may be dated before it: the checkpoint's time was read under the
    log's lock, so every later append is dated at or after it."""
    ordered = sorted(checkpoints, key=lambda c: c.size)
    latest: Checkpoint | None = None
    k = 0
    for index, when in enumerate(log.times, start=log.start.size):
        while k < len(ordered) and ordered[k].size <= index:
            if latest is None or ordered[k].when > latest.when:
                latest = ordered[k]
            k += 1
        if latest is not None and when < latest.when:
            raise _Refused(
                f"record {index + 1} is dated {when.isoformat()}, before the checkpoint signed at {latest.time} "
                f"that holds only {latest.size} records: inserted after the fact (forged append)"
            )


def verify_witnessed(
    path: Path,
    *,
    witnessed: Sequence[Mapping[str, Any]],
    key: ec.EllipticCurvePublicKey | None = None,
    origin: str | None = None,
) -> WitnessReport:
    """Hold the log at `path` against the site's witnessed checkpoint statements; never raises for a bad log.

    With `key` (the site's public node key) every statement's signature is checked, and the log's
    own latest checkpoint counts too: then records past every signed checkpoint are an error.
    """
    records, covered, root, count = 0, 0, "", len(witnessed)
    try:
        try:
            log = read_leaves(path)
        except AuditError as exc:
            raise _Refused(f"hash chain broken: {exc}") from None
        records = log.count
        checkpoints = _parse_all(witnessed, key=key, origin=origin)
        local = _local(path, key=key, origin=origin)
        root = _hold(log, checkpoints, local)
        signed = [*checkpoints, *([local] if local is not None else [])]
        _check_dates(log, signed)
        covered = max((c.size for c in signed), default=0)
        if key is not None and covered < records:
            raise _Refused(
                f"records {covered + 1}..{records} are in no checkpoint signed by the site's key: appended "
                "without it (forged append), or less than a second ago (verify again)"
            )
    except _Refused as exc:
        return WitnessReport(False, records, str(exc), count, covered, root, key is not None)
    return WitnessReport(True, records, None, count, covered, root, key is not None)


def prove(path: Path, seq: int, *, checkpoint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An inclusion proof of record `seq` in the tree a signed checkpoint states (by default the log's
    latest): everything an outsider needs besides the site's public key. InvalidInput if it cannot be made."""
    statement = checkpoint if checkpoint is not None else read_latest(path)
    if statement is None:
        raise InvalidInput(f"{path}: no signed checkpoint yet; a record can be proven once one is signed")
    try:
        signed = parse_checkpoint(statement)
    except StatementError as exc:
        raise InvalidInput(f"{path}: {exc}") from None
    if not 1 <= seq <= signed.size:
        raise InvalidInput(
            f"record {seq} is not in the signed checkpoint of {signed.size} records; retry after the next checkpoint"
        )
    fast = _prove_from_store(path, seq, signed)
    if fast is not None:
        line, path_hashes = fast
        return _proof(seq, line, signed, path_hashes, statement)
    try:
        log = read_leaves(path, keep=[seq])
    except AuditError as exc:
        raise InvalidInput(f"{path}: hash chain broken: {exc}") from None
    if log.start.size:
        raise InvalidInput(
            f"{path}: the node store is incomplete and records 1..{log.start.size} were deleted by retention"
        )
    if len(log.leaves) < signed.size:
        raise InvalidInput(f"{path}: holds {len(log.leaves)} records, fewer than its checkpoint's {signed.size}")
    leaves = log.leaves[: signed.size]
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    if frontier.root().hex() != signed.root:
        raise InvalidInput(f"{path}: the log does not match its own signed checkpoint (rewritten)")
    return _proof(seq, log.lines[seq], signed, inclusion_proof(leaves, seq - 1, signed.size), statement)


def _prove_from_store(path: Path, seq: int, signed: Checkpoint) -> tuple[bytes, list[bytes]] | None:
    """The record's line and audit path from the node store, in O(log² n) reads, if the store gives the
    signed root and the line hashes to its stored leaf; else None (the caller rehashes the log)."""
    try:
        leaf, hashes, root = NodeStore(nodes_path(path)).proof(seq - 1, signed.size)
        line = read_line(path, seq)
    except (OSError, ValueError, AuditError):
        return None
    if line is None or leaf_hash(line) != leaf or root.hex() != signed.root:
        return None
    try:  # the path itself must lead from the line to the signed root: the store is never trusted
        if root_from_inclusion(seq - 1, signed.size, leaf_hash(line), hashes).hex() != signed.root:
            return None
    except ProofError:
        return None
    return line, hashes


def _proof(
    seq: int, line: bytes, signed: Checkpoint, hashes: Sequence[bytes], statement: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "format": PROOF_FORMAT,
        "seq": seq,
        "leaf_index": seq - 1,
        "record": line.decode("utf-8"),
        "tree_size": signed.size,
        "proof": [h.hex() for h in hashes],
        "checkpoint": dict(statement),
    }
