"""`fedseek witness ...` and `fedseek budget --witness`: a site's ledger held against the coordinator's record.

The coordinator keeps every ledger head a site signed and it accepted (`coordinator.witness`, in
`<state>/witness/<site>/ledger.head.jsonl`). `fedseek budget --state SITE_STATE --witness COORD_STATE`
reads the site's ledger file and says, in one line, whether it extends the last head the coordinator
witnessed (exit 0) or not: deleted, reset, rolled back, forked or re-chained (exit 1).

`fedseek witness accept-genesis` is the one way a site starts over (a lost ledger, no backup): the
operator names the new data's fingerprint, the coordinator refuses it if that data was ever
witnessed for the site (old data never gets a fresh budget), and both outcomes are audited in the
coordinator's trail. `fedseek witness show` lists what was witnessed.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import TYPE_CHECKING

from federation.ops.layout import CoordinatorLayout

if TYPE_CHECKING:
    from coordinator.witness import LedgerWitness
    from privacy.ledger import PrivacyLedger


def add_witness_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `witness accept-genesis` and `witness show` on the root parser's subcommands."""
    witness = sub.add_parser("witness", help="the coordinator's record of every site's ledger heads").add_subparsers(
        dest="witness_command", required=True
    )
    p = witness.add_parser(
        "accept-genesis", help="let a site start a new privacy ledger for NEW data (audited; old data never)"
    )
    p.add_argument("--state", required=True, help="the coordinator's state directory")
    p.add_argument("--site", required=True, help="the site starting over")
    p.add_argument("--dataset-sha256", required=True, help="fingerprint of the new data its new ledger covers")
    p.add_argument("--genesis", default="", help="accept only this ledger genesis (default: any for that data)")
    p.add_argument("--operator", default="", help="who decides (default: the login name), recorded in the audit trail")
    p.set_defaults(func=_accept_genesis)
    p = witness.add_parser("show", help="the ledger heads witnessed for each site")
    p.add_argument("--state", required=True, help="the coordinator's state directory")
    p.add_argument("--site", help="one site only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_show)


def add_budget_witness_options(parser: argparse.ArgumentParser) -> None:
    """`--witness COORD_STATE` and `--site` on `fedseek budget`."""
    parser.add_argument(
        "--witness",
        metavar="COORD_STATE",
        help="also check the ledger extends the last head this coordinator state witnessed (exit 1 if not)",
    )
    parser.add_argument("--site", help="with --witness: the site's name (default: found by the ledger's genesis)")


def _witness(state: Path, *, audited: bool) -> LedgerWitness:
    from coordinator.witness import LedgerWitness, WitnessStore
    from privacy.audit import AuditTrail

    layout = CoordinatorLayout(state)
    if not layout.root.is_dir():
        from federation.errors import NotFound

        raise NotFound(f"no coordinator state at {state}")
    audit = AuditTrail(layout.audit) if audited else None
    return LedgerWitness(WitnessStore(layout.witness), audit=audit)


def _accept_genesis(args: argparse.Namespace) -> int:
    witness = _witness(Path(args.state), audited=True)
    operator = args.operator or getpass.getuser()
    witness.accept_genesis(args.site, dataset_sha256=args.dataset_sha256, genesis=args.genesis, operator=operator)
    print(f"{args.site}: a new ledger for data {args.dataset_sha256[:12]} will be witnessed (accepted by {operator})")
    return 0


def _show(args: argparse.Namespace) -> int:
    witness = _witness(Path(args.state), audited=False)
    sites = [args.site] if args.site else witness.store.sites()
    heads = {site: witness.heads(site) for site in sites}
    if args.json:
        print(json.dumps({site: [h.head for h in claims] for site, claims in heads.items()}, indent=2))
        return 0
    for site, claims in heads.items():
        print(f"{site}: {len(claims)} heads witnessed; last {claims[-1].describe() if claims else '-'}")
    return 0


def check_against_witness(ledger: PrivacyLedger | None, state: Path, *, site: str | None) -> tuple[bool, str]:
    """Whether `ledger` (None: missing) extends the head the coordinator in `state` last witnessed for the
    site, and the one line that says so or why not. The site is `site`, or the one whose witnessed heads
    share the ledger's genesis."""
    from coordinator.witness import HeadClaim, WitnessRefused
    from node.witness_statements import ledger_head_payload

    witness = _witness(state, audited=False)
    if site is None:
        genesis = ledger.head().genesis if ledger is not None else None
        sites = [s for s in witness.store.sites() if genesis in {h.genesis for h in witness.heads(s)}]
        if len(sites) != 1:
            what = "missing" if genesis is None else f"genesis {genesis[:12]}"
            return False, (
                f"ledger {what} was never witnessed by this coordinator (reset or replaced?); "
                "name the site with --site to hold it against that site's heads"
            )
        site = sites[0]
    last = witness.latest(site)
    if last is None:
        return False, f"{site}: no ledger head witnessed for this site; nothing to hold the ledger against"
    if ledger is None:
        return False, f"{site}: ledger missing, but the coordinator witnessed {last.describe()}"
    claim = HeadClaim.parse(ledger_head_payload(ledger, site=site))
    try:
        witness.check_claim(claim)
    except WitnessRefused as exc:
        return False, exc.one_line()
    return True, f"{site}: the ledger ({claim.describe()}) extends the coordinator's witnessed {last.describe()}"
