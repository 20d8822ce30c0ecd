"""Privacy ledger: real Opacus composition, budget enforcement and fail-closed integrity."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from dp_accounting import dp_event, pld, rdp
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.ledger import (
    Budget,
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    RoundPlan,
    compose_epsilon,
    read_budget,
)

RATE, STEPS = 0.01, 50
DELTA = 1e-5


def _ledger(tmp_path: Path, *, epsilon: float = 1.0, accountant: str = "rdp") -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "ledger.db", budget=Budget(epsilon=epsilon, delta=DELTA, accountant=accountant))


def _run_round(ledger: PrivacyLedger, *, round_: int, rounds_left: int) -> RoundPlan:
    plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=rounds_left)
    entry = ledger.charge(run_id="run-1", round=round_, plan=plan, max_grad_norm=1.0)
    ledger.complete(entry.id, steps=STEPS)
    return plan


def _rdp_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta=DELTA))


def test_plan_is_smallest_noise_within_equal_share(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=4, schedule="equal-epsilon")
    assert plan.epsilon_after <= 0.25
    assert plan.epsilon_after == _rdp_epsilon([(plan.noise_multiplier, RATE, STEPS)])
    assert _rdp_epsilon([(plan.noise_multiplier - 2e-3, RATE, STEPS)]) > 0.25
    assert ledger.entries() == []  # planning charges nothing


def test_constant_plan_is_the_least_noise_that_fits_every_round_left(tmp_path: Path) -> None:
    """The default schedule: one noise for this round and the 3 after it, the least at which all 4
    together stay within the budget; the plan's epsilon is this round's alone."""
    ledger = _ledger(tmp_path)
    plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=4)
    noise = plan.noise_multiplier
    assert _rdp_epsilon([(noise, RATE, STEPS)] * 4) <= 1.0 < _rdp_epsilon([(noise - 2e-3, RATE, STEPS)] * 4)
    assert plan.epsilon_after == _rdp_epsilon([(noise, RATE, STEPS)])
    equal = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=4, schedule="equal-epsilon")
    assert noise < equal.noise_multiplier and plan.epsilon_after > equal.epsilon_after  # round 1 is not starved
    assert ledger.entries() == []


def test_constant_schedule_keeps_one_noise_and_ends_at_the_budget(tmp_path: Path) -> None:
    """Four rounds re-planned one by one find the same noise; the run ends just under epsilon 1, as
    Google's dp-accounting recomputes it independently, with less noise in round 1 than equal steps use."""
    ledger = _ledger(tmp_path)
    plans = [_run_round(ledger, round_=r, rounds_left=4 - r) for r in range(4)]
    noises = [p.noise_multiplier for p in plans]
    assert max(noises) - min(noises) <= 2e-3, noises
    accountant = rdp.RdpAccountant()
    for p in plans:
        event = dp_event.PoissonSampledDpEvent(RATE, dp_event.GaussianDpEvent(p.noise_multiplier))
        accountant.compose(event, STEPS)
    independent = accountant.get_epsilon(DELTA)
    assert 0.98 <= ledger.spent() <= 1.0 and independent <= 1.0 + 1e-6
    other = _ledger(tmp_path / "equal")
    first_equal = other.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=4, schedule="equal-epsilon")
    assert noises[0] < first_equal.noise_multiplier


def test_an_unknown_schedule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="schedule"):
        _ledger(tmp_path).plan_round(sample_rate=RATE, steps=STEPS, rounds_left=2, schedule="front-loaded")


