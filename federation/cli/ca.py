"""`fedseek ca ...`: the consortium CA's lifecycle (init, issue, renew, revoke, crl, publisher, list).

The CA passphrase comes from `--passphrase-file FILE`, else `$FEDSEEK_CA_PASSPHRASE`, else a
prompt when stdin is a terminal; never from an argument, which `ps` would show. Failures are
PKIError, which `main` prints as one `fedseek: error: ...` line (exit 2).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import get_args

from federation.cli.ca_audit import CaAudit, CaCommand, audited
from federation.security import pki


def add_ca_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `ca` and its subcommands on the root parser's subcommands."""
    ca = sub.add_parser("ca", help="consortium certificate authority").add_subparsers(dest="ca_command", required=True)

    p = _command(ca, "init", "create the consortium CA (key encrypted with the passphrase)", _init)
    p.add_argument(
        "--consortium", default="fedseek", help="the consortium name every certificate carries (default: %(default)s)"
    )
    p.add_argument("--days", type=int, default=3650, help="CA validity (default: 3650)")
    p.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")

    p = _command(ca, "issue", "issue a certificate for a party", _issue)
    p.add_argument("name", help="the party's name (a site, the coordinator, a reviewer or admin)")
    p.add_argument("--role", required=True, choices=list(get_args(pki.Role)), help="the role the certificate grants")
    p.add_argument(
        "--host",
        action="append",
        help="SAN host name or IP (repeatable); the loopback names a role needs are added "
        "(coordinator: localhost, 127.0.0.1 and its role name; node: 127.0.0.1; reviewer, admin: none)",
    )
    _days(p, pki.DEFAULT_LEAF_DAYS)

    p = _command(
        ca,
        "sign",
        "issue a certificate for a party's request (`fedseek node enroll`); its private key never comes here",
        _sign,
    )
    p.add_argument("request", type=Path, help="the party's request.csr")
    p.add_argument("--role", required=True, choices=list(get_args(pki.Role)), help="the role the certificate grants")
    p.add_argument(
        "--host",
        action="append",
        help="SAN host name or IP (repeatable), as for `ca issue`; names the request asks for are granted only "
        "if given here (default on a renewal: the current certificate's)",
    )
    p.add_argument(
        "--site-key",
        type=Path,
        metavar="FILE",
        help="the site's Flower auth public key (default: supernode_auth.pub beside the request; a node's first "
        "enrollment needs it)",
    )
    p.add_argument(
        "--proof",
        type=Path,
        metavar="FILE",
        help="renewal proof, the current key's signature over the request (default: renewal.sig beside it)",
    )
    _days(p, pki.DEFAULT_LEAF_DAYS)

    p = _command(ca, "renew", "replace a party's certificate before it expires (same name, role, hosts)", _renew)
    p.add_argument("name", help="the party whose certificate is renewed")
    _days(p, pki.DEFAULT_LEAF_DAYS)
    p.add_argument("--keep-key", action="store_true", help="keep the party's key; only cert.pem changes")

    p = _command(ca, "revoke", "revoke a party's certificates and publish the CRL", _revoke)
    p.add_argument("name", help="the party whose certificates are revoked")
    p.add_argument(
        "--reason",
        choices=list(get_args(pki.Reason)),
        default="unspecified",
        help="recorded in the CRL (default: %(default)s)",
    )
    p.add_argument("--serial", type=_hex, metavar="HEX", help="revoke only this serial (hex, as `ca list` shows)")

    p = _command(ca, "crl", "sign a fresh CRL and publish it to every party; prints its path", _crl)
    _days(p, pki.CRL_DAYS, what="CRL validity; run again before it lapses")
    p.add_argument(
        "--if-due",
        type=float,
        metavar="DAYS",
        help="sign only when the published CRL lapses within DAYS (for a timer); the CA key stays locked otherwise",
    )

    p = _command(
        ca,
        "publisher",
        "create the consortium's app-publisher key (or replace it) and give every party its key",
        _publisher,
    )
    p.add_argument("--force", action="store_true", help="replace the key: bundles signed with the old one are refused")

    p = ca.add_parser("list", help="list issued certificates with their status")
    p.add_argument("--pki", required=True, help="PKI directory")
    p.set_defaults(func=_list)


