"""The CA passphrase: where CA operations get it, and the file that keeps it out of ``ps``.

Only CA operations (init, issue, renew, revoke, crl) need the CA passphrase; parties never
do. It is passed in, or read from ``FEDSEEK_CA_PASSPHRASE``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from federation.ops.atomic import write_atomic
from federation.security.pki.errors import PKIError
from federation.security.pki.pem import read_file

__all__ = [
    "MIN_PASSPHRASE_LEN",
    "PASSPHRASE_ENV",
    "generate_passphrase_file",
    "read_passphrase_file",
    "resolve_passphrase",
]

PASSPHRASE_ENV = "FEDSEEK_CA_PASSPHRASE"
# PKCS#8 encryption in cryptography uses PBKDF2 with a fixed, modest iteration count,
# so the passphrase itself has to carry the strength.
MIN_PASSPHRASE_LEN = 12


def read_passphrase_file(path: Path) -> bytes:
    """The CA passphrase stored in ``path`` (one trailing newline ignored).

    A file, not a command-line argument, so the secret never shows in ``ps``.
    """
    data = read_file(Path(path), "passphrase file")
    data = data[:-2] if data.endswith(b"\r\n") else data.removesuffix(b"\n")
    if not data:
        raise PKIError(f"passphrase file {path} is empty")
    return data


def generate_passphrase_file(path: Path) -> bytes:
    """Write a random CA passphrase to a new 0600 file and return it.

    For unattended set-ups (the demo, CI); refuses to overwrite, since losing the
    passphrase of an existing CA locks it for good.
    """
    path = Path(path)
    if path.exists():
        raise PKIError(f"passphrase file {path} already exists")
    secret = secrets.token_urlsafe(32).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, secret + b"\n", mode=0o600)
    return secret


def resolve_passphrase(value: str | bytes | None) -> bytes:
    """The passphrase a CA operation was given, else ``$FEDSEEK_CA_PASSPHRASE``; never empty."""
    if value is None:
        value = os.environ.get(PASSPHRASE_ENV)
        if not value:
            raise PKIError(f"the CA passphrase is needed: give --passphrase-file FILE or set {PASSPHRASE_ENV}")
    secret = value.encode("utf-8") if isinstance(value, str) else value
    if not secret:
        raise PKIError("the CA passphrase is empty")
    return secret