def test_two_rounds_compose_like_an_independent_accountant(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    first = _run_round(ledger, round_=0, rounds_left=2)
    second = _run_round(ledger, round_=1, rounds_left=1)
    expected = _rdp_epsilon([(first.noise_multiplier, RATE, STEPS), (second.noise_multiplier, RATE, STEPS)])
    assert ledger.spent() == pytest.approx(expected, rel=1e-12)
    assert ledger.entries()[-1].epsilon_after == pytest.approx(expected, rel=1e-12)
    assert expected <= 1.0
    assert expected < first.epsilon_after + _rdp_epsilon([(second.noise_multiplier, RATE, STEPS)])


def test_epsilon_after_increases_with_each_entry(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    for round_ in range(3):
        _run_round(ledger, round_=round_, rounds_left=5 - round_)
    epsilons = [entry.epsilon_after for entry in ledger.entries()]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3
    assert ledger.spent() == epsilons[-1] and ledger.spent() < 1.0


def test_exhausted_budget_refuses_and_leaves_entries_unchanged(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, epsilon=0.5)
    _run_round(ledger, round_=0, rounds_left=1)
    before = ledger.entries()
    with pytest.raises(BudgetExceeded, match=r"^privacy budget exhausted for this site: spent 0\.50 of 0\.50"):
        ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1, max_noise=2.0)
    greedy = RoundPlan(noise_multiplier=0.5, sample_rate=RATE, steps=STEPS, epsilon_after=0.0)
    with pytest.raises(BudgetExceeded, match="refusing charge"):
        ledger.charge(run_id="run-1", round=1, plan=greedy, max_grad_norm=1.0)
    tightened = _ledger(tmp_path, epsilon=ledger.spent())  # nothing at all remains
    with pytest.raises(BudgetExceeded, match=r"\(delta 1e-05\); refusing round$"):
        tightened.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1)
    assert ledger.entries() == tightened.entries() == before


def test_charge_rechecks_instead_of_trusting_the_plan(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1)
    ledger.charge(run_id="run-1", round=0, plan=plan, max_grad_norm=1.0)
    with pytest.raises(BudgetExceeded):  # the same plan again no longer fits
        ledger.charge(run_id="run-1", round=1, plan=plan, max_grad_norm=1.0)
    assert len(ledger.entries()) == 1


def test_max_noise_too_small_raises(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, epsilon=0.1)
    with pytest.raises(BudgetExceeded, match="noise 1 is not enough"):
        ledger.plan_round(sample_rate=1.0, steps=1000, rounds_left=1, max_noise=1.0)


