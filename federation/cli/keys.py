"""`fedseek key create|list|revoke`: a site's API keys, with scopes and expiry.

A key is printed once, when it is made; the site keeps only its digest (node/api_keys.py). The
running node re-reads the keys file when it changes, so a new key works and a revoked one is
refused at the next request, without a restart. Each creation and revocation is written to the
site's audit trail (`key.created`, `key.revoked`) with the operator's user name.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from federation.errors import InvalidInput, NotFound
from federation.ops.layout import NodeLayout
from node.api_keys import DEFAULT_SCOPES, SCOPES, ApiKeys, KeyRecord

_DURATION = re.compile(r"^(\d+)([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def add_key_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `key create|list|revoke` on the root parser's subcommands."""
    key = sub.add_parser("key", help="a site's API keys (scopes, expiry, revocation)").add_subparsers(
        dest="key_command", required=True
    )
    p = key.add_parser("create", help="make an API key; it is printed once, only its digest is kept")
    p.add_argument("--state", required=True, help="the node's state directory")
    p.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        help=f"what the key may call; repeat for several (default: {', '.join(DEFAULT_SCOPES)})",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument("--expires-in", metavar="N{m,h,d}", help="expire after this long, e.g. 90d, 12h")
    when.add_argument("--expires", metavar="TIME", help="expire at this ISO 8601 time, e.g. 2026-06-30T00:00:00Z")
    p.add_argument("--label", default="", help="who or what the key is for (shown by `key list`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_create)

    p = key.add_parser("list", help="every key of the site: id, scopes, expiry, state (never the key)")
    p.add_argument("--state", required=True, help="the node's state directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_list)

    p = key.add_parser("revoke", help="revoke a key; the running node refuses it at the next request")
    p.add_argument("key_id", help="the key's id, as `fedseek key list` shows it (key-<12 hex>)")
    p.add_argument("--state", required=True, help="the node's state directory")
    p.set_defaults(func=_revoke)


def expiry(*, expires_in: str | None, expires: str | None, now: datetime) -> datetime | None:
    """The expiry `--expires-in` or `--expires` asks for; InvalidInput names a malformed one."""
    if expires_in:
        match = _DURATION.match(expires_in.strip())
        if not match or int(match.group(1)) < 1:
            raise InvalidInput(f"--expires-in {expires_in!r}: use a positive count and m, h or d, e.g. 90d")
        return now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    if expires:
        try:
            when = datetime.fromisoformat(expires.strip())
        except ValueError as exc:
            raise InvalidInput(f"--expires {expires!r} is not an ISO 8601 time (e.g. 2026-06-30T00:00:00Z)") from exc
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


def _layout(state: str) -> NodeLayout:
    layout = NodeLayout(Path(state))
    if not layout.root.is_dir():
        raise NotFound(f"no node state directory at {layout.root}")
    return layout


def _audit(layout: NodeLayout, action: str, resource: str, details: dict[str, object]) -> None:
    from privacy.audit import AuditTrail

    AuditTrail(layout.audit).append(actor=getpass.getuser(), action=action, resource=resource, details=details)


def _row(record: KeyRecord, now: datetime) -> dict[str, object]:
    """What `list` shows of a key: its record without the digest, and its state at `now`."""
    row: dict[str, object] = json.loads(record.to_line())
    row.pop("sha256")
    row["state"] = record.state(now)
    return row


def _create(args: argparse.Namespace) -> int:
    layout = _layout(args.state)
    when = expiry(expires_in=args.expires_in, expires=args.expires, now=datetime.now(UTC))
    key, record = ApiKeys(layout.api_key_digests).issue(
        scopes=args.scope or DEFAULT_SCOPES, expires=when, label=args.label
    )
    row = _row(record, datetime.now(UTC))
    _audit(layout, "key.created", record.id, {k: v for k, v in row.items() if k != "state"})
    if args.json:
        print(json.dumps({"key": key, **row}, indent=2))
    else:
        print(key)
        print(f"id {record.id}  scopes {','.join(record.scopes)}  expires {row['expires'] or 'never'}", flush=True)
        print("store the key now: it is not kept and cannot be shown again")
    return 0


def _list(args: argparse.Namespace) -> int:
    layout = _layout(args.state)
    now = datetime.now(UTC)
    rows = [_row(r, now) for r in ApiKeys(layout.api_key_digests).records()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':<17} {'state':<8} {'scopes':<26} {'created':<21} {'expires':<21} label")
    for row in rows:
        print(
            f"{row['id']!s:<17} {row['state']!s:<8} {','.join(map(str, row['scopes'])):<26} "  # type: ignore[call-overload]
            f"{row['created'] or '-':<21} {row['expires'] or 'never':<21} {row['label']}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    layout = _layout(args.state)
    record = ApiKeys(layout.api_key_digests).revoke(args.key_id)
    _audit(layout, "key.revoked", record.id, {"revoked": json.loads(record.to_line())["revoked"]})
    print(f"revoked {record.id}: the running node refuses it from its next request")
    return 0
