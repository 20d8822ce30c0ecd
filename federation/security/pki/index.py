"""The CA's records (``ca/index.json``): every certificate it issued, with expiry and revocation.

The CA keeps no copy of the leaves it signed; revocation, the CRL and `fedseek ca list` work
from these records alone, which is also why listing needs no passphrase.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from federation.security.pki.clock import parse_ts, ts
from federation.security.pki.errors import PKIError
from federation.security.pki.layout import INDEX_FILE
from federation.security.pki.pem import read_file

__all__ = ["Index", "Record", "index_bytes", "load_index"]


@dataclass(frozen=True)
class Record:
    """One issued certificate, as the CA remembers it (for revocation and the CRL)."""

    serial: int
    name: str
    role: str
    not_after: datetime
    revoked_at: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Index:
    """All records, and the number the next CRL is signed with (RFC 5280: it only goes up)."""

    records: tuple[Record, ...] = ()
    crl_number: int = 1


def load_index(ca_dir: Path) -> Index:
    """The index in ``ca_dir``; an empty one before the first certificate."""
    path = ca_dir / INDEX_FILE
    if not path.is_file():
        return Index()
    try:
        data = json.loads(read_file(path, "CA index"))
        records = tuple(
            Record(
                serial=int(r["serial"], 16),
                name=str(r["name"]),
                role=str(r["role"]),
                not_after=parse_ts(r["not_after"]),
                revoked_at=parse_ts(r["revoked_at"]) if r.get("revoked_at") else None,
                reason=r.get("reason"),
            )
            for r in data["certificates"]
        )
        return Index(records=records, crl_number=int(data["crl_number"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise PKIError(f"CA index {path} is corrupt ({exc})") from exc


def index_bytes(index: Index) -> bytes:
    """The file content for ``index``, as :func:`load_index` reads it back."""
    records = [
        {
            "serial": f"{r.serial:x}",
            "name": r.name,
            "role": r.role,
            "not_after": ts(r.not_after),
            "revoked_at": ts(r.revoked_at) if r.revoked_at else None,
            "reason": r.reason,
        }
        for r in index.records
    ]
    return (json.dumps({"crl_number": index.crl_number, "certificates": records}, indent=2) + "\n").encode()
