"""The audit log's retention sweep: sealed segments older than the retention period are deleted,
explicitly and on the record.

The deployment guide asks for every model call to be kept at least 6 years (`RETENTION_YEARS`,
configurable per call). A sweep deletes only *sealed* segments whose file still matches its seal,
whose last record is older than the period, and only the oldest first (what stays is one
contiguous tail of the log). Before a file is removed the sweep appends an `audit.retention` record
naming each segment (records, sha256, dates) and fsyncs it; each deleted segment keeps its seal
(the signed checkpoint and the tree state at its end, from which the rest of the log verifies)
and gains a tombstone naming that record. Anything else is refused with `Conflict`, one line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from federation.errors import Conflict, InvalidInput
from federation.ops.atomic import fsync_dir, write_atomic
from privacy.audit import AuditTrail, seals, utc_now
from privacy.checkpoints import parse_time
from privacy.segments import Seal, file_digest, segments_dir

__all__ = ["RETENTION_YEARS", "SweepResult", "cutoff", "sweep"]

RETENTION_YEARS = 6


def cutoff(now: datetime, years: int) -> datetime:
    """`now` minus `years` calendar years (29 February falls back to the 28th)."""
    try:
        return now.replace(year=now.year - years)
    except ValueError:
        return now.replace(year=now.year - years, day=28)


@dataclass(frozen=True)
class SweepResult:
    """What a sweep deleted (or, with `dry_run`, would delete), and the record that says so."""

    deleted: list[str]
    record_seq: int | None
    cutoff: str


def _eligible(log: Path, seal: Seal, *, before: datetime, years: int) -> str | None:
    """Why `seal`'s segment may not be deleted, or None."""
    if seal.tombstone(log).exists() or not seal.file(log).exists():
        return f"segment {seal.name} was already deleted"
    if file_digest(seal.file(log)) != (seal.size, seal.sha256):
        return f"segment {seal.name} differs from its seal; refusing to delete evidence of tampering"
    if parse_time(seal.last_ts) >= before:
        return (
            f"segment {seal.name} holds records until {seal.last_ts}, within the {years}-year retention period "
            f"(deletable after {cutoff(parse_time(seal.last_ts), -years).isoformat()})"
        )
    return None


def sweep(
    trail: AuditTrail,
    *,
    years: int = RETENTION_YEARS,
    segments: Sequence[str] = (),
    actor: str = "audit",
    now: datetime | None = None,
    dry_run: bool = False,
) -> SweepResult:
    """Delete the sealed segments past the retention period (or exactly `segments`, each of which must
    be); Conflict (one line) for an unsealed, altered or within-period segment, or one that would leave
    an older segment behind it."""
    if years < 1:
        raise InvalidInput(f"retention of {years} years: keep audit segments at least a year")
    log = trail.path
    now = now or datetime.now(UTC)
    before = cutoff(now, years)
    sealed = seals(log)
    by_name = {s.name: s for s in sealed}
    for name in segments:
        if name not in by_name:
            raise Conflict(f"segment {name} is not sealed (the active segment, or no such segment); nothing deleted")
    kept = [s for s in sealed if s.file(log).exists() and not s.tombstone(log).exists()]
    if segments:
        chosen = [s for s in kept if s.name in set(segments)]
        for s in [by_name[n] for n in segments]:
            reason = _eligible(log, s, before=before, years=years)
            if reason is not None:
                raise Conflict(f"{reason}; nothing deleted")
        if chosen != kept[: len(chosen)]:
            raise Conflict("segments are deleted oldest first: an older segment would be kept; nothing deleted")
    else:
        chosen = []
        for s in kept:
            if _eligible(log, s, before=before, years=years) is not None:
                break
            chosen.append(s)
    if dry_run or not chosen:
        return SweepResult([s.name for s in chosen], None, before.isoformat())
    record = trail.append(
        actor=actor,
        action="audit.retention",
        resource=str(log.name),
        details={
            "retention_years": years,
            "cutoff": before.isoformat(),
            "deleted": [
                {"segment": s.name, "first": s.first, "last": s.last, "sha256": s.sha256, "last_ts": s.last_ts}
                for s in chosen
            ],
        },
    )
    for s in chosen:
        tomb = {"segment": s.name, "record": record.seq, "record_hash": record.hash, "deleted_at": utc_now()}
        write_atomic(s.tombstone(log), json.dumps(tomb, sort_keys=True))
        s.file(log).unlink()
    fsync_dir(segments_dir(log))
    return SweepResult([s.name for s in chosen], record.seq, before.isoformat())
