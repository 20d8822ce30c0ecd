"""Opening the CA for signing: its certificate and decrypted key, checked before any use.

The CA key is stored encrypted (PKCS#8 with the CA passphrase); an unencrypted one, from
before that, is refused with the one OpenSSL command that fixes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation.security.pki.clock import check_period
from federation.security.pki.errors import PKIError
from federation.security.pki.identity import attr, is_ca
from federation.security.pki.layout import CA_CERT, CA_DIR, CA_KEY
from federation.security.pki.passphrase import resolve_passphrase
from federation.security.pki.pem import ec_private_key, load_cert, read_file

__all__ = ["SigningCA", "open_ca"]

_RECREATE_HINT = "; create a new CA with `fedseek ca init --force` and re-issue every certificate"


@dataclass(frozen=True)
class SigningCA:
    """The CA, unlocked for one operation; ``dir`` is its directory (``pki_dir/ca``)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    consortium: str
    dir: Path


def open_ca(pki_dir: Path, passphrase: str | bytes | None, now: datetime) -> SigningCA:
    """Load the CA pair for signing; fails clearly when it is missing, locked or expired."""
    ca_dir = pki_dir / CA_DIR
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise PKIError(f"no consortium CA in {ca_dir} (run `fedseek ca init` first)")
    cert = load_cert(cert_path)
    if not is_ca(cert):
        raise PKIError(f"{cert_path} is not a CA certificate")
    consortium = attr(cert.subject, NameOID.ORGANIZATION_NAME)
    if consortium is None:
        raise PKIError(f"consortium CA in {ca_dir} has no organisation name")
    check_period(
        f"consortium CA ({consortium})", cert.not_valid_before_utc, cert.not_valid_after_utc, now, hint=_RECREATE_HINT
    )
    key = _load_ca_key(key_path, passphrase)
    if key.public_key() != cert.public_key():
        raise PKIError(f"CA private key {key_path} does not match {cert_path}")
    return SigningCA(cert=cert, key=key, consortium=consortium, dir=ca_dir)


def _load_ca_key(path: Path, passphrase: str | bytes | None) -> ec.EllipticCurvePrivateKey:
    data = read_file(path, "CA private key")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in data and b"Proc-Type: 4,ENCRYPTED" not in data:
        if re.search(rb"-----BEGIN (EC )?PRIVATE KEY-----", data):
            raise PKIError(
                f"CA private key {path} is not encrypted; encrypt it once with "
                f"`openssl pkcs8 -topk8 -v2 aes-256-cbc -in {path} -out {path}.enc && mv {path}.enc {path}`"
            )
        raise PKIError(f"malformed CA private key PEM: {path}")
    secret = resolve_passphrase(passphrase)
    try:
        return ec_private_key(data, password=secret, path=path, what="CA private key")
    except ValueError as exc:
        if "password" in str(exc).lower():
            raise PKIError(f"wrong passphrase for the CA private key {path}") from exc
        raise PKIError(f"malformed CA private key PEM: {path} (or wrong passphrase)") from exc
    except TypeError as exc:
        raise PKIError(f"malformed CA private key PEM: {path}") from exc
