"""`fedseek backup` / `fedseek restore`: a coordinator's or a node's state, taken while it runs, restored only intact.

The work is `federation.ops.backup` and `federation.ops.restore`; here are the arguments, the
signing key (the party's own, `PKI/NAME/key.pem`, when `--pki` holds it) and the audit record a
restore leaves in the restored trail (`state.restored`: from which backup, made when, signed by
whom, restored by whom), so the restored party's own history says where it came from.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path

from federation.ops.backup import BackupReport, backup, detect_kind
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.restore import RestoreReport, restore


def add_backup_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `backup` and `restore` on the root parser's subcommands."""
    p = sub.add_parser(
        "backup",
        help="back up a coordinator's or node's state (consistent while it runs; a manifest of sha256s, signed)",
    )
    p.add_argument("--state", required=True, type=Path, help="the party's state directory")
    p.add_argument(
        "--out", required=True, type=Path, help="a new .tar, .tar.gz or .tgz archive, or a new directory (other names)"
    )
    p.add_argument("--kind", choices=["coordinator", "node"], help="whose state it is (default: told by its files)")
    p.add_argument(
        "--pki",
        type=Path,
        help="the party's PKI directory: backed up too (the CA index and CRL, certificates, site keys) and, when it "
        "holds PKI/NAME/key.pem, the manifest is signed with that key",
    )
    p.add_argument("--name", help="the party's name (default for a coordinator: coordinator)")
    p.add_argument(
        "--include-secrets",
        action="store_true",
        help="also the secrets: site.key, API key, agent token, private keys and passphrase files in --pki",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_backup)

    p = sub.add_parser(
        "restore", help="restore a backup into a new state directory (every file checked against the manifest first)"
    )
    p.add_argument("--from", dest="source", required=True, type=Path, help="the backup (archive or directory)")
    p.add_argument("--state", required=True, type=Path, help="the state directory to restore into (new or empty)")
    p.add_argument("--pki", type=Path, help="where the backup's PKI directory goes (needed if it holds one)")
    p.add_argument(
        "--ca", type=Path, help="the consortium CA certificate: accept only a backup signed by a party it certified"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty directory (the old one is kept aside)")
    p.add_argument("--check", action="store_true", help="check the backup whole, restore nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_restore)


def _backup(args: argparse.Namespace) -> int:
    kind = args.kind or detect_kind(args.state)
    name = args.name or ("coordinator" if kind == "coordinator" else "")
    key = cert = None
    if args.pki is not None and name and (args.pki / name / "key.pem").is_file():
        key, cert = args.pki / name / "key.pem", args.pki / name / "cert.pem"
    report = backup(
        args.state,
        args.out,
        kind=kind,
        name=name,
        pki=args.pki,
        include_secrets=args.include_secrets,
        sign_key=key,
        sign_cert=cert,
    )
    if args.json:
        print(json.dumps(_backup_json(report), indent=2))
        return 0
    signed = f"signed by {report.signed_by}" if report.signed_by else "unsigned: keep this sha256 apart to check it"
    print(
        f"backup of {report.kind} {name or '(unnamed)'} written to {report.out}: {report.files} files, "
        f"{report.bytes} bytes, {report.seconds:.1f} s; secrets {'included' if report.secrets else 'excluded'}"
    )
    print(f"manifest sha256 {report.manifest_sha256} ({signed})")
    for skipped in report.skipped:
        if skipped.endswith("(secret)") or "layout" in skipped:
            print(f"  not in the backup: {skipped}")
    return 0


def _backup_json(report: BackupReport) -> dict[str, object]:
    return {
        "out": str(report.out),
        "kind": report.kind,
        "files": report.files,
        "bytes": report.bytes,
        "seconds": round(report.seconds, 3),
        "manifest_sha256": report.manifest_sha256,
        "signed_by": report.signed_by,
        "secrets": report.secrets,
        "skipped": report.skipped,
    }


def _restore(args: argparse.Namespace) -> int:
    report = restore(args.source, args.state, pki=args.pki, ca=args.ca, force=args.force, check_only=args.check)
    if not args.check:
        _audit_restored(report, args.source)
    if args.json:
        print(json.dumps(_restore_json(report, checked_only=args.check), indent=2))
        return 0
    signed = f"signed by {report.signed_by}" if report.signed_by else "unsigned"
    what = "checked" if args.check else f"restored into {report.state}" + (f" and {report.pki}" if report.pki else "")
    print(
        f"backup of {report.kind} {report.name or '(unnamed)'} made {report.created_at} ({signed}, manifest "
        f"sha256 {report.manifest_sha256}): {report.files} files {what} in {report.seconds:.1f} s"
    )
    for aside in report.replaced:
        print(f"  the previous directory is kept at {aside}")
    return 0


def _restore_json(report: RestoreReport, *, checked_only: bool) -> dict[str, object]:
    return {
        "state": None if checked_only else str(report.state),
        "pki": None if checked_only or report.pki is None else str(report.pki),
        "kind": report.kind,
        "name": report.name,
        "created_at": report.created_at,
        "files": report.files,
        "manifest_sha256": report.manifest_sha256,
        "signed_by": report.signed_by,
        "replaced": [str(p) for p in report.replaced],
        "seconds": round(report.seconds, 3),
    }


def _audit_restored(report: RestoreReport, source: Path) -> None:
    """The restored party's own trail says it was restored, from what; its next checkpoint signs that too."""
    from privacy.audit import AuditTrail

    path = (CoordinatorLayout if report.kind == "coordinator" else NodeLayout)(report.state).audit
    trail = AuditTrail(path)
    try:
        trail.append(
            actor=getpass.getuser(),
            action="state.restored",
            resource=report.name or report.kind,
            details={
                "backup": str(source.resolve()),
                "manifest_sha256": report.manifest_sha256,
                "created_at": report.created_at,
                "signed_by": report.signed_by,
                "files": report.files,
            },
        )
    finally:
        trail.close()
