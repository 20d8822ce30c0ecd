"""Which certificates are out there and in what state, for audits and renewal planning.

Read from the party directories and the CA's own records, so it needs no passphrase.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from federation.security.pki.clock import utcnow
from federation.security.pki.errors import PKIError
from federation.security.pki.identity import Identity, read_identity
from federation.security.pki.index import load_index
from federation.security.pki.layout import CA_CERT, CA_DIR, LEAF_CERT, party_dirs

__all__ = ["Status", "list_issued", "list_status"]

Status = Literal["valid", "revoked", "expired", "not-yet-valid"]


def list_issued(pki_dir: Path) -> list[Identity]:
    """List the identities currently issued under ``pki_dir``, sorted by name.

    Used for audits and renewal planning; leftovers of interrupted writes
    (dot-prefixed staging directories) are ignored.
    """
    pki_dir = Path(pki_dir)
    if not (pki_dir / CA_DIR / CA_CERT).is_file():  # a wrong --pki must not read as "no certificates"
        raise PKIError(f"no consortium CA in {pki_dir} (no {CA_DIR}/{CA_CERT}); check --pki, or run `fedseek ca init`")
    return [read_identity(d / LEAF_CERT) for d in party_dirs(pki_dir)]


def list_status(pki_dir: Path, *, now: datetime | None = None) -> list[tuple[Identity, Status]]:
    """Each current certificate with its status, from the CA's own records (no passphrase needed)."""
    pki_dir = Path(pki_dir)
    now = now or utcnow()
    revoked = {r.serial for r in load_index(pki_dir / CA_DIR).records if r.revoked_at}
    out: list[tuple[Identity, Status]] = []
    for ident in list_issued(pki_dir):
        status: Status
        if ident.serial in revoked:
            status = "revoked"
        elif now > ident.not_after:
            status = "expired"
        elif now < ident.not_before:
            status = "not-yet-valid"
        else:
            status = "valid"
        out.append((ident, status))
    return out
