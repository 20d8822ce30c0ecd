"""`fedseek node enroll`: a site makes its own keys and a certificate request, then installs the CA's answer.

The three steps of enrolling a site without moving a private key (`federation.security.enrollment`):

    site$ fedseek node enroll --pki /etc/fedseek/pki --name site-a --host site-a.example
    ca$   fedseek ca sign request.csr --pki /srv/ca --role node --host site-a.example
    site$ fedseek node enroll --pki /etc/fedseek/pki --name site-a --accept BUNDLE_DIR

Renewal is the same with `--renew` (a new key unless `--keep-key`); with `--if-due DAYS` it does
nothing until the certificate has less than DAYS left, so a daily timer can run it.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from federation.errors import InvalidInput


def add_enroll_command(node: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `enroll` under `fedseek node`."""
    p = node.add_parser(
        "enroll",
        help="make this site's key and a certificate request (or install the CA's answer: --accept)",
        description="Make the site's TLS key, its Flower auth key and a certificate request in PKI/NAME/; carry "
        "request.csr and supernode_auth.pub to the CA operator (`fedseek ca sign`), and the bundle back "
        "(--accept). No private key leaves this directory.",
    )
    p.add_argument("--pki", required=True, type=Path, help="this site's PKI directory")
    p.add_argument("--name", required=True, help="the site's party name (the certificate's CN)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="host name or IP the site serves under, asked for in the request (repeatable; the CA grants names)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--renew", action="store_true", help="request a renewal, signed by the current key")
    mode.add_argument(
        "--accept",
        type=Path,
        metavar="BUNDLE",
        help="install the CA's answer: the directory `fedseek ca sign` wrote (cert.pem, ca.pem, crl.pem)",
    )
    p.add_argument("--keep-key", action="store_true", help="with --renew: keep the current key (default: a new one)")
    p.add_argument(
        "--if-due",
        type=float,
        metavar="DAYS",
        help="with --renew: only when the certificate has less than DAYS left, and no request waits (for a timer)",
    )
    p.set_defaults(func=_enroll)


def _enroll(args: argparse.Namespace) -> int:
    from federation.security import enrollment

    if (args.keep_key or args.if_due is not None) and not args.renew:
        raise InvalidInput("--keep-key and --if-due go with --renew")
    if args.accept is not None:
        ident = enrollment.accept_bundle(args.pki, args.name, args.accept)
        print(
            f"installed {ident.role} certificate for {ident.name}: serial {ident.serial:x}, "
            f"until {ident.not_after:%Y-%m-%d %H:%M}Z, in {args.pki / args.name}"
        )
        return 0
    if args.if_due is not None and args.if_due < 0:
        raise InvalidInput(f"--if-due must be a number of days, not {args.if_due}")
    req = enrollment.make_request(
        args.pki,
        args.name,
        hosts=args.host,
        renew=args.renew,
        keep_key=args.keep_key,
        if_due=timedelta(days=args.if_due) if args.if_due is not None else None,
    )
    if req.csr is None:
        print(req.note)
        return 0
    print(f"{req.note}: {req.csr}")
    carry = [str(req.csr), str(req.flower_key)] + ([str(req.proof)] if req.proof else [])
    print(f"carry to the CA operator (public, no key): {' '.join(carry)}")
    hosts = "".join(f" --host {h}" for h in args.host)
    print(f"the CA operator runs: fedseek ca sign {req.csr.name} --pki CA_PKI --role node{hosts} (a site)")
    return 0
