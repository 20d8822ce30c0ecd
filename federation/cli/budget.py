"""`fedseek budget`: a site's privacy ledger as text, JSON (for independent recomputation) or a PNG.

The ledger is opened under its own stored budget and verified (hash chain, head) before
anything is shown; a missing or damaged ledger is a LedgerError (one line from `main`), and
nothing is written to it. It is then held against the site's audit trail (privacy.consistency),
as the node does at start-up: where they disagree (a deleted or re-chained ledger) the reason
the node refuses to train is shown with it and the exit status is 1. privacy.ledger (Opacus,
torch) is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from federation.ops.layout import NodeLayout


def add_budget_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `budget` on the root parser's subcommands."""
    p = sub.add_parser("budget", help="show a site's privacy ledger")
    p.add_argument("--state", required=True, help="the node's state directory")
    p.add_argument("--json", action="store_true", help="machine-readable: every entry, enough to recompute epsilon")
    p.add_argument("--plot", metavar="FILE.png", help="also write a PNG of epsilon over the ledger's rounds")
    p.set_defaults(func=_budget)


def _budget(args: argparse.Namespace) -> int:
    from privacy.consistency import ledger_refusal
    from privacy.ledger import LedgerError, PrivacyLedger

    layout = NodeLayout(Path(args.state))
    ledger = PrivacyLedger.open_existing(layout.ledger) if layout.ledger.exists() else None
    refusal = ledger_refusal(ledger, layout.audit)  # reads the audit trail only
    if ledger is None:
        raise LedgerError(refusal or f"no privacy ledger at {layout.ledger}")
    data = {**ledger.to_json(), "training_refused": refusal}
    if args.plot:
        from privacy.budget_plot import plot_budget

        plot_budget(data, Path(args.plot))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"epsilon spent {data['epsilon_spent']:.4f} of {data['budget_epsilon']:.4f} (delta {data['delta']:.2e})")
        for e in data["entries"]:
            print(
                f"  run {e['run_id']} round {e['round']}: {e['steps']} steps, q={e['sample_rate']:.4f}, "
                f"sigma={e['noise_multiplier']:.3f}, C={e['max_grad_norm']:g} -> epsilon {e['epsilon_after']:.4f} "
                f"[{e['status']}]"
            )
        if args.plot:
            print(f"plot: {args.plot}")
        if refusal:
            print(f"TRAINING REFUSED: {refusal}")
    return 1 if refusal else 0
