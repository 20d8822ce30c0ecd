"""Audit trail: the chain round-trips and every kind of tampering is caught."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from privacy.audit import (
    GENESIS_HASH,
    AuditError,
    AuditTrail,
    canonical_json,
    head_path,
    sha256_hex,
    verify,
)


def _filled(tmp_path: Path, *, count: int = 4) -> Path:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    for i in range(count):
        trail.append(actor=f"user{i}", action="generate", resource="model", details={"i": i})
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


def test_append_and_verify_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    trail = AuditTrail(path)
    first = trail.append(actor="alice", action="generate", resource="deepseek", details={"tokens": 12})
    second = trail.append(actor="bob", action="explain")

    assert len(trail) == 2
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.hash
    assert first.ts.endswith("Z")
    line = _lines(path)[0].rstrip("\n")
    assert line == canonical_json(json.loads(line))
    assert first.hash == sha256_hex(canonical_json({k: v for k, v in json.loads(line).items() if k != "hash"}))
    assert json.loads(head_path(path).read_text()) == {"seq": 2, "hash": second.hash}
    result = verify(path)
    assert (result.ok, result.records, result.error, result.head_hash) == (True, 2, None, second.hash)


def test_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditTrail(path)
    assert verify(path).ok and verify(path).head_hash == GENESIS_HASH


def test_reopen_continues_chain(tmp_path: Path) -> None:
    path = _filled(tmp_path, count=3)
    last = json.loads(_lines(path)[-1])
    trail = AuditTrail(path)
    assert len(trail) == 3
    record = trail.append(actor="carol", action="generate")
    assert (record.seq, record.prev_hash) == (4, last["hash"])
    assert verify(path).ok and verify(path).records == 4


def test_details_are_copied_and_must_be_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    details = {"nested": [1, 2]}
    record = trail.append(actor="a", action="b", details=details)
    details["nested"].append(3)
    assert record.details == {"nested": [1, 2]}
    with pytest.raises(TypeError):
        trail.append(actor="a", action="b", details={"bad": object()})
    assert len(trail) == 1 and verify(path).records == 1


def _edit_field(path: Path) -> None:
    lines = _lines(path)
    raw = json.loads(lines[1])
    raw["actor"] = "mallory"
    lines[1] = canonical_json(raw) + "\n"
    _rewrite(path, lines)


def _edit_and_rehash(path: Path) -> None:
    lines = _lines(path)
    raw = json.loads(lines[1])
    raw["details"] = {"i": 99}
    raw["hash"] = sha256_hex(canonical_json({k: v for k, v in raw.items() if k != "hash"}))
    lines[1] = canonical_json(raw) + "\n"
    _rewrite(path, lines)


def _delete_middle(path: Path) -> None:
    lines = _lines(path)
    del lines[2]
    _rewrite(path, lines)


def _reorder(path: Path) -> None:
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _rewrite(path, lines)


def _truncate_tail(path: Path) -> None:
    _rewrite(path, _lines(path)[:-1])


def _remove_head(path: Path) -> None:
    head_path(path).unlink()


def _garbage_line(path: Path) -> None:
    lines = _lines(path)
    lines.insert(1, "{not json\n")
    _rewrite(path, lines)


TAMPERINGS: list[tuple[Callable[[Path], None], str]] = [
    (_edit_field, "record 2: hash mismatch (edited)"),
    (_edit_and_rehash, "record 3: prev_hash mismatch (deleted or reordered)"),
    (_delete_middle, "record 4: seq gap, expected 3 (deleted or reordered)"),
    (_reorder, "record 3: seq gap, expected 2 (deleted or reordered)"),
    (_truncate_tail, "truncated: head says 4 records, log has 3"),
    (_remove_head, "head file missing for non-empty log"),
    (_garbage_line, "line 2: malformed JSON"),
]


@pytest.mark.parametrize(("tamper", "error"), TAMPERINGS, ids=lambda x: getattr(x, "__name__", ""))
def test_tampering_is_detected(tmp_path: Path, tamper: Callable[[Path], None], error: str) -> None:
    path = _filled(tmp_path)
    tamper(path)
    result = verify(path)
    assert not result.ok
    assert result.error == error
    assert "\n" not in error


def _swap_last_two(path: Path) -> None:
    lines = _lines(path)
    lines[-1], lines[-2] = lines[-2], lines[-1]
    _rewrite(path, lines)


@pytest.mark.parametrize("tamper", [_truncate_tail, _remove_head, _swap_last_two])
def test_open_refuses_when_tail_does_not_match_head(tmp_path: Path, tamper: Callable[[Path], None]) -> None:
    """Opening only reads the tail, so it must still catch these cheaply."""
    path = _filled(tmp_path)
    tamper(path)
    with pytest.raises(AuditError):
        AuditTrail(path)


def test_open_refuses_edited_tail(tmp_path: Path) -> None:
    path = _filled(tmp_path)
    lines = _lines(path)
    lines[-1] = lines[-1].replace('"user3"', '"mallory"')
    _rewrite(path, lines)
    with pytest.raises(AuditError, match="hash mismatch"):
        AuditTrail(path)


def test_concurrent_appends_stay_consistent(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    threads, per_thread = 8, 25

    def worker(n: int) -> None:
        for i in range(per_thread):
            trail.append(actor=f"t{n}", action="generate", details={"i": i})

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

    total = threads * per_thread
    assert len(trail) == total
    assert [json.loads(line)["seq"] for line in _lines(path)] == list(range(1, total + 1))
    result = verify(path)
    assert result.ok and result.records == total


def test_two_writers_extend_one_chain(tmp_path: Path) -> None:
    """A site's app guard appends to the agent's trail from its own process (issue 13, finding 1):
    each writer continues from the other's last record instead of from what it saw at opening."""
    path = tmp_path / "audit.jsonl"
    agent, guard = AuditTrail(path), AuditTrail(path)  # two openings, as two processes have
    for i in range(3):
        agent.append(actor="agent", action="serve", details={"i": i})
        guard.append(actor="app-guard", action="clientapp.refused", details={"i": i})
    result = verify(path)
    assert result.ok and result.records == 6, result.error
    assert [json.loads(line)["actor"] for line in _lines(path)] == ["agent", "app-guard"] * 3


_GUARD_WRITER = """
import sys
from pathlib import Path
from privacy.audit import AuditTrail
trail = AuditTrail(Path(sys.argv[1]))
for i in range(150):
    trail.append(actor="app-guard", action="clientapp.refused", details={"i": i})
"""


def test_writer_processes_append_concurrently(tmp_path: Path) -> None:
    """Writers in other processes appending while this one does: one unbroken chain, head included."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    guards = [subprocess.Popen([sys.executable, "-c", _GUARD_WRITER, str(path)]) for _ in range(2)]
    mine = 0
    while any(g.poll() is None for g in guards) or mine < 10:
        trail.append(actor="agent", action="serve", details={"i": mine})
        mine += 1
    assert [g.wait(timeout=120) for g in guards] == [0, 0]
    result = verify(path)
    assert result.ok, result.error
    assert result.records == mine + 2 * 150
    assert [json.loads(line)["seq"] for line in _lines(path)] == list(range(1, result.records + 1))
