"""`fedseek audit export`: a bundle an inspector verifies with nothing but what is in it.

The bundle holds the records dated in the asked period and every later one up to the latest
signed checkpoint (the seal), the Merkle frontier and chain hash just before the first of them
(which the seal's root authenticates: a wrong frontier cannot hash to it), the checkpoints the
coordinator witnessed inside that span, the site's public key, and `verify.py`
(`privacy/inspector.py`, standard library and `cryptography` only):

    manifest.json   what the bundle claims: origin, period, seq range, frontier, seal, witnessed,
                    and the sealed segments the records cross (each with its sha256 and final
                    signed checkpoint, both checked by the inspector)
    records.jsonl   the log's lines, unchanged, across its segments
    site.pub        the site's public node key
    verify.py       `python verify.py bundle .`
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from federation.errors import Conflict, InvalidInput
from federation.ops.atomic import private_dir, write_atomic
from federation.security.signed_statement import StatementError, load_public_key
from privacy.audit import AuditError, log_start, scan, seals
from privacy.checkpoints import parse_checkpoint, parse_time, read_latest
from privacy.merkle import leaf_hash

__all__ = ["export_bundle"]

INSPECTOR = Path(__file__).with_name("inspector.py")


def export_bundle(
    log: Path,
    out: Path,
    *,
    since: datetime,
    until: datetime,
    public_key: Path,
    witnessed: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Write the bundle for records dated in [since, until] to the new directory `out`; returns its manifest."""
    if out.exists() and any(out.iterdir()):
        raise Conflict(f"{out} is not empty; export into a new directory")
    key = load_public_key(public_key)
    statement = read_latest(log)
    try:
        seal = parse_checkpoint(statement, key=key)
    except StatementError as exc:
        raise InvalidInput(f"{log}: no checkpoint the key {public_key} signed to seal the export ({exc})") from None
    try:
        start = log_start(log)
        sealed = seals(log)
    except AuditError as exc:
        raise InvalidInput(f"{log}: {exc}") from None
    frontier, before_hash, first, last, lines = start.frontier.copy(), start.hash, 0, 0, []
    if start.frontier.size and since <= parse_time(next(s.last_ts for s in sealed if s.last == start.frontier.size)):
        raise InvalidInput(
            f"{log}: records 1..{start.frontier.size} were deleted by a retention sweep; export from a later date"
        )
    before: dict[str, Any] | None = None
    try:
        for record, line in scan(log):
            if record.seq > seal.size:
                break
            dated = parse_time(record.ts)
            if not first and dated >= since:
                first = record.seq
                before = {**frontier.to_json(), "hash": before_hash}
            if first:
                lines.append(line)
                if dated <= until:
                    last = record.seq
            frontier.append(leaf_hash(line))
            before_hash = record.hash
    except AuditError as exc:
        raise InvalidInput(f"{log}: hash chain broken, nothing exported: {exc}") from None
    if not first or not last or before is None:
        raise InvalidInput(f"{log}: no signed record dated {since.isoformat()}..{until.isoformat()}")
    if frontier.size != seal.size or frontier.root().hex() != seal.root:
        raise InvalidInput(f"{log}: the log does not match its own signed checkpoint (rewritten); nothing exported")
    inside = [
        dict(s)
        for s in witnessed
        if before["size"] < parse_checkpoint(s, key=key).size <= seal.size and parse_checkpoint(s).origin == seal.origin
    ]
    segments = [
        {
            "segment": s.name,
            "first": s.first,
            "last": s.last,
            "bytes": s.size,
            "sha256": s.sha256,
            "checkpoint": s.checkpoint,
        }
        for s in sealed
        if s.last >= first and s.first <= seal.size
    ]
    manifest = {
        "format": "fedseek-audit-bundle/1",
        "origin": seal.origin,
        "from": since.isoformat(),
        "to": until.isoformat(),
        "first_seq": first,
        "last_seq": last,
        "before": before,
        "records": "records.jsonl",
        "public_key": "site.pub",
        "seal": dict(statement or {}),
        "witnessed": inside,
        "segments": segments,
    }
    private_dir(out)
    write_atomic(out / "records.jsonl", b"".join(line + b"\n" for line in lines))
    write_atomic(out / "site.pub", public_key.read_bytes(), mode=0o644)
    shutil.copyfile(INSPECTOR, out / "verify.py")
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
