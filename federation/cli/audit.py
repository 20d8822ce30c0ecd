"""`fedseek audit verify|prove|export`: a site's audit log as a transparency log an outsider can check.

    fedseek audit verify LOG [--quick]                         hash chain, head file and sealed segments
                                                               (local only; --quick: sealed segments by
                                                               their recorded sha256, as a node at start)
    fedseek audit verify LOG --witness COORD_STATE [--key PUB] held against the checkpoints the
                                                               coordinator witnessed (exit 1 if the log
                                                               is shorter, forks or contradicts one)
    fedseek audit prove LOG SEQ [--out PROOF.json]             inclusion proof of record SEQ in the
                                                               latest signed checkpoint
    fedseek audit export LOG --from --to --out DIR --key PUB   a self-verifying bundle for an inspector
    fedseek audit sweep LOG [--years 6] [--segment S] [--dry-run]
                                                               delete sealed segments past the retention
                                                               period (audited; their seals are kept)

The site's public node key is `pki/site-keys/<site>.pub` at the coordinator (`--key`, or
`--site-keys DIR`). The privacy modules are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation.errors import InvalidInput, NotFound
from federation.ops.layout import CoordinatorLayout

KIND = "audit.checkpoint"


def add_audit_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `audit verify|prove|export` on the root parser's subcommands."""
    audit = sub.add_parser("audit", help="audit trail").add_subparsers(dest="audit_command", required=True)
    p = audit.add_parser("verify", help="verify an audit log (hash chain; with --witness, its witnessed checkpoints)")
    p.add_argument("path", help="the audit log (a node's <state>/audit.jsonl)")
    p.add_argument("--quick", action="store_true", help="check sealed segments by their seal's sha256 only")
    _witness_options(p)
    p.set_defaults(func=_verify)
    p = audit.add_parser("prove", help="print an inclusion proof of one record (checked with the site's public key)")
    p.add_argument("path", help="the audit log")
    p.add_argument("seq", type=int, help="the record's seq")
    p.add_argument("--out", help="write the proof here instead of standard output")
    p.set_defaults(func=_prove)
    p = audit.add_parser("export", help="write a self-verifying bundle of the records dated in a period")
    p.add_argument("path", help="the audit log")
    p.add_argument("--from", dest="since", required=True, help="first day or time, ISO-8601 (UTC)")
    p.add_argument("--to", dest="until", required=True, help="last day or time, ISO-8601 (UTC; a day: all of it)")
    p.add_argument("--out", required=True, help="a new directory for the bundle")
    _witness_options(p)
    p.set_defaults(func=_export)
    p = audit.add_parser("sweep", help="delete sealed segments older than the retention period (audited)")
    p.add_argument("path", help="the audit log")
    p.add_argument("--years", type=int, default=6, help="retention period in years (default: 6)")
    p.add_argument("--segment", action="append", default=[], help="delete exactly this sealed segment (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p.set_defaults(func=_sweep)


def _witness_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--witness", metavar="COORD_STATE", help="the coordinator's state directory (its witness store)")
    p.add_argument("--site", help="the site whose log this is (default: named by the log's checkpoint)")
    p.add_argument("--key", help="the site's public node key, OpenSSH or PEM (pki/site-keys/<site>.pub)")
    p.add_argument("--site-keys", help="directory of <site>.pub keys (the coordinator's pki/site-keys)")


def _site(args: argparse.Namespace, log: Path, witnessed_sites: list[str]) -> str:
    from privacy.checkpoints import read_latest

    if args.site:
        return str(args.site)
    latest = read_latest(log)
    origin = latest.get("payload", {}).get("origin") if latest else None
    if isinstance(origin, str) and origin:
        return origin
    if len(witnessed_sites) == 1:
        return witnessed_sites[0]
    raise InvalidInput(f"{log}: cannot tell whose log this is (no checkpoint beside it); name the site with --site")


def _key_file(args: argparse.Namespace, site: str | None) -> Path | None:
    if args.key:
        return Path(args.key)
    if args.site_keys and site:
        return Path(args.site_keys) / f"{site}.pub"
    return None


def _witnessed(args: argparse.Namespace, log: Path) -> tuple[str, list[dict[str, Any]]]:
    from coordinator.witness import WitnessStore

    layout = CoordinatorLayout(Path(args.witness))
    if not layout.root.is_dir():
        raise NotFound(f"no coordinator state at {args.witness}")
    store = WitnessStore(layout.witness)
    sites = [s for s in store.sites() if store.statements(s, KIND)]
    site = _site(args, log, sites)
    return site, store.statements(site, KIND)


def _verify(args: argparse.Namespace) -> int:
    log = Path(args.path)
    from privacy.audit import companion_paths

    # Nothing there at all is a wrong path, not a verdict: a deleted log whose head or checkpoint
    # remains is still checked (and TAMPERED); against the witness, a log gone is the verdict "cut".
    if not args.witness and not log.exists() and not any(p.exists() for p in companion_paths(log)):
        raise NotFound(f"no such file: {log} (an audit log, e.g. STATE/audit.jsonl)")
    if not args.witness:
        from privacy.audit import verify

        result = verify(log, deep=not args.quick)
        if result.ok:
            segments = f", {result.sealed} sealed segment(s)" if result.sealed else ""
            deleted = f" ({result.deleted} deleted by retention)" if result.deleted else ""
            print(f"OK: {result.records} records, head {result.head_hash[:16]}{segments}{deleted}")
            return 0
        print(f"TAMPERED: {result.error}", file=sys.stderr)
        return 1
    from federation.security.signed_statement import load_public_key
    from privacy.transparency import verify_witnessed

    site, witnessed = _witnessed(args, log)
    if not witnessed:  # nothing to hold the log against: not a pass
        print(f"NOT WITNESSED: {site}: the coordinator holds no audit checkpoint of this site", file=sys.stderr)
        return 1
    key_file = _key_file(args, site)
    key = load_public_key(key_file) if key_file is not None else None
    report = verify_witnessed(log, witnessed=witnessed, key=key, origin=site)
    if report.ok:
        print(f"{site}: {report.summary()}")
        return 0
    print(f"TAMPERED: {site}: {report.error}", file=sys.stderr)
    return 1


def _prove(args: argparse.Namespace) -> int:
    from privacy.transparency import prove

    proof = prove(Path(args.path), args.seq)
    text = json.dumps(proof, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"proof of record {args.seq} in the checkpoint of {proof['tree_size']} records: {args.out}")
    else:
        print(text)
    return 0


def _when(text: str, *, end: bool) -> datetime:
    """An ISO date or time as UTC; a bare date at `end` means the whole of that day."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"not an ISO-8601 date or time: {text!r}") from None
    if end and len(text) == 10:
        when = when.replace(hour=23, minute=59, second=59, microsecond=999999)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _export(args: argparse.Namespace) -> int:
    from privacy.export import export_bundle

    log = Path(args.path)
    witnessed: list[dict[str, Any]] = []
    site = args.site
    if args.witness:
        site, witnessed = _witnessed(args, log)
    key_file = _key_file(args, site)
    if key_file is None:
        raise InvalidInput("export needs the site's public key: --key PUB, or --site-keys DIR with --site")
    out = Path(args.out)
    manifest = export_bundle(
        log,
        out,
        since=_when(args.since, end=False),
        until=_when(args.until, end=True),
        public_key=key_file,
        witnessed=witnessed,
    )
    print(
        f"exported records {manifest['first_seq']}..{manifest['last_seq']} of {manifest['origin']}'s audit log "
        f"to {out}; check with: python {out / 'verify.py'} bundle {out}"
    )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from privacy.audit import AuditTrail
    from privacy.retention import sweep

    log = Path(args.path)
    if not log.exists():
        raise NotFound(f"no audit log at {log}")
    result = sweep(AuditTrail(log), years=args.years, segments=args.segment, actor="operator", dry_run=args.dry_run)
    if not result.deleted:
        print(f"nothing to delete: no sealed segment ends before {result.cutoff}")
    elif args.dry_run:
        print(
            f"would delete {len(result.deleted)} segment(s) ending before {result.cutoff}: {', '.join(result.deleted)}"
        )
    else:
        print(
            f"deleted {len(result.deleted)} segment(s) (audit record {result.record_seq}): {', '.join(result.deleted)}"
        )
    return 0
