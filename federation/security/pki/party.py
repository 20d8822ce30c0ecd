"""What a party checks before it starts TLS: its own files, and that a certificate is one it should trust.

The checks mirror what the TLS stack enforces, so a party with a damaged, foreign, expired or
revoked certificate stops at start-up with a readable reason instead of an OpenSSL alert later.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from federation.security.pki.clock import check_period, ts, utcnow
from federation.security.pki.crl import check_crl, load_crl, reason_text
from federation.security.pki.errors import PKIError
from federation.security.pki.hosts import coordinator_host
from federation.security.pki.identity import Identity, Role, check_name, identity_of, is_ca, org
from federation.security.pki.layout import CRL_FILE, LEAF_CA, LEAF_CERT, LEAF_KEY, LeafFiles
from federation.security.pki.pem import load_cert, load_leaf_key

__all__ = ["check_issued_by", "load_leaf", "load_party", "verify_leaf"]


def load_leaf(pki_dir: Path, name: str) -> LeafFiles:
    """Locate the files previously issued for ``name`` so a party can start TLS.

    The key is parsed and matched to the certificate here, so a damaged file
    is reported by name instead of as a TLS alert.
    """
    check_name(name, what="party name")
    leaf_dir = Path(pki_dir) / name
    files = (leaf_dir / LEAF_CERT, leaf_dir / LEAF_KEY, leaf_dir / LEAF_CA)
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise PKIError(
            f"no complete certificate for '{name}' in {leaf_dir} (missing {', '.join(missing)}; issue one first)"
        )
    cert = load_cert(files[0])
    ident = identity_of(cert, files[0])
    if ident.name != name:
        raise PKIError(f"certificate in {leaf_dir} belongs to '{ident.name}', not '{name}'")
    if load_leaf_key(files[1]).public_key() != cert.public_key():
        raise PKIError(f"private key {files[1]} does not match certificate {files[0]}")
    crl = leaf_dir / CRL_FILE
    return LeafFiles(
        name=name,
        role=ident.role,
        cert=files[0],
        key=files[1],
        ca_cert=files[2],
        crl=crl if crl.is_file() else None,
    )


def load_party(pki_dir: Path, name: str, *, role: Role, now: datetime | None = None) -> LeafFiles:
    """A party's files after checking its certificate chains to the CA, is not revoked and carries `role`."""
    leaf = load_leaf(pki_dir, name)
    identity = verify_leaf(leaf.cert, leaf.ca_cert, now=now, crl=leaf.crl)
    if identity.role != role:
        raise PKIError(f"certificate {identity.name!r} has role {identity.role!r}, expected {role!r}")
    role_name = coordinator_host(identity.consortium)
    if role == "coordinator" and role_name not in identity.hosts:
        raise PKIError(
            f"certificate {identity.name!r} lacks the coordinator's role name {role_name!r}, which sites "
            f"check; renew it (`fedseek ca renew {identity.name}` adds it)"
        )
    return leaf


def verify_leaf(
    cert_pem: Path,
    ca_cert_pem: Path,
    *,
    now: datetime | None = None,
    crl: Path | None = None,
) -> Identity:
    """Check that a leaf was issued by this consortium's CA, is valid at ``now`` and not revoked.

    This mirrors what the TLS stack enforces, so operators can diagnose a
    rejected peer with a readable message instead of an OpenSSL alert. The CRL
    defaults to ``crl.pem`` beside the CA certificate, when there is one; like
    OpenSSL, an expired or foreign CRL is an error, not a pass.
    """
    if now is None:
        now = utcnow()
    elif now.tzinfo is None:
        raise PKIError("verify_leaf needs a timezone-aware 'now'")
    cert_path, ca_path = Path(cert_pem), Path(ca_cert_pem)
    cert = load_cert(cert_path)
    ident = identity_of(cert, cert_path)
    ca = load_cert(ca_path)
    check_issued_by(cert, ident, ca, ca_path)
    check_period(f"consortium CA ({org(ca)})", ca.not_valid_before_utc, ca.not_valid_after_utc, now)
    check_period(f"certificate '{ident.name}'", ident.not_before, ident.not_after, now)
    crl_path = Path(crl) if crl is not None else ca_path.parent / CRL_FILE
    if crl is not None or crl_path.is_file():
        revoked = check_crl(load_crl(crl_path), crl_path, ca, now).get_revoked_certificate_by_serial_number(
            ident.serial
        )
        if revoked is not None:
            raise PKIError(
                f"certificate '{ident.name}' (serial {ident.serial:x}) was revoked at "
                f"{ts(revoked.revocation_date_utc)}{reason_text(revoked)}"
            )
    return ident


def check_issued_by(cert: x509.Certificate, ident: Identity, ca: x509.Certificate, ca_path: Path) -> None:
    """The leaf names this CA's consortium and carries its signature (the signature is what counts)."""
    if not is_ca(ca):
        raise PKIError(f"{ca_path} is not a CA certificate")
    ca_org = org(ca)
    if ident.consortium != ca_org:
        raise PKIError(f"certificate '{ident.name}' is from consortium '{ident.consortium}', not '{ca_org}'")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PKIError(f"certificate '{ident.name}' is not signed by the consortium CA ({ca_org})") from exc
    if is_ca(cert):
        raise PKIError(f"certificate '{ident.name}' is a CA certificate, not a party certificate")
