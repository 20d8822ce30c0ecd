"""`fedseek backup` / `fedseek restore` on a node state whose audit trail another process appends to
(with small segments, so segments are sealed while backups are taken): every backup restores to a
trail that verifies, with its head on its last record; a damaged backup is refused with one line
naming the file; a restore leaves a `state.restored` record in the restored trail."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from federation.ops.layout import NodeLayout
from privacy.audit import AuditTrail, SegmentPolicy, verify


def _fedseek(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv], capture_output=True, text=True, timeout=300
    )


def _appender(path: str, stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    trail = AuditTrail(Path(path), segments=SegmentPolicy(max_bytes=16_000, monthly=False))
    n = 0
    while not stop.is_set():
        n += 1
        trail.append(actor="test", action="model.call", resource="m", details={"n": n, "pad": "x" * 200})
    trail.close()


@pytest.fixture
def live_node(tmp_path: Path) -> tuple[Path, multiprocessing.synchronize.Event]:  # type: ignore[name-defined]
    state = tmp_path / "site"
    state.mkdir(mode=0o700)
    layout = NodeLayout(state)
    with sqlite3.connect(layout.ledger) as conn:
        conn.execute("CREATE TABLE spend (eps REAL)")
    return state, multiprocessing.get_context("spawn").Event()


def test_backups_of_a_live_audit_trail_restore_to_a_trail_that_verifies(
    tmp_path: Path,
    live_node: tuple[Path, multiprocessing.synchronize.Event],  # type: ignore[name-defined]
) -> None:
    state, stop = live_node
    audit = NodeLayout(state).audit
    writer = multiprocessing.get_context("spawn").Process(target=_appender, args=(str(audit), stop))
    writer.start()
    try:
        deadline = time.monotonic() + 120
        while not (audit.with_name(audit.name + ".segments")).is_dir():  # at least one sealed segment
            assert time.monotonic() < deadline and writer.is_alive(), "no segment sealed"
            time.sleep(0.1)
        counts = []
        for i in range(3):
            out = tmp_path / f"b{i}.tar"
            made = _fedseek("backup", "--state", str(state), "--out", str(out), "--json")
            assert made.returncode == 0, made.stderr
            restored = tmp_path / f"r{i}"
            back = _fedseek("restore", "--from", str(out), "--state", str(restored))
            assert back.returncode == 0, back.stderr
            result = verify(NodeLayout(restored).audit, deep=True)
            assert result.ok, result.error
            counts.append(result.records)
            last = json.loads(NodeLayout(restored).audit.read_text().splitlines()[-1])
            assert last["action"] == "state.restored" and last["details"]["files"] == json.loads(made.stdout)["files"]
        assert counts == sorted(counts) and counts[-1] > counts[0]  # taken from a trail that kept growing
    finally:
        stop.set()
        writer.join(60)


def test_a_damaged_backup_is_refused_in_one_line_naming_the_file(
    tmp_path: Path,
    live_node: tuple[Path, multiprocessing.synchronize.Event],  # type: ignore[name-defined]
) -> None:
    state, _ = live_node
    trail = AuditTrail(NodeLayout(state).audit)
    for n in range(5):
        trail.append(actor="test", action="model.call", details={"n": n})
    trail.close()
    out = tmp_path / "b.tar"
    assert _fedseek("backup", "--state", str(state), "--out", str(out)).returncode == 0
    raw = bytearray(out.read_bytes())
    with tarfile.open(out) as tar:
        member = tar.getmember("state/audit.jsonl")
    raw[member.offset_data + 10] ^= 0x01  # one bit of the audit trail, in place
    out.write_bytes(bytes(raw))
    cli = _fedseek("restore", "--from", str(out), "--state", str(tmp_path / "r"))
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [
        "fedseek: error: backup file state/audit.jsonl: sha256 does not match the manifest (damaged or altered)"
    ]
    assert not (tmp_path / "r").exists()
    again = _fedseek("restore", "--from", str(out), "--state", str(state), "--force")
    assert again.returncode == 2 and "state/audit.jsonl" in again.stderr  # checked before anything is replaced
    assert verify(NodeLayout(state).audit).ok
