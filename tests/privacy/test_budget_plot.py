"""The budget PNG plots the ledger's own composed epsilons, the budget line and one series per run."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread

from privacy.budget_plot import budget_figure, plot_budget
from privacy.ledger import Budget, PrivacyLedger


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    ledger = PrivacyLedger(tmp_path_factory.mktemp("plot") / "ledger.sqlite", budget=Budget(epsilon=1.0, delta=1e-5))
    for run, rounds in (("run-a", 2), ("run-b", 2)):
        for r in range(rounds):
            plan = ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=4 - len(ledger.entries()))
            entry = ledger.charge(run_id=run, round=r, plan=plan, max_grad_norm=1.0)
            if (run, r) != ("run-b", 1):  # the last round "crashed": charged, never completed
                ledger.complete(entry.id, steps=plan.steps)
    return ledger.to_json()


def test_figure_shows_composed_epsilon_per_run_and_the_budget(report: dict[str, object]) -> None:
    ax = budget_figure(report).axes[0]
    epsilons = [e["epsilon_after"] for e in report["entries"]]  # type: ignore[attr-defined]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["run run-a"].get_ydata()) == epsilons[:2]
    assert list(lines["run run-b"].get_ydata()) == epsilons[2:]
    assert list(lines["run run-b"].get_xdata()) == [3, 4]
    assert set(lines["budget ε = 1"].get_ydata()) == {1.0}
    assert [t.get_text() for t in ax.texts] == ["charged"]  # the crashed round is marked
    assert "of 1 spent" in ax.get_title()


def test_png_is_written(report: dict[str, object], tmp_path: Path) -> None:
    out = plot_budget(report, tmp_path / "budget.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(out).shape[:2] == (450, 800)


def test_empty_ledger_plots(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite", budget=Budget(epsilon=0.5, delta=1e-5))
    assert plot_budget(ledger.to_json(), tmp_path / "empty.png").stat().st_size > 0