def test_persists_across_reopen(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _run_round(ledger, round_=0, rounds_left=3)
    reopened = _ledger(tmp_path)
    assert reopened.entries() == ledger.entries()
    assert reopened.spent() == ledger.spent() > 0
    _run_round(reopened, round_=1, rounds_left=2)
    assert [e.id for e in _ledger(tmp_path).entries()] == [1, 2]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger with two completed rounds, built once and copied by each test."""
    directory = tmp_path_factory.mktemp("two_rounds")
    ledger = _ledger(directory)
    _run_round(ledger, round_=0, rounds_left=3)
    _run_round(ledger, round_=1, rounds_left=2)
    return directory / "ledger.db"


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE entries SET noise_multiplier = noise_multiplier * 10 WHERE id = 1",
        "UPDATE entries SET steps = 1 WHERE id = 2",
        "DELETE FROM entries WHERE id = 1",
        "DELETE FROM entries WHERE id = 2",
        "DELETE FROM meta WHERE key = 'head'",
    ],
)
def test_tampered_rows_fail_closed(two_rounds: Path, tmp_path: Path, sql: str) -> None:
    shutil.copy(two_rounds, tmp_path / "ledger.db")
    ledger = _ledger(tmp_path)
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        conn.execute(sql)
    conn.close()
    with pytest.raises(LedgerError):
        _ledger(tmp_path)
    with pytest.raises(LedgerError):  # an already-open ledger re-verifies on every read
        ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1)


def test_budget_cannot_be_raised_on_reopen(tmp_path: Path) -> None:
    _ledger(tmp_path, epsilon=1.0)
    with pytest.raises(LedgerError, match="looser than the stored lifetime budget"):
        _ledger(tmp_path, epsilon=2.0)
    assert _ledger(tmp_path, epsilon=0.5).budget.epsilon == 0.5  # tightening is stored
    with pytest.raises(LedgerError):
        _ledger(tmp_path, epsilon=1.0)
    with pytest.raises(LedgerError, match="accountant changed"):
        _ledger(tmp_path, epsilon=0.5, accountant="prv")


def test_complete_never_undercounts(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=2)
    entry = ledger.charge(run_id="run-1", round=0, plan=plan, max_grad_norm=1.0)
    spent = ledger.spent()
    with pytest.raises(LedgerError, match="only 50 were charged"):
        ledger.complete(entry.id, steps=STEPS + 1)
    done = ledger.complete(entry.id, steps=STEPS - 10)
    assert done == replace(entry, status="completed", steps_completed=STEPS - 10)
    assert ledger.entries() == [done]
    assert ledger.spent() == spent  # unused steps are not refunded
    with pytest.raises(LedgerError, match="already completed"):
        ledger.complete(entry.id, steps=STEPS)
    with pytest.raises(LedgerError, match="no ledger entry 7"):
        ledger.complete(7, steps=1)


def test_to_json(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    assert ledger.to_json()["epsilon_spent"] == 0.0
    _run_round(ledger, round_=0, rounds_left=2)
    report = ledger.to_json()
    assert set(report) == {
        "epsilon_spent",
        "epsilon_remaining",
        "delta",
        "budget_epsilon",
        "accountant",
        "entries",
        "partitions",
        "rdp_orders",
        "head",
    }
    assert report["head"]["seq"] == 1 and report["head"]["epsilon"] == report["epsilon_spent"]
    assert (report["delta"], report["budget_epsilon"], report["accountant"]) == (DELTA, 1.0, "rdp")
    assert report["epsilon_spent"] == ledger.spent()
    assert report["epsilon_remaining"] == pytest.approx(1.0 - ledger.spent())
    (entry,) = report["entries"]
    assert {
        "run_id", "round", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "accountant", "delta",
        "epsilon_after",
    } <= set(entry)  # fmt: skip
    assert entry["status"] == "completed" and entry["run_id"] == "run-1" and entry["ts"].endswith("Z")
    assert entry["epsilon_after"] == report["epsilon_spent"]
    assert (entry["steps"], entry["sample_rate"], entry["max_grad_norm"]) == (STEPS, RATE, 1.0)
    assert json.loads(json.dumps(report)) == report  # plain JSON, no NaN or infinity


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate": 0.0, "steps": STEPS, "rounds_left": 1},
        {"sample_rate": 1.5, "steps": STEPS, "rounds_left": 1},
        {"sample_rate": RATE, "steps": 0, "rounds_left": 1},
        {"sample_rate": RATE, "steps": STEPS, "rounds_left": 0},
    ],
)
def test_plan_validates_inputs(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        _ledger(tmp_path).plan_round(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"epsilon": 0.0}, {"epsilon": float("inf")}, {"delta": 0.0}, {"delta": 1.0}, {"accountant": "gdp"}]
)
def test_bad_budget_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(LedgerError):
        Budget(**kwargs)  # type: ignore[arg-type]


def test_prv_accountant_composes_history(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, accountant="prv")
    plan = _run_round(ledger, round_=0, rounds_left=2)
    independent = PRVAccountant()
    independent.history = [(plan.noise_multiplier, RATE, STEPS)]
    assert ledger.spent() == pytest.approx(independent.get_epsilon(delta=DELTA), rel=1e-9)
    both = PRVAccountant()  # the constant schedule: this round's noise in the round left too fits the budget
    both.history = [(plan.noise_multiplier, RATE, STEPS)] * 2
    assert ledger.spent() < both.get_epsilon(delta=DELTA) <= 1.0
    assert compose_epsilon([], budget=ledger.budget) == 0.0


# ---- durability, independent recomputation, damaged files -------------------------------


def test_commits_are_fsynced_in_wal_mode(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    with ledger._session() as conn:  # the connection every read and charge goes through
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the WAL is fsync'd on commit
    assert not list(tmp_path.glob(".*.new"))  # the creation temp file is gone


def _independent_epsilon(report: dict[str, object]) -> float:
    """Recompute epsilon from `fedseek budget --json` alone with Google's dp-accounting."""
    events = [
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(e["sample_rate"], dp_event.GaussianDpEvent(e["noise_multiplier"])),
            e["steps"],
        )
        for e in report["entries"]  # type: ignore[attr-defined]
    ]
    if report["accountant"] == "rdp":
        accountant: object = rdp.RdpAccountant(orders=report["rdp_orders"])
    else:
        accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    for event in events:
        accountant.compose(event)  # type: ignore[attr-defined]
    return float(accountant.get_epsilon(report["delta"]))  # type: ignore[attr-defined]


