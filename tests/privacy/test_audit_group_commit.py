"""Group commit: concurrent appends share fsyncs, none is acknowledged before its fsync, and the
chain, head, Merkle frontier and node store stay exactly those of the lines, across threads and
writer processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import privacy.audit as audit_mod
from privacy.audit import AuditError, AuditTrail, SegmentPolicy, head_path, scan, verify
from privacy.checkpoints import CheckpointSigner, parse_checkpoint
from privacy.inspector import verify_proof
from privacy.merkle import leaf_hash, tree_root
from privacy.transparency import prove
from privacy.treestore import NodeStore, nodes_path

REPO = Path(__file__).resolve().parents[2]


def _root(path: Path) -> str:
    return tree_root([leaf_hash(line) for _, line in scan(path)]).hex()


def _hammer(trail: AuditTrail, threads: int, each: int) -> list[audit_mod.AuditRecord]:
    out: list[audit_mod.AuditRecord] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        for i in range(each):
            record = trail.append(actor="u", action="serve", resource="m", details={"k": k, "i": i})
            with lock:
                out.append(record)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    return out


def test_concurrent_appends_share_fsyncs_and_none_returns_before_its_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    real_fsync = os.fsync
    durable = {"seq": 0, "calls": 0}
    log_ino = os.stat(path).st_ino

    def slow_fsync(fd: int) -> None:
        threading.Event().wait(0.005)  # a slow disk, so that appenders pile up behind the leader
        real_fsync(fd)
        st = os.fstat(fd)
        if st.st_ino == log_ino and st.st_size:
            with path.open("rb") as fh:  # the log's descriptor is write-only
                fh.seek(max(0, st.st_size - 4096))
                tail = fh.read(st.st_size - fh.tell()).rstrip(b"\n").split(b"\n")[-1]
            durable["seq"] = max(durable["seq"], json.loads(tail)["seq"])
            durable["calls"] += 1

    monkeypatch.setattr(audit_mod.os, "fsync", slow_fsync)
    seen_late: list[int] = []
    real_append = trail.append

    def checked_append(**kwargs: object) -> audit_mod.AuditRecord:
        record = real_append(**kwargs)  # type: ignore[arg-type]
        if record.seq > durable["seq"]:
            seen_late.append(record.seq)  # acknowledged before the fsync that covers it
        return record

    monkeypatch.setattr(trail, "append", checked_append)
    records = _hammer(trail, threads=16, each=25)
    assert len(records) == 400 and sorted(r.seq for r in records) == list(range(1, 401))
    assert not seen_late
    assert durable["calls"] < 400 / 4, f"{durable['calls']} log fsyncs for 400 records: not grouped"
    result = verify(path, deep=True)
    assert result.ok and result.records == 400, result
    assert json.loads(head_path(path).read_text()) == {"seq": 400, "hash": result.head_hash}
    assert trail.tree() == (400, _root(path))
    assert AuditTrail(path).tree() == (400, _root(path))  # a fresh reader agrees (tree cache or rehash)


def test_a_failed_fsync_fails_every_append_of_its_group_and_the_trail_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    trail.append(actor="u", action="ok")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit_mod.os, "fsync", broken)
    errors: list[str] = []

    def work() -> None:
        try:
            trail.append(actor="u", action="lost")
        except AuditError as exc:
            errors.append(str(exc))

    workers = [threading.Thread(target=work) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert len(errors) == 8  # nobody is told a record is kept that no fsync covered
    monkeypatch.undo()
    with pytest.raises(AuditError, match="earlier append failed"):
        trail.append(actor="u", action="after")


_WRITER = """
import sys, threading
from pathlib import Path
from privacy.audit import AuditTrail, SegmentPolicy
trail = AuditTrail(Path(sys.argv[1]), segments=SegmentPolicy(max_bytes=int(sys.argv[3])))
def work(k):
    for i in range(int(sys.argv[2])):
        trail.append(actor=f"proc", action="serve", details={"k": k, "i": i})
ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
"""


def test_two_writer_processes_keep_one_chain_and_one_tree_across_seals(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    """The app guard appends from its own process while the node's signing trail seals segments."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, signer=CheckpointSigner(key, "site-a"), segments=SegmentPolicy(max_bytes=6000))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    other = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "60", "6000"], env=env, cwd=REPO)
    records = _hammer(trail, threads=4, each=60)
    assert other.wait(timeout=300) == 0
    trail.append(actor="u", action="last")  # takes the other process's lines into this process's frontier
    total = 1 + len(records) + 240 + 1
    seq, _ = trail.head()
    assert seq >= total  # plus the segment-opening records
    result = verify(path, deep=True)
    assert result.ok and result.records == seq and result.sealed >= 2, result
    assert trail.tree() == (seq, _root(path))
    assert NodeStore(nodes_path(path)).leaves() == seq
    trail.checkpoint()  # (None when the background signer already signed this size)
    statement = trail.latest_checkpoint()
    assert statement is not None
    signed = parse_checkpoint(statement, key=key.public_key())
    assert (signed.size, signed.root) == (seq, _root(path))
    proof = prove(path, seq // 2)
    assert verify_proof(proof, key.public_key()).startswith("OK: ")


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())
