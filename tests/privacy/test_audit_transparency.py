"""The audit trail as a transparency log: frontier, signed checkpoints, witness checks, proofs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import privacy.audit as audit_mod
from privacy.audit import AuditTrail, canonical_json, companion_paths, head_path, lock_path, scan
from privacy.checkpoints import (
    CheckpointSigner,
    checkpoint_path,
    parse_checkpoint,
    parse_time,
    read_tree,
    tree_path,
)
from privacy.inspector import Failed, verify_proof
from privacy.merkle import leaf_hash, tree_root
from privacy.transparency import prove, verify_witnessed
from privacy.treestore import nodes_path


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _signer(key: ec.EllipticCurvePrivateKey) -> CheckpointSigner:
    return CheckpointSigner(key=key, origin="site-a")


def _fill(trail: AuditTrail, count: int, *, start: int = 0) -> None:
    for i in range(start, start + count):
        trail.append(actor="u", action="serve", resource="m", details={"i": i})


def _root_of(path: Path) -> str:
    return tree_root([leaf_hash(line) for _, line in scan(path)]).hex()


def test_appends_keep_the_frontier_and_a_signed_checkpoint_follows(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, signer=_signer(key), interval_s=0.05)
    _fill(trail, 5)
    assert trail.tree() == (5, _root_of(path))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the background thread signs within an interval or so
        latest = trail.latest_checkpoint()
        if latest and latest["payload"]["size"] == 5:
            break
        time.sleep(0.05)
    checkpoint = parse_checkpoint(trail.latest_checkpoint(), key=key.public_key())
    assert (checkpoint.origin, checkpoint.size, checkpoint.root) == ("site-a", 5, _root_of(path))
    assert parse_time(json.loads(path.read_text().splitlines()[-1])["ts"]) <= checkpoint.when
    trail.close()
    assert read_tree(path) is not None and read_tree(path).frontier.size == 5  # type: ignore[union-attr]


def test_reopen_resumes_from_the_frontier_cache_without_rehashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    _fill(trail, 40)
    trail.checkpoint()  # caches the frontier at 40
    _fill(trail, 3, start=40)  # three more after the cache
    hashed: list[bytes] = []
    real = audit_mod.leaf_hash

    def counting(data: bytes) -> bytes:
        hashed.append(data)
        return real(data)

    monkeypatch.setattr(audit_mod, "leaf_hash", counting)
    reopened = AuditTrail(path)
    assert len(hashed) == 3  # only the records after the cache
    assert reopened.tree() == (43, _root_of(path))


def test_a_stale_or_forged_cache_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    _fill(trail, 6)
    trail.checkpoint()
    cache = json.loads(tree_path(path).read_text())
    cache["frontier"]["hashes"][0] = "00" * 32
    cache["hash"] = "11" * 32
    tree_path(path).write_text(json.dumps(cache))
    assert AuditTrail(path).tree() == (6, _root_of(path))


def test_another_writer_process_records_are_in_the_next_checkpoint(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    signing = AuditTrail(path, signer=_signer(key), interval_s=3600)
    other = AuditTrail(path)  # as the app guard's process would
    _fill(signing, 2)
    _fill(other, 2, start=2)
    statement = signing.checkpoint()
    assert statement is not None and statement["payload"]["size"] == 4
    assert statement["payload"]["root"] == _root_of(path)


def test_records_found_unsigned_at_start_are_noted_before_being_signed(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(AuditTrail(path), 3)  # written without the key (a crash before signing, or an insider)
    trail = AuditTrail(path, signer=_signer(key), interval_s=3600)
    last = json.loads(path.read_text().splitlines()[-1])
    assert (last["action"], last["details"]) == ("audit.unsigned_tail", {"first": 1, "last": 3, "checkpoint": False})
    assert trail.latest_checkpoint()["payload"]["size"] == 4  # type: ignore[index]


def _witnessed_log(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> tuple[Path, list[dict[str, object]]]:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, signer=_signer(key), interval_s=3600)
    witnessed = []
    for batch in range(3):
        _fill(trail, 4, start=4 * batch)
        statement = trail.checkpoint()
        assert statement is not None
        witnessed.append(statement)
    return path, witnessed


def test_an_untouched_log_holds_against_its_witnessed_checkpoints(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path, witnessed = _witnessed_log(tmp_path, key)
    report = verify_witnessed(path, witnessed=witnessed, key=key.public_key(), origin="site-a")
    assert report.ok, report.error
    assert (report.records, report.witnessed, report.covered) == (12, 3, 12)


def test_a_checkpoint_of_another_key_or_site_is_refused(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path, witnessed = _witnessed_log(tmp_path, key)
    stranger = ec.generate_private_key(ec.SECP384R1())
    report = verify_witnessed(path, witnessed=witnessed, key=stranger.public_key(), origin="site-a")
    assert not report.ok and "witnessed checkpoint 1" in str(report.error)
    report = verify_witnessed(path, witnessed=witnessed, key=key.public_key(), origin="site-b")
    assert not report.ok and "not 'site-b'" in str(report.error)


def test_without_the_key_an_unwitnessed_tail_is_reported_not_vouched_for(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path, witnessed = _witnessed_log(tmp_path, key)
    report = verify_witnessed(path, witnessed=witnessed[:2], key=None, origin="site-a")
    assert report.ok and report.covered == 8
    assert "records 9..12 not yet witnessed" in report.summary() and "NOT checked" in report.summary()


def test_inclusion_proof_checks_with_the_standalone_verifier(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path, _ = _witnessed_log(tmp_path, key)
    proof = prove(path, 7)
    assert proof["tree_size"] == 12 and len(proof["proof"]) == 4
    assert verify_proof(proof, key.public_key()).startswith("OK: record 7 (serve by u")
    edited = json.loads(proof["record"])
    edited["details"] = {"i": 99}
    edited["hash"] = audit_mod.sha256_hex(canonical_json({k: v for k, v in edited.items() if k != "hash"}))
    with pytest.raises(Failed, match="not in the log the site signed"):
        verify_proof({**proof, "record": canonical_json(edited)}, key.public_key())
    with pytest.raises(Failed, match="signature does not verify"):
        verify_proof(proof, ec.generate_private_key(ec.SECP384R1()).public_key())


def test_a_record_past_the_latest_checkpoint_cannot_be_proven_yet(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    from federation.errors import InvalidInput

    path, _ = _witnessed_log(tmp_path, key)
    AuditTrail(path).append(actor="u", action="serve")
    with pytest.raises(InvalidInput, match="retry after the next checkpoint"):
        prove(path, 13)


def test_files_beside_the_log(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path, _ = _witnessed_log(tmp_path, key)
    assert {p.name for p in tmp_path.iterdir()} == {
        path.name,
        head_path(path).name,
        checkpoint_path(path).name,
        tree_path(path).name,
        nodes_path(path).name,
        lock_path(path).name,
    }
    assert {p.name for p in tmp_path.iterdir()} == {path.name, *(p.name for p in companion_paths(path))}