@pytest.mark.parametrize(("accountant", "rel"), [("rdp", 1e-6), ("prv", 0.03)])
def test_json_is_enough_to_recompute_epsilon_independently(tmp_path: Path, accountant: str, rel: float) -> None:
    """The PRV accountant is numerical; PLD is a different numerical method, so they agree to a few %."""
    ledger = _ledger(tmp_path, accountant=accountant)
    _run_round(ledger, round_=0, rounds_left=3)
    plan = ledger.plan_round(sample_rate=0.05, steps=20, rounds_left=2)
    ledger.charge(run_id="run-2", round=0, plan=plan, max_grad_norm=0.5)  # left charged: a crash
    report = json.loads(json.dumps(ledger.to_json()))
    assert len(report["entries"]) == 2
    assert _independent_epsilon(report) == pytest.approx(report["epsilon_spent"], rel=rel)
    assert report["entries"][-1]["epsilon_after"] == report["epsilon_spent"]


def _digest(directory: Path) -> dict[str, str]:
    """Hashes of every file but SQLite's -shm index; a -wal file may appear, but only empty."""
    wal = directory / "ledger.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "something was written to the ledger's WAL"
    files = sorted(p for p in directory.iterdir() if not p.name.endswith(("-shm", "-wal")))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _flip_bytes(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def _damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "flip-header":
        _flip_bytes(path, 0)
    elif how == "flip-page-header":
        _flip_bytes(path, 4096)  # page 2's b-tree header
    elif how == "flip-row-value":
        data = path.read_bytes()
        _flip_bytes(path, data.rindex(b"run-1"))  # inside a stored row: only the hash chain can tell
    elif how == "truncate-half":
        _truncate(path, size // 2)
    elif how == "truncate-empty":
        _truncate(path, 0)
    elif how == "edit-row":
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE entries SET sample_rate = sample_rate / 2 WHERE id = 2")
        conn.close()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["flip-header", "flip-page-header", "flip-row-value", "truncate-half", "truncate-empty", "edit-row"]
)
def test_damaged_ledger_file_is_refused_and_left_unchanged(two_rounds: Path, tmp_path: Path, how: str) -> None:
    path = tmp_path / "ledger.db"
    shutil.copy(two_rounds, path)
    _damage(path, how)
    before = _digest(tmp_path)
    with pytest.raises(LedgerError) as info:
        _ledger(tmp_path)
    message = str(info.value)
    assert message and "\n" not in message
    with pytest.raises(LedgerError):
        PrivacyLedger.open_existing(path)
    assert _digest(tmp_path) == before  # nothing written, no fresh ledger in its place


def test_foreign_sqlite_file_is_not_taken_for_a_fresh_ledger(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    conn.close()
    before = _digest(tmp_path)
    with pytest.raises(LedgerError, match="not a privacy ledger"):
        _ledger(tmp_path)
    assert _digest(tmp_path) == before


def test_creation_never_replaces_an_existing_ledger(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _run_round(ledger, round_=0, rounds_left=2)
    entries = ledger.entries()
    stray = tmp_path / f".ledger.db.{os.getpid()}.new"
    stray.write_bytes(b"left by a crash during creation")
    assert _ledger(tmp_path).entries() == entries
    assert read_budget(tmp_path / "ledger.db") == ledger.budget
