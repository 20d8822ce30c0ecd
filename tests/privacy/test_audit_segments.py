"""Segments: roll-over by size and by month, seals, export across segments verified from the bundle
alone, incremental start-up verification, and the retention sweep."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import privacy.audit as audit_mod
from federation.errors import Conflict
from privacy.audit import AuditError, AuditTrail, SegmentPolicy, iter_lines, log_start, scan, seals, verify
from privacy.checkpoints import CheckpointSigner, parse_checkpoint, read_latest
from privacy.consistency import read_audit
from privacy.export import export_bundle
from privacy.merkle import leaf_hash, tree_root
from privacy.retention import sweep
from privacy.segments import file_digest
from privacy.transparency import prove, verify_witnessed

SMALL = SegmentPolicy(max_bytes=4000, monthly=True)


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _signer(key: ec.EllipticCurvePrivateKey) -> CheckpointSigner:
    return CheckpointSigner(key=key, origin="site-a")


def _fill(trail: AuditTrail, count: int, *, start: int = 0) -> None:
    for i in range(start, start + count):
        trail.append(actor="u", action="serve", resource="m", details={"i": i})


def _root(path: Path) -> str:
    return tree_root([leaf_hash(line) for _, line in scan(path)]).hex()


def _rolled(tmp_path: Path, key: ec.EllipticCurvePrivateKey, records: int = 60) -> tuple[Path, AuditTrail]:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, signer=_signer(key), segments=SMALL)
    _fill(trail, records)
    trail.checkpoint()
    return path, trail


def test_the_log_rolls_over_by_size_into_sealed_segments_of_one_chain_and_one_tree(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path, trail = _rolled(tmp_path, key)
    sealed = seals(path)
    assert len(sealed) >= 3
    seq, _ = trail.head()
    assert sealed[0].first == 1 and all(b.first == a.last + 1 for a, b in itertools.pairwise(sealed))
    records = [r for r, _ in scan(path)]
    assert [r.seq for r in records] == list(range(1, seq + 1))  # one chain across the files
    assert trail.tree() == (seq, _root(path))  # one tree across the files
    for seal in sealed:
        assert seal.file(path).stat().st_size == seal.size <= SMALL.max_bytes + 400
        assert file_digest(seal.file(path)) == (seal.size, seal.sha256)
        signed = parse_checkpoint(seal.checkpoint, key=key.public_key())  # the final checkpoint, signed
        assert (signed.size, signed.root) == (seal.last, seal.root)
        assert signed.root == tree_root([leaf_hash(line) for _, line in list(scan(path))[: seal.last]]).hex()
        opening = records[seal.last]  # the next segment starts by naming this file's digest
        assert opening.action == "audit.segment" and opening.details["sha256"] == seal.sha256
    assert verify(path, deep=True).ok
    report = verify_witnessed(path, witnessed=[s.checkpoint for s in sealed], key=key.public_key())
    assert report.ok, report.error


def test_a_new_month_starts_a_new_segment(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, signer=_signer(key), segments=SegmentPolicy(max_bytes=1 << 30))
    monkeypatch.setattr(audit_mod, "utc_now", lambda: "2026-11-30T23:59:59.000000Z")
    _fill(trail, 3)
    assert seals(path) == []
    monkeypatch.setattr(audit_mod, "utc_now", lambda: "2026-12-01T00:00:01.000000Z")
    _fill(trail, 2, start=3)
    (seal,) = seals(path)
    assert (seal.first, seal.first_ts[:7], seal.last_ts[:7]) == (1, "2026-11", "2026-11")
    assert all(json.loads(line)["ts"].startswith("2026-12") for line in path.read_bytes().splitlines())
    assert verify(path, deep=True).ok


def test_start_up_verification_parses_only_the_active_segment(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path, trail = _rolled(tmp_path, key, records=80)
    total, _ = trail.head()
    active = len(path.read_bytes().splitlines())
    quick = verify(path)
    assert quick.ok and quick.records == total
    assert quick.parsed == active < total / 3  # the sealed part is trusted by its seal and file digest
    deep = verify(path, deep=True)
    assert deep.ok and deep.parsed == total
    reopened = AuditTrail(path)  # opening reads only the active segment too, from the last seal's end
    assert reopened.tree() == (total, _root(path))
    # An edit inside a sealed segment, with the record's own hash fixed, is still caught at start.
    first = seals(path)[0].file(path)
    lines = first.read_bytes().splitlines()
    record = json.loads(lines[1])
    record["actor"] = "someone else"
    record["hash"] = audit_mod._record_hash(record)
    lines[1] = audit_mod.canonical_json(record).encode()
    first.write_bytes(b"\n".join(lines) + b"\n")
    broken = verify(path)
    assert not broken.ok and "differs from its seal" in (broken.error or "")
    assert not verify(path, deep=True).ok


def test_a_crash_between_seal_and_move_is_completed_on_open(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, signer=_signer(key), segments=SMALL)
    _fill(trail, 8)
    real_rename = os.rename

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "simulated crash before the move")

    monkeypatch.setattr(audit_mod.os, "rename", crash)
    with pytest.raises(AuditError):
        _fill(trail, 40, start=8)
    monkeypatch.setattr(audit_mod.os, "rename", real_rename)
    (pending,) = seals(path)
    assert not pending.file(path).exists() and path.exists()
    reopened = AuditTrail(path, signer=_signer(key), segments=SMALL)
    assert pending.file(path).exists()  # the move the crash interrupted
    _fill(reopened, 5, start=100)
    assert verify(path, deep=True).ok
    assert reopened.tree() == (reopened.head()[0], _root(path))


def test_export_across_two_segments_verifies_from_the_bundle_alone(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path, _trail = _rolled(tmp_path, key, records=50)
    sealed = seals(path)
    pub = tmp_path / "site.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    records = [r for r, _ in scan(path)]
    # from the middle of the first segment to the middle of the third: crosses two seals
    since = audit_mod_time(records[sealed[0].last // 2].ts)
    until = audit_mod_time(records[sealed[2].first + 1].ts)
    out = tmp_path / "bundle"
    manifest = export_bundle(path, out, since=since, until=until, public_key=pub)
    assert len(manifest["segments"]) >= 3
    alone = tmp_path / "elsewhere"
    shutil.copytree(out, alone)
    ok = subprocess.run(
        [sys.executable, "-I", str(alone / "verify.py"), "bundle", str(alone)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "segment(s) crossed" in ok.stdout and "whole sealed file(s) matched" in ok.stdout
    assert " 0 whole" not in ok.stdout
    # One record of a whole sealed segment changed (and re-hashed, and the chain mended after it) is caught.
    lines = (alone / "records.jsonl").read_bytes().splitlines()
    index = sealed[1].first - manifest["first_seq"] + 1
    record = json.loads(lines[index])
    record["resource"] = "forged"
    record["hash"] = audit_mod._record_hash(record)
    lines[index] = audit_mod.canonical_json(record).encode()
    (alone / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    bad = subprocess.run(
        [sys.executable, "-I", str(alone / "verify.py"), "bundle", str(alone)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 1 and bad.stdout.startswith("FAILED:"), bad.stdout


def audit_mod_time(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_retention_sweep_refuses_unsealed_and_recent_segments_and_deletes_old_ones_on_the_record(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path, trail = _rolled(tmp_path, key, records=60)
    sealed = seals(path)
    with pytest.raises(Conflict, match="not sealed"):
        sweep(trail, segments=["999999999999"])
    active_first = f"{log_start(path).frontier.size + sealed[-1].last + 1:012d}"
    with pytest.raises(Conflict, match="not sealed"):
        sweep(trail, segments=[active_first])
    with pytest.raises(Conflict, match="within the 6-year retention period"):
        sweep(trail, segments=[sealed[0].name])
    assert sweep(trail).deleted == []  # nothing is old enough
    later = datetime.now(UTC) + timedelta(days=6 * 366)
    with pytest.raises(Conflict, match="oldest first"):
        sweep(trail, segments=[sealed[1].name], now=later)
    before = trail.head()[0]
    result = sweep(trail, segments=[sealed[0].name, sealed[1].name], now=later)
    assert result.deleted == [sealed[0].name, sealed[1].name] and result.record_seq == before + 1
    record = next(r for r, _ in scan(path) if r.seq == result.record_seq)
    assert record.action == "audit.retention"
    assert [d["segment"] for d in record.details["deleted"]] == result.deleted
    for seal in sealed[:2]:
        assert not seal.file(path).exists() and seal.seal_file(path).exists() and seal.tombstone(path).exists()
    # The rest still verifies from the last deleted segment's seal.
    assert log_start(path).frontier.size == sealed[1].last
    quick, deep = verify(path), verify(path, deep=True)
    assert quick.ok and deep.ok and deep.deleted == 2, deep
    assert next(seq for seq, _ in iter_lines(path)) == sealed[1].last + 1
    assert read_audit(path).refs == {}  # the ledger reader reads across what is kept
    trail.checkpoint()  # the sweep's own record, signed
    statement = read_latest(path)
    assert statement is not None and parse_checkpoint(statement).size == result.record_seq
    report = verify_witnessed(path, witnessed=[s.checkpoint for s in sealed], key=key.public_key())
    assert report.ok, report.error
    assert prove(path, sealed[2].first)["seq"] == sealed[2].first
    # A segment removed outside a sweep is not a retention deletion.
    sealed[2].file(path).unlink()
    broken = verify(path)
    assert not broken.ok and "no retention sweep deleted it" in (broken.error or "")


def test_a_trail_that_does_not_hold_the_key_never_seals_a_signed_log(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path, trail = _rolled(tmp_path, key, records=5)
    count = len(seals(path))
    guard = AuditTrail(path, segments=SMALL)  # the app guard's process: no node key
    _fill(guard, 60, start=5)
    assert len(seals(path)) == count == 0 and path.stat().st_size > SMALL.max_bytes
    _fill(trail, 1, start=99)  # the node's trail, which holds the key, seals at its next append
    assert len(seals(path)) == 1 and verify(path, deep=True).ok


def _fedseek(*argv: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_the_cli_verifies_sweeps_and_exports_a_segmented_log(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path, _trail = _rolled(tmp_path, key, records=40)
    sealed = seals(path)
    ok = _fedseek("audit", "verify", path)
    assert ok.returncode == 0 and f"{len(sealed)} sealed segment(s)" in ok.stdout, ok.stdout + ok.stderr
    assert _fedseek("audit", "verify", path, "--quick").returncode == 0
    refused = _fedseek("audit", "sweep", path, "--segment", sealed[0].name)
    assert refused.returncode != 0 and "within the 6-year retention period" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    dry = _fedseek("audit", "sweep", path, "--dry-run")
    assert dry.returncode == 0 and "nothing to delete" in dry.stdout
    assert all(s.file(path).exists() for s in sealed)
    pub = tmp_path / "site.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    day = datetime.now(UTC).date().isoformat()
    out = tmp_path / "bundle"
    exported = _fedseek("audit", "export", path, "--from", day, "--to", day, "--out", out, "--key", pub)
    assert exported.returncode == 0, exported.stderr
    checked = subprocess.run(
        [sys.executable, "-I", str(out / "verify.py"), "bundle", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0 and f"{len(sealed)} whole sealed file(s) matched" in checked.stdout, checked.stdout
    # A sealed file edited after sealing fails the CLI's check.
    sealed[0].file(path).write_bytes(sealed[0].file(path).read_bytes().replace(b'"serve"', b'"SERVE"', 1))
    tampered = _fedseek("audit", "verify", path, "--quick")
    assert tampered.returncode == 1 and "differs from its seal" in tampered.stderr


def test_an_unsigned_log_such_as_the_coordinators_is_sealed_without_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, segments=SMALL)
    _fill(trail, 50)
    sealed = seals(path)
    assert sealed and all(s.checkpoint is None for s in sealed)
    result = verify(path, deep=True)
    assert result.ok and result.records == trail.head()[0] and result.sealed == len(sealed)
    assert AuditTrail(path, segments=SMALL).tree() == trail.tree() == (trail.head()[0], _root(path))
