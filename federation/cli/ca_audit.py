"""The CA operator's audit trail: who issued, signed, renewed or revoked which certificate, when.

Every `fedseek ca` command that uses the CA key appends one `ca.<operation>` record to
`<pki>/ca-audit/audit.jsonl` (a hash-chained `privacy.audit` log: `fedseek audit verify` checks it),
and every refusal once a CA exists appends `ca.refused` with the one-line error the operator saw (a
wrong passphrase is someone trying the CA key). The trail is checked before the command runs: a
trail that fails its check refuses the command before the CA key is unlocked, so nothing is signed
that the trail cannot record. It lives beside `ca/`, not in it, because `ca init --force` replaces
that directory whole. `ca list` reads only and is not recorded.
"""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation.errors import FedSeekError
from federation.security import pki
from federation.security.pki.layout import CA_AUDIT_DIR, CA_CERT, CA_DIR

if TYPE_CHECKING:
    from privacy.audit import AuditTrail

AUDIT_FILE = "audit.jsonl"


def ca_audit_path(pki_dir: Path) -> Path:
    return Path(pki_dir) / CA_AUDIT_DIR / AUDIT_FILE


def operator() -> str:
    """The OS user running the command (the actor of its records)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (a container)
        return f"uid {os.getuid()}"


class CaAudit:
    """One command's view of the trail: opened (and checked) once, appended to by the command."""

    def __init__(self, pki_dir: Path) -> None:
        self.path = ca_audit_path(pki_dir)
        self._trail: AuditTrail | None = None

    def open(self) -> None:
        """Check the trail (its hash chain and head); PKIError if it fails, naming the file."""
        from privacy.audit import AuditError, AuditTrail

        try:
            self._trail = AuditTrail(self.path)
        except AuditError as exc:
            raise pki.PKIError(
                f"the CA's audit trail failed its integrity check ({exc}); refusing to use the CA key"
            ) from None

    def record(self, operation: str, resource: str, details: Mapping[str, Any]) -> None:
        if self._trail is None:
            self.open()
        assert self._trail is not None
        self._trail.append(actor=operator(), action=f"ca.{operation}", resource=resource, details=dict(details))

    def close(self) -> None:
        """Stop the trail's background tree cache at the command's end (the CLI may run in-process)."""
        if self._trail is not None:
            self._trail.close()


CaCommand = Callable[[argparse.Namespace, CaAudit], int]


def audited(command: str, func: CaCommand) -> Callable[[argparse.Namespace], int]:
    """`func` as an argparse handler that records what it does, and its refusal, in the CA's trail."""

    def run(args: argparse.Namespace) -> int:
        pki_dir = Path(args.pki)
        audit = CaAudit(pki_dir)
        ca_exists = (pki_dir / CA_DIR / CA_CERT).is_file()
        if ca_exists:
            audit.open()  # before the CA key is unlocked
        try:
            return func(args, audit)
        except FedSeekError as exc:
            if ca_exists:  # without a CA (a mistyped --pki) there is no trail to write, nor a key to try
                resource = str(getattr(args, "name", None) or getattr(args, "request", None) or "")
                audit.record("refused", resource, {"command": command, "error": exc.one_line()})
            raise
        finally:
            audit.close()

    return run
