"""The ledger held against the site's audit trail (issue 14, findings 1 and 2).

Each tampering an insider with write access to the state directory can do to the ledger
alone, done the way an insider would (with the ledger's own hash function, so the ledger's
internal check still passes), is refused with one line; the honest histories are accepted.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from privacy.audit import AuditTrail
from privacy.consistency import LedgerMismatch, check_ledger_against_audit, ledger_refusal, read_audit
from privacy.ledger import Budget, LedgerError, PrivacyLedger
from tests.privacy.insider import delete_last_row, rechain

RATE, STEPS = 0.01, 50
BUDGET = Budget(epsilon=1.0, delta=1e-5)
DATA = "sha256:" + "ab" * 32


@dataclass
class Site:
    ledger: PrivacyLedger
    audit: AuditTrail
    root: Path

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    def reopen(self, *, budget: Budget = BUDGET) -> PrivacyLedger:
        return PrivacyLedger(self.ledger_path, budget=budget, dataset_sha256=DATA, audit=self.audit)


def _site(root: Path, *, budget: Budget = BUDGET) -> Site:
    audit = AuditTrail(root / "audit.log")
    return Site(PrivacyLedger(root / "ledger.sqlite", budget=budget, dataset_sha256=DATA, audit=audit), audit, root)


def _train(site: Site, *, round_: int, rounds_left: int, complete: bool = True) -> None:
    """What a node's round does to the two chains: charge (the ledger records it), serve, complete, `train`."""
    ledger = site.ledger
    plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=rounds_left)
    entry = ledger.charge(run_id="run-1", round=round_, plan=plan, max_grad_norm=1.0)
    site.audit.append(actor="client", action="serve", resource="m", details={"prompt_hmac": "x"})
    if complete:
        ledger.complete(entry.id, steps=STEPS)
        site.audit.append(
            actor="coordinator", action="train", resource="run-1", details={"ledger": ledger.ref(entry.id)}
        )


def _trained(root: Path, rounds: int = 2) -> Site:
    site = _site(root)
    for r in range(rounds):
        _train(site, round_=r, rounds_left=3 - r)
    return site


def _refused(site_ledger: PrivacyLedger | None, audit: AuditTrail, match: str, **kw: Any) -> str:
    with pytest.raises(LedgerMismatch, match=match) as info:
        check_ledger_against_audit(site_ledger, audit, **kw)
    message = str(info.value)
    assert "\n" not in message and message.endswith("refusing to train")
    assert isinstance(info.value, LedgerError) and info.value.http_status == 409
    return message


# ---- the honest histories -----------------------------------------------------------------


def test_honest_history_is_accepted_and_the_head_commits_budget_delta_and_data(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    _train(site, round_=2, rounds_left=1, complete=False)  # a crash midway: charged, never completed
    check_ledger_against_audit(site.reopen(), site.audit, dataset_sha256=DATA)
    assert ledger_refusal(site.reopen(), site.audit, dataset_sha256=DATA) is None
    head = site.ledger.head()
    assert (head.seq, head.budget_epsilon, head.delta, head.dataset_sha256) == (3, 1.0, 1e-5, DATA)
    assert head.hash == site.ledger.chain().links[-1].hash and head.epsilon == pytest.approx(site.ledger.spent())
    actions = [json.loads(line)["action"] for line in site.audit.path.read_text().splitlines()]
    assert actions[0] == "ledger.genesis" and actions.count("ledger.charge") == 3 and actions.count("train") == 2


def test_a_charge_the_audit_trail_never_heard_of_only_over_counts_and_is_accepted(tmp_path: Path) -> None:
    """A crash between the ledger's commit and the audit append leaves an extra entry: accepted."""
    site = _trained(tmp_path, rounds=1)
    silent = PrivacyLedger(site.ledger_path, budget=BUDGET)  # no audit trail: charges unrecorded
    silent.charge(
        run_id="run-2", round=0, plan=silent.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=2), max_grad_norm=1.0
    )
    check_ledger_against_audit(site.reopen(), site.audit, dataset_sha256=DATA)


def test_tightened_budget_is_recorded_and_accepted(tmp_path: Path) -> None:
    site = _trained(tmp_path, rounds=1)
    tight = site.reopen(budget=Budget(epsilon=0.8, delta=1e-5))
    assert read_audit(site.audit.path).budgets[-1].epsilon == 0.8
    check_ledger_against_audit(tight, site.audit, dataset_sha256=DATA)


# ---- finding 1: the ledger deleted ------------------------------------------------------------


def test_deleted_ledger_with_recorded_training_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    spent = site.ledger.spent()
    site.ledger_path.unlink()
    message = _refused(None, site.audit, r"^ledger missing: the audit trail records 2 training rounds spending epsilon")
    assert f"{spent:.4f}" in message
    fresh = site.reopen()  # what a restart makes in its place: an empty ledger, its own genesis recorded
    assert fresh.spent() == 0.0
    _refused(fresh, site.audit, r"^ledger missing: the audit trail records 2 training rounds .* holds none of them")
    _refused(site.reopen(), site.audit, "ledger missing")  # and on every later start


def test_ledger_swapped_for_another_with_history_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path, rounds=1)
    other = _trained(tmp_path / "other", rounds=1)
    shutil.copy(other.ledger_path, site.ledger_path)
    _refused(site.reopen(), site.audit, r"^ledger replaced: the audit trail records 1 training round spending")


