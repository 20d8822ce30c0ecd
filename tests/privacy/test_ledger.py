"""Privacy ledger: real Opacus composition, budget enforcement and fail-closed integrity."""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.ledger import (
    Budget,
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    RoundPlan,
    compose_epsilon,
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
    plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=4)
    assert plan.epsilon_after <= 0.25
    assert plan.epsilon_after == _rdp_epsilon([(plan.noise_multiplier, RATE, STEPS)])
    assert _rdp_epsilon([(plan.noise_multiplier - 2e-3, RATE, STEPS)]) > 0.25
    assert ledger.entries() == []  # planning charges nothing


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
    assert set(report) == {"epsilon_spent", "delta", "budget_epsilon", "accountant", "entries"}
    assert (report["delta"], report["budget_epsilon"], report["accountant"]) == (DELTA, 1.0, "rdp")
    assert report["epsilon_spent"] == ledger.spent()
    (entry,) = report["entries"]
    assert entry["status"] == "completed" and entry["run_id"] == "run-1" and entry["ts"].endswith("Z")
    assert entry["epsilon_after"] == report["epsilon_spent"]


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
    assert ledger.spent() <= 0.5
    assert compose_epsilon([], budget=ledger.budget) == 0.0