def _command(
    ca: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    func: CaCommand,
) -> argparse.ArgumentParser:
    """A subcommand that signs with the CA key: every one takes --pki and --passphrase-file, and what it
    does (or why it was refused) is recorded in the CA's audit trail (federation/cli/ca_audit.py)."""
    p = ca.add_parser(name, help=help_text, allow_abbrev=False)  # `--passphrase x` must not mean the file
    p.add_argument("--pki", required=True, help="PKI directory")
    add_passphrase_file(p)
    p.set_defaults(func=audited(name, func))
    return p


def add_passphrase_file(p: argparse.ArgumentParser) -> None:
    """`--passphrase-file FILE`: how every command that unlocks a CA-held key gets its passphrase."""
    p.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the CA passphrase (default: ${pki.PASSPHRASE_ENV}, else a prompt)",
    )


def _days(p: argparse.ArgumentParser, default: int, what: str = "certificate validity") -> None:
    p.add_argument("--days", type=int, default=default, help=f"{what} (default: {default})")


def _hex(text: str) -> int:
    try:
        return int(text.removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hex serial: {text!r}") from None


def passphrase_from(args: argparse.Namespace, *, confirm: bool = False) -> bytes | None:
    """The passphrase to pass on; None leaves it to pki (the environment variable, or its error)."""
    if args.passphrase_file is not None:
        return pki.read_passphrase_file(args.passphrase_file)
    if os.environ.get(pki.PASSPHRASE_ENV) or not sys.stdin.isatty():
        return None
    secret = getpass.getpass("CA passphrase: ")
    if confirm and getpass.getpass("CA passphrase (again): ") != secret:
        raise pki.PKIError("the passphrases differ")
    return secret.encode()


def _init(args: argparse.Namespace, audit: CaAudit) -> int:
    old = Path(args.pki) / "ca" / "ca.pem"
    replaced = _fingerprint(old) if old.is_file() else None
    files = pki.init_ca(
        Path(args.pki),
        consortium=args.consortium,
        days=args.days,
        force=args.force,
        passphrase=passphrase_from(args, confirm=True),
    )
    details = {"consortium": args.consortium, "sha256": _fingerprint(files.cert), "days": args.days}
    audit.record("initialised", args.consortium, {**details, "replaced_sha256": replaced})
    print(f"CA created: {files.cert} (CRL {files.crl})")
    return 0


def _fingerprint(cert: Path) -> str:
    from cryptography.hazmat.primitives import hashes

    from federation.security.pki.pem import load_cert

    return load_cert(cert).fingerprint(hashes.SHA256()).hex()


def _issued(ident: pki.Identity) -> dict[str, object]:
    """What a record says of a certificate the CA signed: enough to find it in `ca list` and the CRL."""
    return {
        "role": ident.role,
        "serial": f"{ident.serial:x}",
        "hosts": list(ident.hosts),
        "not_after": f"{ident.not_after:%Y-%m-%dT%H:%M:%S}Z",
        "sha256": ident.fingerprint_sha256,
    }


def _issue(args: argparse.Namespace, audit: CaAudit) -> int:
    from federation.security.site_binding import register_site_key

    pki_dir = Path(args.pki)
    hosts = args.host or ()
    leaf = pki.issue(pki_dir, args.name, role=args.role, hosts=hosts, days=args.days, passphrase=passphrase_from(args))
    registered = register_site_key(pki_dir, args.name) if leaf.role == "node" else None
    audit.record("issued", leaf.name, {**_issued(pki.read_identity(leaf.cert)), "site_key": _name(registered)})
    print(f"issued {leaf.role} certificate for {leaf.name}: {leaf.cert}")
    if registered is not None:
        print(f"SuperNode auth key registered: {registered}")
    return 0


def _name(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _renew(args: argparse.Namespace, audit: CaAudit) -> int:
    leaf = pki.renew(
        Path(args.pki), args.name, days=args.days, keep_key=args.keep_key, passphrase=passphrase_from(args)
    )
    ident = pki.read_identity(leaf.cert)
    audit.record("renewed", leaf.name, {**_issued(ident), "keep_key": args.keep_key})
    print(f"renewed {leaf.role} certificate for {leaf.name}: serial {ident.serial:x}, until {_until(ident)}")
    return 0


def _revoke(args: argparse.Namespace, audit: CaAudit) -> int:
    serials = pki.revoke(
        Path(args.pki), args.name, reason=args.reason, serial=args.serial, passphrase=passphrase_from(args)
    )
    audit.record("revoked", args.name, {"serials": [f"{s:x}" for s in serials], "reason": args.reason})
    print(f"revoked {args.name}: serial {', '.join(f'{s:x}' for s in serials)}; CRL published to every party")
    return 0


def _crl(args: argparse.Namespace, audit: CaAudit) -> int:
    if args.if_due is None:
        path = pki.write_crl(Path(args.pki), days=args.days, passphrase=passphrase_from(args))
        audit.record("crl_signed", "crl", _crl_details(path))
        print(path)
        return 0
    if args.if_due < 0:
        raise pki.PKIError(f"--if-due must be a number of days, not {args.if_due}")
    # The CA key is opened only when due: a timer's run that signs nothing unlocks nothing.
    until = pki.refresh_crl(
        Path(args.pki), within=timedelta(days=args.if_due), days=args.days, passphrase=passphrase_from(args)
    )
    if until is not None:
        audit.record("crl_signed", "crl", _crl_details(Path(args.pki) / "ca" / "crl.pem"))
        print(f"CRL re-signed and published, valid until {until:%Y-%m-%d %H:%M}Z")
    else:
        current = pki.load_crl(Path(args.pki) / "ca" / "crl.pem").next_update_utc
        print(f"CRL not due: valid until {current:%Y-%m-%d %H:%M}Z" if current else "CRL not due")
    return 0


def _crl_details(path: Path) -> dict[str, object]:
    crl = pki.load_crl(path)
    until = crl.next_update_utc
    return {"revoked": len(crl), "next_update": f"{until:%Y-%m-%dT%H:%M:%S}Z" if until else None}


def _sign(args: argparse.Namespace, audit: CaAudit) -> int:
    from federation.security import enrollment

    request = Path(args.request)
    site_key: Path | None = args.site_key or request.parent / "supernode_auth.pub"
    proof_path = args.proof or request.parent / enrollment.PROOF_FILE
    proof = proof_path.read_bytes() if proof_path.is_file() else None
    if args.role == "node" and site_key is not None and not site_key.is_file():
        # Without its Flower key registered the coordinator refuses the site: say so before signing.
        name = pki.request_name(pki.load_request(request))
        if args.site_key is not None or not (Path(args.pki) / pki.SITE_KEYS_DIR / f"{name}.pub").is_file():
            raise pki.PKIError(
                f"no Flower auth key for '{name}': give --site-key FILE (supernode_auth.pub from the site)"
            )
        site_key = None
    signed = pki.sign_request(
        Path(args.pki),
        request,
        role=args.role,
        hosts=args.host,
        days=args.days,
        proof=proof,
        passphrase=passphrase_from(args),
    )
    ident = signed.identity
    what = "renewed" if signed.renewal else "issued"
    registered = None
    if ident.role == "node" and site_key is not None:
        registered = enrollment.register_site_key(Path(args.pki), ident.name, site_key)
    details = {**_issued(ident), "request": str(request), "not_granted": list(signed.ignored)}
    audit.record(what, ident.name, {**details, "site_key": _name(registered)})
    print(f"{what} {ident.role} certificate for {ident.name}: serial {ident.serial:x}, until {_until(ident)}")
    print(f"  hosts: {', '.join(ident.hosts) or 'none'}")
    for item in signed.ignored:
        print(f"  requested, not granted: {item}")
    if registered is not None:
        print(f"  SuperNode auth key registered: {registered}")
    print(f"  bundle for the party: {signed.leaf.cert.parent} (`fedseek node enroll --accept DIR` there)")
    return 0


def _publisher(args: argparse.Namespace, audit: CaAudit) -> int:
    from federation.security.app_signing import PUBLISHERS_FILE, load_publishers

    trust = Path(args.pki) / "ca" / PUBLISHERS_FILE
    before = sorted(load_publishers(trust)) if trust.is_file() else []
    key_id = pki.create_publisher(Path(args.pki), passphrase=passphrase_from(args, confirm=False), force=args.force)
    audit.record("publisher_created", key_id, {"replaced": [k for k in before if k != key_id]})
    print(f"app-publisher key {key_id}; every party's publishers.json lists it (re-sign apps: `fedseek app sign`)")
    return 0


def _list(args: argparse.Namespace) -> int:
    for ident, status in pki.list_status(Path(args.pki)):
        print(
            f"{ident.name:24} {ident.role:12} {status:13} until {_until(ident)}  "
            f"serial {ident.serial:x}  sha256:{ident.fingerprint_sha256[:16]}"
        )
    return 0


def _until(ident: pki.Identity) -> str:
    return f"{ident.not_after:%Y-%m-%d %H:%M}Z"
