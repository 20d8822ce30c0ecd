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

from federation.cli.partition import add_partition_command
from federation.cli.witness import add_budget_witness_options, check_against_witness
from federation.errors import InvalidInput, NotFound
from federation.ops.layout import NodeLayout


def add_budget_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `budget` on the root parser's subcommands."""
    p = sub.add_parser("budget", help="show a site's privacy ledger")
    p.add_argument("--state", help="the node's state directory (required)")  # not argparse's: a subcommand has its own
    p.add_argument("--json", action="store_true", help="machine-readable: every entry, enough to recompute epsilon")
    p.add_argument("--plot", metavar="FILE.png", help="also write a PNG of epsilon over the ledger's rounds")
    add_budget_witness_options(p)
    p.set_defaults(func=_budget)
    add_partition_command(p.add_subparsers(dest="budget_command", metavar="{add-partition}"))


def _budget(args: argparse.Namespace) -> int:
    from privacy.consistency import ledger_refusal
    from privacy.ledger import LedgerError, PrivacyLedger

    if not args.state:
        raise InvalidInput("fedseek budget: the following argument is required: --state")
    if not Path(args.state).is_dir():
        raise NotFound(f"no such directory: {args.state} (the node's state directory)")
    layout = NodeLayout(Path(args.state))
    ledger = PrivacyLedger.open_existing(layout.ledger) if layout.ledger.exists() else None
    refusal = ledger_refusal(ledger, layout.audit)  # reads the audit trail only
    # The coordinator's record: what a site that deleted or rewrote both ledger and audit trail cannot undo.
    witnessed = check_against_witness(ledger, Path(args.witness), site=args.site) if args.witness else None
    witness_line = witnessed and ("WITNESSED: " if witnessed[0] else "WITNESS REFUSED: ") + witnessed[1]
    if ledger is None and witness_line is not None:
        print(witness_line)
        return 1
    if ledger is None:
        raise LedgerError(refusal or f"no privacy ledger at {layout.ledger}")
    data = {**ledger.to_json(), "training_refused": refusal}
    if witnessed is not None:
        data["witness"] = {"extends": witnessed[0], "reason": witnessed[1]}
    if args.plot:
        from privacy.budget_plot import plot_budget

        plot_budget(data, Path(args.plot))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"epsilon spent {data['epsilon_spent']:.4f} of {data['budget_epsilon']:.4f} (delta {data['delta']:.2e})")
        for part in data["partitions"]:  # each data batch's own budget
            print(
                f"  partition {part['label'] or '(genesis)'} {part['sha256'][:19]}: epsilon {part['epsilon']:.4f} "
                f"over {part['rounds']} rounds, {part['epsilon_remaining']:.4f} left [{part['status']}]"
            )
        for e in data["entries"]:
            if e["kind"] == "partition":
                print(f"  + partition {e['label']} {e['partitions'][0][:19]} added {e['ts']}")
                continue
            print(
                f"  run {e['run_id']} round {e['round']}: {e['steps']} steps, q={e['sample_rate']:.4f}, "
                f"sigma={e['noise_multiplier']:.3f}, C={e['max_grad_norm']:g} -> epsilon {e['epsilon_after']:.4f} "
                f"[{e['status']}]"
            )
        if args.plot:
            print(f"plot: {args.plot}")
        if refusal:
            print(f"TRAINING REFUSED: {refusal}")
        if witness_line is not None:
            print(witness_line)
    return 1 if refusal or (witnessed is not None and not witnessed[0]) else 0
