"""Signed checkpoints of the audit log: (origin, tree size, root, time), signed with the site's node key.

A checkpoint commits the site to the first `size` records of its audit log (`privacy.merkle`
root over their lines). The site signs one at least every second while records arrive
(`privacy.audit.AuditTrail`'s checkpointer) and sends them to the coordinator, which keeps
them (`coordinator.witness`, kind `audit.checkpoint`): once a checkpoint is witnessed, a log
that is shorter, forks from it, or holds a record dated before it but not in it is caught
(`privacy.transparency`).

Beside the log (`<log>.checkpoint`) sits the latest signed checkpoint, and `<log>.tree` the
tree's frontier at some size with the byte offset where that size ends: what a restart resumes
from instead of rehashing the whole history. The tree file is a cache, trusted for speed only:
every verification recomputes roots from the log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from federation.ops.atomic import write_atomic
from federation.security.signed_statement import StatementError, sign_statement, verify_statement
from privacy.merkle import Frontier

__all__ = [
    "KIND",
    "Checkpoint",
    "CheckpointSigner",
    "TreeState",
    "checkpoint_path",
    "parse_checkpoint",
    "read_latest",
    "read_tree",
    "tree_path",
    "write_latest",
    "write_tree",
]

KIND = "audit.checkpoint"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def checkpoint_path(log: Path) -> Path:
    """The latest signed checkpoint, next to the log."""
    return log.with_suffix(log.suffix + ".checkpoint")


def tree_path(log: Path) -> Path:
    """The frontier cache, next to the log."""
    return log.with_suffix(log.suffix + ".tree")


def parse_time(text: str) -> datetime:
    """An ISO-8601 UTC time as the audit trail writes it (`...Z`)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Checkpoint:
    """What a signed checkpoint states: the first `size` records of `origin`'s log have `root`, at `time`."""

    origin: str
    size: int
    root: str
    time: str

    def payload(self) -> dict[str, Any]:
        return {"origin": self.origin, "size": self.size, "root": self.root, "time": self.time}

    @property
    def when(self) -> datetime:
        return parse_time(self.time)

    def describe(self) -> str:
        return f"{self.size} records at {self.time} (root {self.root[:12]})"

    @classmethod
    def from_payload(cls, raw: Mapping[str, Any]) -> Checkpoint:
        """Raises ValueError unless `raw` is a well-formed checkpoint payload."""
        origin, size, root, time = raw.get("origin"), raw.get("size"), raw.get("root"), raw.get("time")
        if not isinstance(origin, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("checkpoint: origin or size malformed")
        if not isinstance(root, str) or not _HEX64.fullmatch(root) or not isinstance(time, str):
            raise ValueError("checkpoint: root or time malformed")
        parse_time(time)
        return cls(origin=origin, size=size, root=root, time=time)


def parse_checkpoint(statement: object, *, key: ec.EllipticCurvePublicKey | None = None) -> Checkpoint:
    """The checkpoint a signed statement states; with `key`, only if `key` signed it. StatementError if not."""
    if key is not None:
        payload = verify_statement(statement, kind=KIND, key=key)
    elif (
        isinstance(statement, Mapping) and statement.get("kind") == KIND and isinstance(statement.get("payload"), dict)
    ):
        payload = dict(statement["payload"])
    else:
        raise StatementError(f"not a signed {KIND} statement")
    try:
        return Checkpoint.from_payload(payload)
    except ValueError as exc:
        raise StatementError(str(exc)) from None


@dataclass(frozen=True)
class CheckpointSigner:
    """The site's node key and name: what the audit trail signs its checkpoints with and as."""

    key: ec.EllipticCurvePrivateKey
    origin: str

    def sign(self, checkpoint: Checkpoint) -> dict[str, Any]:
        return sign_statement(KIND, checkpoint.payload(), key=self.key)


def read_latest(log: Path) -> dict[str, Any] | None:
    """The latest signed checkpoint statement beside `log`, or None (missing or unreadable)."""
    try:
        raw = json.loads(checkpoint_path(log).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def write_latest(log: Path, statement: Mapping[str, Any]) -> None:
    write_atomic(checkpoint_path(log), json.dumps(statement, sort_keys=True, separators=(",", ":")))


@dataclass(frozen=True)
class TreeState:
    """The frontier after `frontier.size` records, which end at byte `offset`, the last with chain `hash`."""

    frontier: Frontier
    offset: int
    hash: str


def read_tree(log: Path) -> TreeState | None:
    """The cached frontier, or None when missing or malformed (the caller rebuilds from the log)."""
    try:
        raw = json.loads(tree_path(log).read_text(encoding="utf-8"))
        state = TreeState(Frontier.from_json(raw["frontier"]), int(raw["offset"]), str(raw["hash"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if state.offset >= 0 else None


def write_tree(log: Path, state: TreeState) -> None:
    body = {"frontier": state.frontier.to_json(), "offset": state.offset, "hash": state.hash}
    write_atomic(tree_path(log), json.dumps(body, sort_keys=True, separators=(",", ":")))
