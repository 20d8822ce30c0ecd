"""Issue 14, finding 3: a run spends a stated share of what remains, so the next run can still train.

Before, a run's last round planned to reach the whole lifetime budget (a demo spent 0.999 of
every site's epsilon, and the next run could not train). Now `plan_round(run_id=, share=)` caps
a run at what was spent before its first entry plus `share` of what was left then.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy.ledger import Budget, BudgetExceeded, PrivacyLedger

RATE, STEPS = 0.01, 50


def _ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "ledger.db", budget=Budget(epsilon=1.0, delta=1e-5))


def _run(ledger: PrivacyLedger, run_id: str, *, rounds: int, share: float) -> float:
    """Every round of a run, as the node plans and charges them; the composed epsilon after it."""
    for r in range(1, rounds + 1):
        plan = ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=rounds - r + 1, run_id=run_id, share=share)
        ledger.complete(ledger.charge(run_id=run_id, round=r, plan=plan, max_grad_norm=1.0).id, steps=STEPS)
    return ledger.spent()


def test_each_run_spends_its_share_of_what_remained_at_its_start(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    first = _run(ledger, "run-1", rounds=2, share=0.5)
    assert 0.49 <= first <= 0.5  # the last round reaches the run's limit, not the lifetime budget
    second = _run(ledger, "run-2", rounds=2, share=0.5)
    assert 0.74 <= second <= first + 0.5 * (1.0 - first) + 1e-12  # half of the 0.5 that remained
    third = _run(ledger, "run-3", rounds=3, share=0.5)
    assert second < third <= second + 0.5 * (1.0 - second) + 1e-12 and third <= 1.0


def test_the_run_limit_is_fixed_at_its_first_round(tmp_path: Path) -> None:
    """Round 2 of a run must not take half of what round 1 left: the limit is set by what remained
    before the run's first entry (else a run of k rounds would spend far more than its share)."""
    ledger = _ledger(tmp_path)
    _run(ledger, "old", rounds=1, share=0.4)
    before = ledger.spent()
    spent = _run(ledger, "run-b", rounds=4, share=0.5)
    assert spent == pytest.approx(before + 0.5 * (1.0 - before), abs=0.01)


def test_a_run_whose_share_is_spent_is_refused_and_charged_nothing(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _run(ledger, "run-1", rounds=1, share=0.5)
    entries = ledger.entries()
    with pytest.raises(BudgetExceeded, match=r"^this run's share \(0\.5\) of the privacy budget is spent"):
        ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1, run_id="run-1", share=0.5)
    assert ledger.entries() == entries
    # another run still may: the site's budget is not spent
    assert ledger.plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1, run_id="run-2", share=0.5).epsilon_after < 1


def test_share_one_without_a_run_is_the_old_rule(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    assert _run(ledger, "all", rounds=2, share=1.0) >= 0.99


@pytest.mark.parametrize("share", [0.0, -0.5, 1.01, float("nan")])
def test_a_bad_share_is_refused(tmp_path: Path, share: float) -> None:
    with pytest.raises(ValueError, match="share must be in"):
        _ledger(tmp_path).plan_round(sample_rate=RATE, steps=STEPS, rounds_left=1, run_id="r", share=share)