# ---- finding 2: the ledger edited and re-chained ----------------------------------------------


def test_row_deleted_and_head_reset_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    delete_last_row(site.ledger_path)
    ledger = site.reopen()  # the ledger's own check passes: the head matches what is left
    assert len(ledger.entries()) == 1
    _refused(
        ledger,
        site.audit,
        r"^ledger entries missing: the audit trail records 2 training rounds .* holds 1 \(rows deleted\)",
    )


def test_first_row_deleted_and_renumbered_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    rechain(site.ledger_path, deleted={1: {}})
    _refused(site.reopen(), site.audit, r"^ledger entries missing|^ledger entry 1 differs")


def test_noise_multiplier_edited_and_rechained_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    entry, spent = site.ledger.entries()[0], site.ledger.spent()
    rechain(site.ledger_path, entries={1: {"noise_multiplier": entry.noise_multiplier * 10}})
    ledger = site.reopen()  # its own chain verifies: the insider used its hash function
    assert ledger.spent() < spent
    _refused(
        ledger, site.audit, r"^ledger entry 1 differs from the audit trail's record of it .* edited and re-chained"
    )


def test_epsilon_rewritten_to_match_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    rechain(site.ledger_path, entries={1: {"epsilon_after": 0.01}, 2: {"epsilon_after": 0.0368}})
    _refused(site.reopen(), site.audit, r"^ledger entry 1 differs .* epsilon 0\.0100")


def test_budget_edited_and_rechained_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    loose = {"epsilon": 5.0, "delta": 1e-5, "accountant": "rdp"}
    rechain(
        site.ledger_path, genesis={"budget": loose}, entries={1: {"budget_epsilon": 5.0}, 2: {"budget_epsilon": 5.0}}
    )
    ledger = PrivacyLedger(site.ledger_path, budget=Budget(epsilon=5.0, delta=1e-5), audit=site.audit)
    _refused(
        ledger, site.audit, r"^ledger rewritten: its genesis says budget epsilon 5, .* recorded budget epsilon 1, "
    )


def test_budget_edited_before_any_training_is_refused(tmp_path: Path) -> None:
    site = _site(tmp_path)
    rechain(site.ledger_path, genesis={"budget": {"epsilon": 5.0, "delta": 1e-5, "accountant": "rdp"}})
    ledger = PrivacyLedger(site.ledger_path, budget=Budget(epsilon=5.0, delta=1e-5), audit=site.audit)
    _refused(ledger, site.audit, r"^ledger budget \(epsilon 5, delta 1e-05\) is looser than the audit trail recorded")


def test_stored_budget_loosened_after_a_tightening_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path, rounds=1)
    site.reopen(budget=Budget(epsilon=0.8, delta=1e-5))
    conn = sqlite3.connect(site.ledger_path)
    conn.execute(
        "UPDATE meta SET value = ? WHERE key = 'budget'",
        (json.dumps({"epsilon": 1.0, "delta": 1e-5, "accountant": "rdp"}),),
    )
    conn.commit()
    conn.close()
    _refused(
        site.reopen(),
        site.audit,
        r"^ledger budget \(epsilon 1, delta 1e-05\) is looser than the audit trail recorded \(epsilon 0\.8",
    )


def test_stored_budget_looser_than_the_chain_is_refused_by_the_ledger_itself(tmp_path: Path) -> None:
    site = _trained(tmp_path, rounds=1)
    conn = sqlite3.connect(site.ledger_path)
    conn.execute(
        "UPDATE meta SET value = ? WHERE key = 'budget'",
        (json.dumps({"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}),),
    )
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="looser than the chain's"):
        PrivacyLedger(site.ledger_path, budget=Budget(epsilon=3.0, delta=1e-5))


def test_fingerprint_edited_in_the_genesis_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    rechain(site.ledger_path, genesis={"dataset_sha256": "sha256:" + "cd" * 32})
    _refused(
        site.reopen(),
        site.audit,
        r"^ledger rewritten: .* data sha256:cdcdcdcdcdcd, the audit trail recorded .* data sha256:abababababab",
    )


def test_training_data_changed_since_the_ledger_was_made_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    _refused(
        site.reopen(),
        site.audit,
        r"^training data changed since the ledger was created",
        dataset_sha256="sha256:" + "ef" * 32,
    )


# ---- the audit trail touched instead ----------------------------------------------------------


def test_audit_trail_replaced_under_an_intact_ledger_is_refused(tmp_path: Path) -> None:
    site = _trained(tmp_path)
    site.audit.path.unlink()
    site.audit.path.with_suffix(".log.head").unlink()
    fresh = AuditTrail(tmp_path / "audit.log")
    _refused(site.reopen(), fresh, r"^ledger entry 1 follows audit record 1, which the audit trail does not hold")


def test_everything_deleted_is_a_fresh_site_locally(tmp_path: Path) -> None:
    """Both chains gone: nothing local is left to compare (only a coordinator witness catches it)."""
    _trained(tmp_path)
    for path in tmp_path.iterdir():
        path.unlink()
    check_ledger_against_audit(_site(tmp_path).ledger, AuditTrail(tmp_path / "audit.log"), dataset_sha256=DATA)
