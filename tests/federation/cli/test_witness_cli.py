"""`fedseek budget --witness` and `fedseek witness ...` (in-process, real ledgers, audit trails and node keys).

A site's node signs its ledger head with its SuperNode key (`node.witness_statements`, the key
`ensure_auth_keypair` makes); the coordinator verifies it with the public key it registered and
records it (`coordinator.witness`). Afterwards the site's ledger file is held against that record:
exit 0 while it extends the witnessed head, exit 1 with one line once it was deleted, rolled back
or re-chained (ledger and audit trail together, which the node's own start-up check cannot see).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coordinator.witness import LedgerWitness, WitnessStore
from federation.cli.main import main
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.security.flower_auth import ensure_auth_keypair
from node.witness_statements import node_key_path, round_statements
from privacy.audit import AuditTrail, head_path
from privacy.ledger import Budget, PrivacyLedger, RoundPlan
from tests.privacy.insider import rechain

SITE = "site-a"
DATA = "a" * 64
PLAN = RoundPlan(noise_multiplier=5.0, sample_rate=0.01, steps=1, epsilon_after=0.0)


def _site_ledger(state: Path, *, data: str = DATA) -> PrivacyLedger:
    layout = NodeLayout(state)
    state.mkdir(parents=True, exist_ok=True)
    audit = AuditTrail(layout.audit)
    return PrivacyLedger(layout.ledger, budget=Budget(epsilon=1.0, delta=1e-5), dataset_sha256=data, audit=audit)


def _charge(ledger: PrivacyLedger, round: int) -> None:
    entry = ledger.charge(run_id="run", round=round, plan=PLAN, max_grad_norm=1.0)
    ledger.complete(entry.id, steps=1)


def _state_files(state: Path) -> list[Path]:
    """The ledger (with its WAL: committed rounds may sit there), the audit trail and its head file."""
    layout = NodeLayout(state)
    wal = [layout.ledger.with_name(layout.ledger.name + suffix) for suffix in ("-wal", "-shm")]
    return [layout.ledger, *wal, layout.audit, head_path(layout.audit)]


def _copy_state(src: Path, dst: Path) -> None:
    """What an insider's backup and restore of a site's state does: every file as it was, the rest gone."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in _state_files(dst):
        path.unlink(missing_ok=True)
    for path in _state_files(src):
        if path.exists():
            shutil.copy(path, dst / path.name)


@pytest.fixture
def consortium(tmp_path: Path) -> tuple[Path, Path, LedgerWitness]:
    """The site's node key (pki/site-a), the coordinator's copy of its public key, and its witness."""
    pki_dir = tmp_path / "pki"
    pair = ensure_auth_keypair(pki_dir / SITE)
    keys = tmp_path / "pki" / "site-keys"
    keys.mkdir()
    shutil.copy(pair.public_key, keys / f"{SITE}.pub")
    coord = CoordinatorLayout(tmp_path / "coord")
    witness = LedgerWitness(WitnessStore(coord.witness), site_keys_dir=keys, audit=AuditTrail(coord.audit))
    return pki_dir, coord.root, witness


def _budget(site_state: Path, coord: Path, *extra: str) -> int:
    return main(["budget", "--state", str(site_state), "--witness", str(coord), *extra])


def test_the_nodes_signed_head_is_what_the_coordinator_checks(
    tmp_path: Path, consortium: tuple[Path, Path, LedgerWitness]
) -> None:
    pki_dir, _, witness = consortium
    ledger = _site_ledger(tmp_path / "site")
    key = node_key_path(pki_dir, SITE)
    _charge(ledger, 1)
    (statement,) = round_statements(ledger, site=SITE, key_path=key)
    assert statement["kind"] == "ledger.head" and statement["payload"]["chain"] == [ledger.head().hash]
    claim = witness.witness(SITE, [statement], stage="readiness")
    assert claim.head == ledger.head().to_json()
    assert round_statements(ledger, site=SITE, key_path=tmp_path / "no-such.key") == []  # no key: nothing signed


