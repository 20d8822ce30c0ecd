"""Per-partition privacy accounting (issue 14, "years of data") and the migration of format-2 ledgers.

A round names the partitions it sampled; each partition's epsilon composes only those rounds; a
spent partition retires and a new one arrives with the full budget, added only by the audited
`add_partition`, which never gives a fingerprint the ledger holds a fresh budget. A ledger written
by the previous code (one dataset, no partition entries) opens as one partition, never reset.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from federation.errors import InvalidInput
from privacy.audit import AuditTrail
from privacy.consistency import check_ledger_against_audit
from privacy.ledger import (
    Budget,
    BudgetExceeded,
    LedgerError,
    PartitionExists,
    PrivacyLedger,
    compose_epsilon,
)

BUDGET = Budget(epsilon=1.0, delta=1e-5)
A, B, C = ("sha256:" + c * 64 for c in "abc")
RATE, STEPS = 0.05, 20


def _ledger(root: Path, *, audit: AuditTrail | None = None) -> PrivacyLedger:
    return PrivacyLedger(root / "ledger.sqlite", budget=BUDGET, dataset_sha256=A, audit=audit)


def _round(
    ledger: PrivacyLedger, run: str, *, partitions: list[str] | None = None, share: float = 1.0
) -> tuple[str, ...]:
    plan = ledger.plan_round(
        sample_rate=RATE, steps=STEPS, rounds_left=1, run_id=run, share=share, partitions=partitions
    )
    ledger.complete(ledger.charge(run_id=run, round=1, plan=plan, max_grad_norm=1.0).id, steps=STEPS)
    return plan.partitions


def _epsilon(ledger: PrivacyLedger, sha: str) -> float:
    return next(a.epsilon for a in ledger.partitions() if a.sha256 == sha)


def test_each_partition_composes_only_the_rounds_that_sampled_it(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    assert _round(ledger, "r1", share=0.5) == (A,)
    ledger.add_partition(B, label="2025-02.jsonl")
    assert _round(ledger, "r2", partitions=[B], share=0.5) == (B,)  # A not sampled: its epsilon stays
    assert _round(ledger, "r3", share=0.5) == (A, B)
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries() if e.kind == "round"]
    assert _epsilon(ledger, A) == compose_epsilon([history[0], history[2]], budget=BUDGET)
    assert _epsilon(ledger, B) == compose_epsilon([history[1], history[2]], budget=BUDGET)
    assert ledger.spent() == max(_epsilon(ledger, A), _epsilon(ledger, B)) <= 1.0
    # composed over all three rounds, A alone would be charged for a round that never touched it
    assert compose_epsilon(history, budget=BUDGET) > _epsilon(ledger, A)
    report = ledger.to_json()
    assert [p["label"] for p in report["partitions"]] == ["", "2025-02.jsonl"]
    assert [len(p["trajectory"]) for p in report["partitions"]] == [2, 2]
    assert report["partitions"][0]["trajectory"][-1][1] == _epsilon(ledger, A)


def test_every_sampled_partition_stays_within_its_own_run_limit(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _round(ledger, "r1", share=0.5)  # A: about 0.5 spent
    ledger.add_partition(B)
    plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1, run_id="r2", share=0.5)
    a_before = _epsilon(ledger, A)
    epsilons = [
        compose_epsilon([*a.history, (plan.noise_multiplier, RATE, STEPS)], budget=BUDGET) for a in ledger.partitions()
    ]
    assert epsilons[0] <= a_before + 0.5 * (1 - a_before) + 1e-12  # A: half of what it had left
    assert epsilons[1] <= 0.5  # B: half of its full budget, and A's tighter limit sets the noise
    assert plan.epsilon_after == max(epsilons)


def test_a_spent_partition_retires_and_a_new_one_arrives_with_the_full_budget(tmp_path: Path) -> None:
    audit = AuditTrail(tmp_path / "audit.log")
    ledger = _ledger(tmp_path, audit=audit)
    _round(ledger, "all-of-a")  # share 1: A is spent
    (a,) = ledger.partitions()
    assert a.retired and a.epsilon >= 0.99
    with pytest.raises(BudgetExceeded, match=r"^privacy budget exhausted for this site: spent (0\.99|1\.00) of 1\.00"):
        ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1)
    ledger.add_partition(C, label="2025-03.jsonl")
    assert _round(ledger, "next", share=0.5) == (C,)  # only the new partition is sampled
    assert _epsilon(ledger, A) == a.epsilon and 0.45 <= _epsilon(ledger, C) <= 0.5
    _round(ledger, "rest-of-c")
    with pytest.raises(BudgetExceeded, match=r"all 2 data partitions are spent .*fedseek budget add-partition"):
        ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1)
    check_ledger_against_audit(ledger, audit, dataset_sha256=[A, C])


def test_a_fingerprint_the_ledger_holds_never_gets_a_fresh_budget(tmp_path: Path) -> None:
    audit = AuditTrail(tmp_path / "audit.log")
    ledger = _ledger(tmp_path, audit=audit)
    _round(ledger, "r1")
    ledger.add_partition(B, label="b.jsonl")
    entries = ledger.entries()
    for sha, where in ((A, "the ledger's genesis"), (B, "entry 2")):
        with pytest.raises(PartitionExists, match=rf"already in this ledger \({where}") as info:
            ledger.add_partition(sha, label="again.jsonl")
        assert info.value.http_status == 409 and "\n" not in str(info.value)
    with pytest.raises(InvalidInput):
        ledger.add_partition("not-a-fingerprint")
    assert ledger.entries() == entries  # nothing written
    records = [json.loads(line) for line in audit.path.read_text().splitlines()]
    refused = [r for r in records if r["action"] == "ledger.partition.refused"]
    assert [(r["actor"], r["details"]["partition"]) for r in refused] == [("operator", A), ("operator", B)]
    added = [r for r in records if r["action"] == "ledger.partition"]
    assert [(r["actor"], r["details"]["partition"], r["details"]["ledger"]["seq"]) for r in added] == [
        ("operator", B, 2)
    ]


def test_a_partition_entry_removed_and_rechained_is_refused(tmp_path: Path) -> None:
    from tests.privacy.insider import rechain

    audit = AuditTrail(tmp_path / "audit.log")
    ledger = _ledger(tmp_path, audit=audit)
    ledger.add_partition(B)
    _round(ledger, "r1", partitions=[B])
    rechain(ledger.path, deleted={1: {}})  # the insider drops B's registration: its round now names nothing held
    with pytest.raises(LedgerError, match="samples a partition the chain does not hold"):
        _ledger(tmp_path)


# ---- a ledger written by the previous format --------------------------------------------------


def _old_ledger_module() -> types.ModuleType:
    """The ledger code of format 2 (privacy/ledger.py before partitions, kept verbatim in format2_ledger.py)."""
    source = (Path(__file__).parent / "format2_ledger.py").read_text()
    module = types.ModuleType("format2_ledger")
    sys.modules["format2_ledger"] = module  # dataclasses resolve their module by name
    exec(compile(source, "format2_ledger.py", "exec"), module.__dict__)
    return module


def test_a_format_2_ledger_opens_as_one_partition_and_keeps_its_history(tmp_path: Path) -> None:
    old = _old_ledger_module()
    audit = AuditTrail(tmp_path / "audit.log")
    written = old.PrivacyLedger(
        tmp_path / "ledger.sqlite", budget=old.Budget(epsilon=1.0, delta=1e-5), dataset_sha256=A, audit=audit
    )
    for r in (1, 2):
        plan = written.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=3, run_id="old", share=0.5)
        entry = written.charge(run_id="old", round=r, plan=plan, max_grad_norm=1.0)
        if r == 1:
            written.complete(entry.id, steps=STEPS)
            audit.append(actor="coordinator", action="train", resource="old", details={"ledger": written.ref(entry.id)})
    old_head, old_spent = written.head(), written.spent()
    assert old_head.seq == 2 and written.chain().genesis.format == 2

    ledger = _ledger(tmp_path, audit=audit)  # the new code, on the old file
    assert not ledger.created
    (part,) = ledger.partitions()
    assert (part.sha256, part.rounds, part.epsilon) == (A, 2, old_spent)
    assert ledger.spent() == old_spent and ledger.head().hash == old_head.hash  # same chain, same hashes
    check_ledger_against_audit(ledger, audit, dataset_sha256=A)
    ledger.complete(2, steps=STEPS)  # the round charged under the old code completes under the new

    ledger.add_partition(B, label="2025-02.jsonl")  # the first write in format 3 adds the new columns
    with pytest.raises(PartitionExists):
        ledger.add_partition(A)  # the old data never gets a fresh budget
    sampled = _round(ledger, "new", share=0.5)
    assert set(sampled) <= {A, B} and B in sampled
    reopened = _ledger(tmp_path, audit=audit)
    assert [e.partitions for e in reopened.entries()][:2] == [(), ()]  # the old rows, as they were written
    assert reopened.entries()[0] == ledger.entries()[0] and _epsilon(reopened, A) >= old_spent
    check_ledger_against_audit(reopened, audit, dataset_sha256=[A, B])
