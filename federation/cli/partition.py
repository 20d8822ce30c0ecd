"""`fedseek budget add-partition`: an operator registers a new batch of a site's data with a full budget.

The site's privacy ledger accounts each data partition (an ingestion batch, named by the sha256
of its bytes) on its own; this command is the one way a partition joins a ledger that exists.
It reads the batch once (its fingerprint and its records come from the same bytes), refuses a
batch that is not valid training data, a ledger that disagrees with the site's audit trail, and a
fingerprint the ledger already holds (409: data already accounted for never gets a fresh
budget), and records what it did, or why it refused, in the site's audit trail as the operator's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from federation.ops.layout import NodeLayout


def add_partition_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `add-partition` under `fedseek budget`."""
    p = sub.add_parser(
        "add-partition",
        help="register a new data batch (a JSONL file) in a site's privacy ledger, with a full budget",
    )
    p.add_argument("--state", required=True, help="the node's state directory")
    p.add_argument("--data", required=True, type=Path, help="the batch file (JSONL), e.g. DATA_DIR/train/2025-07.jsonl")
    p.add_argument("--label", help="the batch's name in the ledger (default: the file name)")
    p.add_argument("--note", default="", help="why it is added (recorded in the audit trail)")
    p.add_argument("--config", type=Path, help="the node's config, whose KEK opens an encrypted batch (.jsonl.enc)")
    p.set_defaults(func=_add_partition)


def _add_partition(args: argparse.Namespace) -> int:
    from node.data import read_partition
    from privacy.audit import AuditTrail
    from privacy.consistency import LedgerMismatch, ledger_refusal
    from privacy.ledger import LedgerError, PrivacyLedger, read_budget

    layout = NodeLayout(Path(args.state))
    if not layout.ledger.exists():
        raise LedgerError(f"no privacy ledger at {layout.ledger}: start the node once (its data makes the ledger)")
    envelope = None
    if args.config:  # an encrypted batch is fingerprinted by its plaintext, as the node does (node.data)
        from federation.protocol import config as cfg
        from federation.security.at_rest import site_envelope

        envelope = site_envelope(cfg.load(cfg.NodeConfig, args.config).kek, layout.kek, create=False)
    sha256, examples = read_partition(args.data, envelope=envelope)  # DataError (400): not training data
    audit = AuditTrail(layout.audit)
    ledger = PrivacyLedger(layout.ledger, budget=read_budget(layout.ledger), audit=audit)
    refusal = ledger_refusal(ledger, audit)
    if refusal is not None:
        audit.append(
            actor="operator",
            action="ledger.partition.refused",
            resource=str(args.data),
            details={"partition": sha256, "error": refusal},
        )
        raise LedgerMismatch(f"{refusal.removesuffix('refusing to train')}refusing to add a partition")
    label = args.label or Path(args.data).name
    details = {"records": len(examples), "file": str(Path(args.data).resolve()), "note": args.note}
    entry = ledger.add_partition(sha256, label=label, actor="operator", details=details)
    print(
        f"partition {label} ({sha256}, {len(examples)} records) added as ledger entry {entry.id} with a full budget "
        f"(epsilon {ledger.budget.epsilon:g}, delta {ledger.budget.delta:g})"
    )
    print("a running node that loaded this file trains on it from its next round; otherwise restart the node")
    return 0
