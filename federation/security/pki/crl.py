"""The certificate revocation list: the CA signs it, every party checks peers against its copy.

Each party reads only its own directory, so every CA operation publishes the CRL it signs to the
CA's directory and to each party's (`federation.security.pki.ca`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.security.pki.clock import CLOCK_SKEW, ts
from federation.security.pki.errors import PKIError
from federation.security.pki.identity import org
from federation.security.pki.index import Index
from federation.security.pki.pem import read_file
from federation.security.pki.signer import SigningCA

__all__ = [
    "CRL_DAYS",
    "REASON_FLAGS",
    "Reason",
    "check_crl",
    "is_revoked",
    "load_crl",
    "reason_text",
    "sign_crl",
]

# RFC 5280 reason codes an operator may give; CA/AA compromise and holds make no sense here.
Reason = Literal[
    "unspecified",
    "key-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
    "privilege-withdrawn",
]
REASON_FLAGS: dict[str, x509.ReasonFlags] = {r: x509.ReasonFlags[r.replace("-", "_")] for r in get_args(Reason)}
# How long a CRL stays acceptable: OpenSSL (stunnel, Python ssl) rejects every peer once the
# CRL's nextUpdate has passed, so `write_crl` must run (and be published) more often than this.
CRL_DAYS = 7


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """Parse a PEM CRL, with an operator-readable error for a bad file."""
    path = Path(path)
    try:
        return x509.load_pem_x509_crl(read_file(path, "CRL"))
    except ValueError as exc:
        raise PKIError(f"malformed CRL PEM: {path}") from exc


def is_revoked(cert: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    """Whether ``crl`` lists ``cert``; the CRL's own signature is not checked here."""
    return crl.issuer == cert.issuer and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def check_crl(
    crl: x509.CertificateRevocationList, path: Path, ca: x509.Certificate, now: datetime
) -> x509.CertificateRevocationList:
    """``crl`` if ``ca`` signed it and it has not expired; like OpenSSL, anything else is refused."""
    ca_key = ca.public_key()
    if (
        crl.issuer != ca.subject
        or not isinstance(ca_key, ec.EllipticCurvePublicKey)
        or not crl.is_signature_valid(ca_key)
    ):
        raise PKIError(f"CRL {path} is not signed by the consortium CA ({org(ca)})")
    next_update = crl.next_update_utc
    if next_update is None or now > next_update:
        when = ts(next_update) if next_update else "an unknown time"
        raise PKIError(f"CRL {path} expired at {when}; publish a fresh one with `fedseek ca crl`")
    return crl


def reason_text(revoked: x509.RevokedCertificate) -> str:
    """`` (key-compromise)`` for a message, or nothing where the CRL gives no reason."""
    try:
        flag = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return ""
    return f" ({flag.name.replace('_', '-')})"


def sign_crl(ca: SigningCA, index: Index, *, now: datetime, days: int = CRL_DAYS) -> bytes:
    """The CRL for ``index``: revoked certificates until they expire (then TLS refuses them anyway)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(min(now + timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.CRLNumber(index.crl_number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for record in index.records:
        if record.revoked_at is None or record.not_after < now:
            continue
        entry = x509.RevokedCertificateBuilder().serial_number(record.serial).revocation_date(record.revoked_at)
        if record.reason and record.reason != "unspecified":  # RFC 5280: omit rather than say "unspecified"
            entry = entry.add_extension(x509.CRLReason(REASON_FLAGS[record.reason]), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