def test_budget_witness_exit_codes(
    tmp_path: Path, consortium: tuple[Path, Path, LedgerWitness], capsys: pytest.CaptureFixture[str]
) -> None:
    pki_dir, coord, witness = consortium
    site = tmp_path / "site"
    ledger = _site_ledger(site)
    _charge(ledger, 1)
    _copy_state(site, tmp_path / "after-1")
    _charge(ledger, 2)
    witness.witness(SITE, round_statements(ledger, site=SITE, key_path=node_key_path(pki_dir, SITE)), stage="update")
    capsys.readouterr()

    assert _budget(site, coord) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("WITNESSED: site-a: the ledger (seq 2, epsilon ")

    _charge(ledger, 3)  # trained on since (a round the coordinator has not seen yet): still extends
    assert _budget(site, coord, "--site", SITE) == 0
    capsys.readouterr()

    _copy_state(tmp_path / "after-1", site)  # the insider restores ledger AND audit trail from a copy
    assert _budget(site, coord) == 1  # found by genesis: the ledger is older than the record
    shown = capsys.readouterr().out
    assert shown.splitlines()[-1].startswith("WITNESS REFUSED: site-a: ledger rolled back: head seq 1 ")
    assert "TRAINING REFUSED" not in shown  # ledger and audit trail agree: the node's own check is satisfied

    noise = PrivacyLedger.open_existing(NodeLayout(site).ledger).entries()[0].noise_multiplier
    rechain(NodeLayout(site).ledger, entries={1: {"noise_multiplier": noise / 2}})
    assert _budget(site, coord, "--site", SITE) == 1
    assert "ledger rolled back" in capsys.readouterr().out  # seq 1 < 2 still; the fork test is below

    for path in _state_files(site):
        path.unlink(missing_ok=True)
    assert _budget(site, coord, "--site", SITE) == 1
    last = witness.latest(SITE)
    assert last is not None
    assert capsys.readouterr().out.strip() == (
        f"WITNESS REFUSED: site-a: ledger missing, but the coordinator witnessed {last.describe()}"
    )
    assert last.describe().startswith("seq 2, epsilon ")

    _site_ledger(site)  # started afresh: a new genesis no operator accepted
    assert _budget(site, coord) == 1
    assert "was never witnessed by this coordinator" in capsys.readouterr().out
    assert _budget(site, coord, "--site", SITE) == 1
    assert "WITNESS REFUSED: site-a: ledger reset or replaced" in capsys.readouterr().out


def test_budget_witness_sees_a_rechained_ledger_of_the_same_length(
    tmp_path: Path, consortium: tuple[Path, Path, LedgerWitness], capsys: pytest.CaptureFixture[str]
) -> None:
    pki_dir, coord, witness = consortium
    site = tmp_path / "site"
    ledger = _site_ledger(site)
    _charge(ledger, 1)
    witness.witness(SITE, round_statements(ledger, site=SITE, key_path=node_key_path(pki_dir, SITE)), stage="update")
    rechain(ledger.path, entries={1: {"noise_multiplier": 50.0}})  # audit trail rebuilt to match: not modelled here
    assert _budget(site, coord, "--site", SITE) == 1
    assert "WITNESS REFUSED: site-a: ledger forked or re-chained: entry 1 hash" in capsys.readouterr().out


def test_accept_genesis_only_for_data_never_witnessed(
    tmp_path: Path, consortium: tuple[Path, Path, LedgerWitness], capsys: pytest.CaptureFixture[str]
) -> None:
    pki_dir, coord, witness = consortium
    ledger = _site_ledger(tmp_path / "old")
    witness.witness(SITE, round_statements(ledger, site=SITE, key_path=node_key_path(pki_dir, SITE)), stage="update")
    argv = ["witness", "accept-genesis", "--state", str(coord), "--site", SITE, "--operator", "olivia"]
    assert main([*argv, "--dataset-sha256", DATA]) == 2  # Conflict: the old data's fingerprint
    assert "data aaaaaaaaaaaa was already witnessed" in capsys.readouterr().err
    new = "b" * 64
    assert main([*argv, "--dataset-sha256", new]) == 0
    assert "accepted by olivia" in capsys.readouterr().out
    fresh = _site_ledger(tmp_path / "fresh", data=new)
    assert _budget(tmp_path / "fresh", coord, "--site", SITE) == 0  # the accepted new start extends the record
    witness.witness(SITE, round_statements(fresh, site=SITE, key_path=node_key_path(pki_dir, SITE)), stage="update")
    capsys.readouterr()
    assert main(["witness", "show", "--state", str(coord)]) == 0
    assert capsys.readouterr().out.strip().startswith("site-a: 2 heads witnessed; last seq 0")
    audit = CoordinatorLayout(coord).audit.read_text()
    assert '"action":"witness.genesis-refused"' in audit and '"action":"witness.genesis-accepted"' in audit
