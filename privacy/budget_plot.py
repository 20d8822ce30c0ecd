"""A PNG of a site's privacy budget over its ledger, for people (the JSON is for machines).

One line per data partition: its epsilon after each round that sampled it, flat between, from the
entry that registered it on. Every value is the ledger's own (`PrivacyLedger.to_json`'s partition
trajectories: each partition's history composed by the accountant, not a running sum), so the
curves are exactly what the node enforces. A partition that retires ends in a cross; a round
charged but never completed is marked. The Figure API renders with Agg and never touches pyplot's
global state or a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

MAX_LABELLED = 12
"""Partitions named in the legend; beyond that the legend would hide the plot."""


def _name(partition: dict[str, Any]) -> str:
    return str(partition["label"] or partition["sha256"][:19] or "genesis data")


def budget_figure(report: dict[str, Any]) -> Figure:
    """Each partition's epsilon over the ledger's entries, the budget line, retirements and crashed rounds."""
    entries = report["entries"]
    last = max(1, len(entries))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.axhline(
        report["budget_epsilon"], color="crimson", linestyle="--", label=f"budget ε = {report['budget_epsilon']:g}"
    )
    partitions = report["partitions"]
    for index, part in enumerate(partitions):
        xs = [part["seq"], *(seq for seq, _ in part["trajectory"])]
        ys = [0.0, *(eps for _, eps in part["trajectory"])]
        retired = part["status"] == "retired"
        if not retired:  # an active partition's line runs on to the ledger's end
            xs, ys = [*xs, last], [*ys, ys[-1]]
        label = _name(part) if index < MAX_LABELLED else None
        (line,) = ax.step(xs, ys, where="post", linewidth=1.5, label=label)
        rounds = part["trajectory"]
        ax.plot([s for s, _ in rounds], [e for _, e in rounds], marker="o", markersize=3, linestyle="none",
                color=line.get_color())  # fmt: skip
        if retired and rounds:
            ax.plot([rounds[-1][0]], [rounds[-1][1]], marker="x", markersize=8, color=line.get_color())
    for entry in entries:
        if entry["kind"] == "round" and entry["status"] != "completed":
            ax.annotate(entry["status"], (entry["id"], entry["epsilon_after"]), textcoords="offset points",
                        xytext=(4, -12))  # fmt: skip
    ax.set_xlabel("ledger entry (a charged round or a partition added)")
    ax.set_ylabel(f"ε spent per partition (δ = {report['delta']:.1e}, {report['accountant'].upper()})")
    active = sum(p["status"] == "active" for p in partitions)
    ax.set_title(
        f"Privacy budget: highest ε {report['epsilon_spent']:.3f} of {report['budget_epsilon']:g} spent; "
        f"{active} of {len(partitions)} partitions active"
    )
    ax.set_xlim(0, last + 0.5)
    ax.set_ylim(0, max(report["budget_epsilon"], report["epsilon_spent"]) * 1.1)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_budget(report: dict[str, Any], path: Path) -> Path:
    """Write ``budget_figure`` of a ledger's ``to_json()`` report as a PNG."""
    budget_figure(report).savefig(path, format="png")
    return path
