"""A PNG of a site's privacy budget over its ledger, for people (the JSON is for machines).

The y value of each point is the ledger's own ``epsilon_after``: the whole history composed
by the accountant, not a running sum, so the curve is exactly what the node enforces. The
Figure API renders with Agg and never touches pyplot's global state or a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def budget_figure(report: dict[str, Any]) -> Figure:
    """Cumulative epsilon after each ledger entry, the budget line, one colour per run."""
    entries = report["entries"]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.axhline(
        report["budget_epsilon"], color="crimson", linestyle="--", label=f"budget ε = {report['budget_epsilon']:g}"
    )
    runs: dict[str, list[tuple[int, float]]] = {}
    for number, entry in enumerate(entries, start=1):
        runs.setdefault(entry["run_id"], []).append((number, entry["epsilon_after"]))
    epsilons = [0.0, *(e["epsilon_after"] for e in entries)]
    ax.step(range(len(epsilons)), epsilons, where="post", color="0.6", linewidth=1)
    for run, points in runs.items():
        ax.plot([n for n, _ in points], [eps for _, eps in points], marker="o", linestyle="none", label=f"run {run}")
    for number, entry in enumerate(entries, start=1):
        if entry["status"] != "completed":
            ax.annotate(entry["status"], (number, entry["epsilon_after"]), textcoords="offset points", xytext=(4, -12))
    ax.set_xlabel("ledger entry (one charged round)")
    ax.set_ylabel(f"ε spent (δ = {report['delta']:.1e}, {report['accountant'].upper()})")
    ax.set_title(f"Privacy budget: ε {report['epsilon_spent']:.3f} of {report['budget_epsilon']:g} spent")
    ax.set_xlim(0, max(1, len(entries)) + 0.5)
    ax.set_ylim(0, max(report["budget_epsilon"], report["epsilon_spent"]) * 1.1)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_budget(report: dict[str, Any], path: Path) -> Path:
    """Write ``budget_figure`` of a ledger's ``to_json()`` report as a PNG."""
    budget_figure(report).savefig(path, format="png")
    return path
