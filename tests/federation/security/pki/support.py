"""Helpers shared by the PKI tests."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from federation.security.pki.clock import utcnow
from federation.security.pki.crl import sign_crl
from federation.security.pki.index import load_index
from federation.security.pki.signer import open_ca

PASS = "correct horse battery staple"


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under root with its mode and content: what 'nothing half-written' compares."""
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
    }


def read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def write_expired_crl(pki: Path, dest: Path | None) -> None:
    """A CRL properly signed by the CA of `pki` whose nextUpdate passed two days ago."""
    assert dest is not None
    ca = open_ca(pki, PASS, utcnow())
    dest.write_bytes(sign_crl(ca, load_index(ca.dir), now=datetime.now(UTC) - timedelta(days=3), days=1))
