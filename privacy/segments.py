"""Sealed segments of the audit log: the files a long log rolls over into, and the seal of each.

The log a trail appends to (`audit.jsonl`) is its *active* segment. When it passes a size or a
month boundary the trail seals it: `<log>.segments/<first seq>.seal.json` records the segment's
first and last record, its byte length and sha256, the Merkle frontier and chain hash at its start
and end, and the final checkpoint the site's key signed over the whole tree up to its last record;
then the file moves to `<log>.segments/<first seq>.jsonl` and the next records go to a new active
file that continues the same chain and the same tree (the tree spans the whole log; a segment
carries the tree state it starts from). The new segment's first record, `audit.segment`, names the
sealed file's sha256, so the next checkpoint signs the digest of the file before it.

A segment deleted by a retention sweep (`privacy.retention`) leaves its seal and a tombstone
(`<first seq>.deleted.json`, naming the audited record that deleted it): the records after it still
verify from the seal's end state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.ops.atomic import write_atomic
from privacy.checkpoints import TreeState
from privacy.merkle import Frontier

__all__ = [
    "SEAL_FORMAT",
    "Seal",
    "file_digest",
    "read_seals",
    "segment_name",
    "segments_dir",
    "write_seal",
]

SEAL_FORMAT = "fedseek-audit-seal/1"
_CHUNK = 1 << 20


def segments_dir(log: Path) -> Path:
    return log.with_suffix(log.suffix + ".segments")


def segment_name(first: int) -> str:
    return f"{first:012d}"


def file_digest(path: Path) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _state_json(state: TreeState) -> dict[str, Any]:
    return {"frontier": state.frontier.to_json(), "hash": state.hash}


def _state(raw: Any) -> TreeState:
    if not isinstance(raw, Mapping):
        raise ValueError("tree state malformed")
    return TreeState(Frontier.from_json(raw.get("frontier")), 0, str(raw.get("hash")))


@dataclass(frozen=True)
class Seal:
    """A sealed segment: records `first..last`, `size` bytes with `sha256`, from tree state `start` to `end`."""

    name: str
    first: int
    last: int
    size: int
    sha256: str
    start: TreeState
    end: TreeState
    first_ts: str
    last_ts: str
    sealed_at: str
    checkpoint: dict[str, Any] | None

    def file(self, log: Path) -> Path:
        return segments_dir(log) / f"{self.name}.jsonl"

    def seal_file(self, log: Path) -> Path:
        return segments_dir(log) / f"{self.name}.seal.json"

    def tombstone(self, log: Path) -> Path:
        return segments_dir(log) / f"{self.name}.deleted.json"

    @property
    def root(self) -> str:
        return self.end.frontier.root().hex()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SEAL_FORMAT,
            "segment": self.name,
            "first": self.first,
            "last": self.last,
            "bytes": self.size,
            "sha256": self.sha256,
            "start": _state_json(self.start),
            "end": _state_json(self.end),
            "root": self.root,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "sealed_at": self.sealed_at,
            "checkpoint": self.checkpoint,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Seal:
        """ValueError unless `raw` is a well-formed, self-consistent seal."""
        if not isinstance(raw, Mapping) or raw.get("format") != SEAL_FORMAT:
            raise ValueError("not an audit segment seal")
        try:
            seal = cls(
                name=str(raw["segment"]),
                first=int(raw["first"]),
                last=int(raw["last"]),
                size=int(raw["bytes"]),
                sha256=str(raw["sha256"]),
                start=_state(raw["start"]),
                end=_state(raw["end"]),
                first_ts=str(raw["first_ts"]),
                last_ts=str(raw["last_ts"]),
                sealed_at=str(raw["sealed_at"]),
                checkpoint=raw["checkpoint"] if isinstance(raw["checkpoint"], dict) else None,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"seal malformed: {exc}") from None
        if seal.name != segment_name(seal.first) or seal.start.frontier.size != seal.first - 1:
            raise ValueError(f"seal {seal.name}: names another segment")
        if seal.end.frontier.size != seal.last or seal.last < seal.first or raw.get("root") != seal.root:
            raise ValueError(f"seal {seal.name}: end state does not match its records or root")
        return seal


def read_seals(log: Path) -> list[Seal]:
    """Every seal beside `log`, oldest first; ValueError naming the first malformed one."""
    folder = segments_dir(log)
    if not folder.is_dir():
        return []
    seals = []
    for path in sorted(folder.glob("*.seal.json")):
        try:
            seals.append(Seal.from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path.name}: {exc}") from None
    return sorted(seals, key=lambda s: s.first)


def write_seal(log: Path, seal: Seal) -> None:
    write_atomic(seal.seal_file(log), json.dumps(seal.to_json(), indent=1, sort_keys=True))
