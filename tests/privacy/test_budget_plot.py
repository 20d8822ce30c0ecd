"""The budget PNG plots each partition's own composed epsilons over the ledger, the budget line,
retired partitions and crashed rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread

from privacy.budget_plot import budget_figure, plot_budget
from privacy.ledger import Budget, PrivacyLedger

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Partition A spent in one run (it retires), B added, then a round on B that "crashed"."""
    root = tmp_path_factory.mktemp("plot")
    ledger = PrivacyLedger(root / "ledger.sqlite", budget=Budget(epsilon=1.0, delta=1e-5), dataset_sha256=A)
    for r in range(2):
        plan = ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=2 - r, run_id="run-a")
        ledger.complete(ledger.charge(run_id="run-a", round=r, plan=plan, max_grad_norm=1.0).id, steps=1)
    ledger.add_partition(B, label="2025-02.jsonl")
    plan = ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=2, run_id="run-b", share=0.5)
    ledger.charge(run_id="run-b", round=0, plan=plan, max_grad_norm=1.0)  # never completed
    return ledger.to_json()


def test_figure_shows_each_partitions_composed_epsilon_and_the_budget(report: dict[str, object]) -> None:
    ax = budget_figure(report).axes[0]
    a, b = report["partitions"]  # type: ignore[misc]
    assert (a["status"], b["status"]) == ("retired", "active")
    lines = {line.get_label(): line for line in ax.get_lines()}
    a_line, b_line = lines["sha256:aaaaaaaaaaaa"], lines["2025-02.jsonl"]
    assert list(a_line.get_xdata()) == [0, 1, 2]  # from the genesis, one step per round that sampled it
    assert list(a_line.get_ydata()) == [0.0, *(e for _, e in a["trajectory"])]
    assert list(b_line.get_xdata()) == [3, 4, 4]  # registered at entry 3, sampled at 4, runs to the end
    assert b_line.get_ydata()[-1] == b["epsilon"] <= 0.5
    assert set(lines["budget ε = 1"].get_ydata()) == {1.0}
    assert [t.get_text() for t in ax.texts] == ["charged"]  # the crashed round is marked
    assert "1 of 2 partitions active" in ax.get_title()


def test_png_is_written(report: dict[str, object], tmp_path: Path) -> None:
    out = plot_budget(report, tmp_path / "budget.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(out).shape[:2] == (450, 800)


def test_empty_ledger_plots(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite", budget=Budget(epsilon=0.5, delta=1e-5))
    assert plot_budget(ledger.to_json(), tmp_path / "empty.png").stat().st_size > 0
