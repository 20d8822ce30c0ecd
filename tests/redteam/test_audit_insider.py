"""Issue 16, the audit trail: an insider with write access to the site's state directory.

Before: the trail was a SHA-256 chain with its head file beside it, and `fedseek audit verify`
said OK to a forged append, a deleted tail, a rewritten history, a rollback to an earlier copy
and an empty log with no head: each re-chained with FedSeek's own hash function and its head
reset. Now the log is a Merkle tree whose checkpoints the site signs with its node key and the
coordinator witnesses; `fedseek audit verify LOG --witness COORD_STATE` (a real subprocess here)
exits 1 with one line for each attack, while the local check alone still passes most of them.

The log is written by a real `AuditTrail` signing with a real SuperNode key; its checkpoints are
witnessed by the coordinator's own code (`coordinator.audit_witness`, into the witness store
`fedseek audit verify` reads). The inclusion proof and the export bundle are checked by
`privacy/inspector.py` copied out of the source tree and run with `python -I`: no FedSeek import.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coordinator.audit_witness import witness_audit_checkpoint
from coordinator.witness import WitnessStore
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.signed_statement import load_private_key, load_public_key
from privacy.audit import GENESIS_HASH, AuditTrail, canonical_json, head_path, sha256_hex
from privacy.checkpoints import CheckpointSigner, checkpoint_path, tree_path

REPO = Path(__file__).resolve().parents[2]
BEFORE_ATTACK = 10  # witnessed; the rollback copy is taken here
WITNESSED = 15  # the latest checkpoint the coordinator holds
RECORDS = 18  # the last 3 signed locally, not yet sent (within the 60 s window)


@dataclass(frozen=True)
class Site:
    log: Path
    coord: Path
    site_keys: Path
    key_file: Path  # the node's private key: what only the strongest insider also holds
    snapshot: Path  # a copy of the state directory at BEFORE_ATTACK records


def _append(trail: AuditTrail, start: int, stop: int) -> None:
    for i in range(start, stop):
        trail.append(
            actor=f"clinician{i % 3}", action="serve", resource="deepseek", details={"prompt_hmac": f"{i:064x}"}
        )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    keys = ensure_auth_keypair(tmp_path / "pki" / "site-a")
    site_keys = tmp_path / "pki" / "site-keys"
    site_keys.mkdir()
    shutil.copy(keys.public_key, site_keys / "site-a.pub")
    log = NodeLayout(tmp_path / "state").audit
    log.parent.mkdir()
    coord = tmp_path / "coordinator"
    store = WitnessStore(CoordinatorLayout(coord).witness)
    public = load_public_key(keys.public_key)
    trail = AuditTrail(log, signer=CheckpointSigner(load_private_key(keys.private_key), "site-a"), interval_s=3600)
    _append(trail, 0, BEFORE_ATTACK)
    assert witness_audit_checkpoint(store, "site-a", [trail.checkpoint()], key=public) is not None
    snapshot = tmp_path / "snapshot"
    shutil.copytree(log.parent, snapshot)
    _append(trail, BEFORE_ATTACK, WITNESSED)
    assert witness_audit_checkpoint(store, "site-a", [trail.checkpoint()], key=public) is not None
    _append(trail, WITNESSED, RECORDS)
    trail.close()
    assert json.loads(checkpoint_path(log).read_text())["payload"]["size"] == RECORDS
    return Site(log, coord, site_keys, keys.private_key, snapshot)


def _fedseek(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )


def _verify(site: Site, *, witness: bool = True) -> subprocess.CompletedProcess[str]:
    extra: list[str | Path] = (
        ["--witness", site.coord, "--site", "site-a", "--site-keys", site.site_keys] if witness else []
    )
    return _fedseek("audit", "verify", site.log, *extra)


def _refused(site: Site, reason: str) -> None:
    """The local check alone is fooled; the witnessed one exits 1 with one line naming `reason`."""
    result = _verify(site)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("TAMPERED: site-a: "), result.stderr
    assert reason in lines[0], lines[0]


# ---- what the insider does, with FedSeek's own hash function -----------------------------------
def _records(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []


def _write_rechained(log: Path, records: list[dict[str, object]]) -> None:
    """Renumber, re-hash and re-chain every record, and reset the head: the chain check passes."""
    prev, lines = GENESIS_HASH, []
    for seq, record in enumerate(records, start=1):
        content = {**{k: v for k, v in record.items() if k != "hash"}, "seq": seq, "prev_hash": prev}
        prev = sha256_hex(canonical_json(content))
        lines.append(canonical_json({**content, "hash": prev}) + "\n")
    log.write_text("".join(lines), encoding="utf-8")
    head_path(log).write_text(canonical_json({"seq": len(records), "hash": prev}), encoding="utf-8")
    tree_path(log).unlink(missing_ok=True)


def _resign(site: Site) -> None:
    """The strongest insider also holds the node key: a fresh local checkpoint over the edited log."""
    signer = CheckpointSigner(load_private_key(site.key_file), "site-a")
    checkpoint_path(site.log).unlink(missing_ok=True)
    trail = AuditTrail(site.log, signer=signer, interval_s=3600)  # notes the unsigned tail, then signs
    trail.close()


def test_the_untouched_log_verifies_against_its_witness(site: Site) -> None:
    result = _verify(site)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"site-a: OK: {RECORDS} records") and "2 witnessed checkpoint(s)" in result.stdout
    assert "signatures checked" in result.stdout


def test_forged_append_without_the_node_key(site: Site) -> None:
    records = _records(site.log)
    records.append({**records[-1], "actor": "dr-x", "action": "serve", "ts": datetime.now(UTC).isoformat()})
    _write_rechained(site.log, records)
    assert _verify(site, witness=False).returncode == 0  # before: OK
    _refused(site, f"records {RECORDS + 1}..{RECORDS + 1} are in no checkpoint signed by the site's key")


def test_forged_append_backdated_with_the_node_key(site: Site) -> None:
    records = _records(site.log)
    records.append({**records[3], "actor": "dr-x", "details": {"prompt_hmac": "f" * 64}})  # dated as record 4
    _write_rechained(site.log, records)
    _resign(site)  # the insider signs it: only its date gives it away
    _refused(site, "before the checkpoint signed at")


def test_deleted_tail(site: Site) -> None:
    _write_rechained(site.log, _records(site.log)[:12])
    checkpoint_path(site.log).unlink()
    assert _verify(site, witness=False).returncode == 0
    _refused(site, f"the log holds 12 records, fewer than the {WITNESSED} its site signed")


def test_rewritten_history(site: Site) -> None:
    records = _records(site.log)
    records[2] = {**records[2], "actor": "someone-else"}
    _write_rechained(site.log, records)
    _resign(site)
    assert _verify(site, witness=False).returncode == 0
    _refused(site, "forks from the checkpoint witnessed")


def test_rollback_to_an_earlier_valid_copy(site: Site) -> None:
    shutil.rmtree(site.log.parent)
    shutil.copytree(site.snapshot, site.log.parent)
    assert _fedseek("audit", "verify", site.log).returncode == 0  # internally valid: chain, head, own checkpoint
    _refused(site, f"the log holds {BEFORE_ATTACK} records, fewer than the {WITNESSED}")


def test_empty_log_with_no_head(site: Site) -> None:
    for path in (head_path(site.log), checkpoint_path(site.log), tree_path(site.log)):
        path.unlink()
    site.log.write_text("")
    assert _verify(site, witness=False).returncode == 0
    _refused(site, f"the log holds 0 records, fewer than the {WITNESSED}")
    site.log.unlink()  # no log at all: the same
    _refused(site, f"the log holds 0 records, fewer than the {WITNESSED}")


def test_a_coordinator_refuses_a_checkpoint_that_goes_back(site: Site) -> None:
    """At the round: a site that restored an older log sends a checkpoint the witness refuses."""
    from coordinator.witness import WitnessRefused

    store = WitnessStore(CoordinatorLayout(site.coord).witness)
    older = json.loads((site.snapshot / checkpoint_path(site.log).name).read_text())
    with pytest.raises(WitnessRefused, match="audit log rolled back or cut"):
        witness_audit_checkpoint(store, "site-a", [older], key=load_public_key(site.site_keys / "site-a.pub"))


def _inspector(tmp_path: Path) -> Path:
    """The verifier outside the source tree, as an inspector receives it."""
    target = tmp_path / "inspector" / "verify.py"
    target.parent.mkdir()
    shutil.copy(REPO / "privacy" / "inspector.py", target)
    return target


def _run_isolated(script: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=script.parent,
        check=False,
    )


def test_an_inclusion_proof_checks_with_the_independent_verifier(site: Site, tmp_path: Path) -> None:
    proof = tmp_path / "proof.json"
    made = _fedseek("audit", "prove", site.log, "7", "--out", proof)
    assert made.returncode == 0, made.stderr
    verifier = _inspector(tmp_path)
    checked = _run_isolated(verifier, "proof", proof, "--key", site.site_keys / "site-a.pub")
    assert checked.returncode == 0, checked.stdout
    assert (
        checked.stdout.startswith("OK: record 7 (serve by clinician0 at ")
        and f"log of {RECORDS} records" in checked.stdout
    )

    forged = json.loads(proof.read_text())
    record = json.loads(forged["record"])
    record = {**record, "actor": "dr-x"}
    record["hash"] = sha256_hex(canonical_json({k: v for k, v in record.items() if k != "hash"}))
    forged["record"] = canonical_json(record)
    proof.write_text(json.dumps(forged))
    checked = _run_isolated(verifier, "proof", proof, "--key", site.site_keys / "site-a.pub")
    assert checked.returncode == 1 and "is not in the log the site signed" in checked.stdout


def test_a_sealed_segment_exported_verifies_from_the_bundle_alone(site: Site, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    day = datetime.now(UTC).date().isoformat()
    witness: list[str | Path] = ["--witness", site.coord, "--site", "site-a", "--site-keys", site.site_keys]
    made = _fedseek("audit", "export", site.log, "--from", day, "--to", day, "--out", bundle, *witness)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "records.jsonl", "site.pub", "verify.py"]
    moved = tmp_path / "inspector-copy"
    shutil.copytree(bundle, moved)  # nothing but the bundle, elsewhere
    checked = _run_isolated(moved / "verify.py", "bundle", moved)
    assert checked.returncode == 0, checked.stdout
    assert (
        checked.stdout.startswith(f"OK: records 1..{RECORDS}")
        and "2 witnessed checkpoint(s) consistent" in checked.stdout
    )

    records = _records(moved / "records.jsonl")
    records[4] = {**records[4], "actor": "someone-else"}
    _write_rechained(moved / "records.jsonl", records)  # re-chained inside the bundle
    checked = _run_isolated(moved / "verify.py", "bundle", moved)
    assert checked.returncode == 1 and checked.stdout.startswith("FAILED:"), checked.stdout


def test_a_log_the_coordinator_never_witnessed_is_not_a_pass(site: Site, tmp_path: Path) -> None:
    other = tmp_path / "another-coordinator"
    other.mkdir()
    result = _fedseek("audit", "verify", site.log, "--witness", other, "--site", "site-a")
    assert result.returncode == 1
    assert result.stderr.strip() == "NOT WITNESSED: site-a: the coordinator holds no audit checkpoint of this site"
