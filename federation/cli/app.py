"""`fedseek app sign`: FedSeek's Flower app, signed with the consortium's app-publisher key.

Sites run only app bundles signed by a publisher key their `publishers.json` lists, so the
coordinator submits a signed copy of FedSeek's app (`federation/protocol/flower_app`), written
by `fedseek app sign --pki DIR --out APPDIR` (default for `fedseek run`: the coordinator
state's `app/`). The key is `pki/ca/publisher.key`, opened with the CA passphrase, which comes
from `--passphrase-file FILE`, else `$FEDSEEK_CA_PASSPHRASE`, else a prompt, as for `fedseek ca`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from federation.cli.ca import add_passphrase_file, passphrase_from
from federation.security import pki


def add_app_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `app` and its subcommands on the root parser's subcommands."""
    app = sub.add_parser("app", help="the consortium's signed Flower app").add_subparsers(
        dest="app_command", required=True
    )
    p = app.add_parser(
        "sign",
        help="write FedSeek's Flower app, signed with the consortium's app-publisher key, to a directory",
        allow_abbrev=False,  # `--passphrase x` must not mean the file
    )
    p.add_argument("--pki", required=True, help="PKI directory (its ca/ holds the publisher key)")
    p.add_argument("--out", required=True, type=Path, help="the signed app directory to write (replaced whole)")
    add_passphrase_file(p)
    p.set_defaults(func=_sign)


def _sign(args: argparse.Namespace) -> int:
    from federation.security.app_signing import FEDSEEK_APP_DIR, sign_app_dir

    key = pki.load_publisher_key(Path(args.pki), passphrase=passphrase_from(args))
    approval = sign_app_dir(FEDSEEK_APP_DIR, args.out, key)
    print(f"signed {approval.app} {approval.version} with {approval.key_id}: {args.out} (digest {approval.digest})")
    return 0
