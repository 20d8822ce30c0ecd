"""Who a certificate speaks for: party names, roles, and reading them back from certificates.

A party certificate says who in its subject (CN = party name, O = consortium, OU = role) and
where it may serve in its subjectAltNames (DNS names and IP addresses). Reading an identity
checks nothing about who signed it; `federation.security.pki.party.verify_leaf` does that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeGuard, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from federation.security.pki.errors import PKIError
from federation.security.pki.pem import load_cert

__all__ = [
    "NAME_RE",
    "ROLES",
    "Identity",
    "Role",
    "attr",
    "check_member",
    "check_name",
    "consortium_of",
    "identity_from_der",
    "identity_of",
    "is_ca",
    "is_role",
    "org",
    "read_identity",
]

Role = Literal["coordinator", "node", "reviewer", "admin", "monitor"]
"""`monitor`: a metrics scraper (Prometheus); may read `/metrics` and nothing else, anywhere."""
ROLES: frozenset[str] = frozenset(get_args(Role))
# Party and consortium names; a party's name is also its directory under the PKI directory.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Identity:
    """Who a certificate speaks for, as read from the certificate itself.

    ``hosts`` lists the subjectAltName entries (DNS names and IP addresses).
    ``fingerprint_sha256`` is lowercase hex without separators.
    """

    name: str
    role: Role
    consortium: str
    not_before: datetime
    not_after: datetime
    serial: int
    fingerprint_sha256: str
    hosts: tuple[str, ...] = ()


def read_identity(cert_pem: Path | x509.Certificate) -> Identity:
    """Read who a leaf certificate speaks for, without checking who signed it.

    Use :func:`federation.security.pki.party.verify_leaf` when the answer must be trusted.
    """
    if isinstance(cert_pem, x509.Certificate):
        return identity_of(cert_pem, "certificate")
    return identity_of(load_cert(Path(cert_pem)), Path(cert_pem))


def identity_from_der(der: bytes) -> Identity:
    """Who a certificate received in a TLS handshake speaks for (the TLS stack verified it)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PKIError(f"peer certificate is not valid DER: {exc}") from exc
    return identity_of(cert, Path("<peer certificate>"))


def identity_of(cert: x509.Certificate, path: Path | str) -> Identity:
    """The identity ``cert`` claims; ``path`` names it in errors."""
    name = attr(cert.subject, NameOID.COMMON_NAME)
    consortium = attr(cert.subject, NameOID.ORGANIZATION_NAME)
    role = attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if name is None or consortium is None or role is None:
        raise PKIError(f"{path} is not a FedSeek party certificate (needs CN, O and OU)")
    if not is_role(role):
        raise PKIError(f"{path} has unknown role '{role}'")
    return Identity(
        name=name,
        role=role,
        consortium=consortium,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial=cert.serial_number,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        hosts=_cert_hosts(cert),
    )


def _cert_hosts(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


def attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    """The first ``oid`` attribute of ``name`` as text, None when absent."""
    attrs = name.get_attributes_for_oid(oid)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def org(cert: x509.Certificate) -> str:
    """The consortium a certificate names (its subject's O), for messages."""
    return attr(cert.subject, NameOID.ORGANIZATION_NAME) or "?"


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def is_role(value: str) -> TypeGuard[Role]:
    return value in ROLES


def consortium_of(ca_cert: Path | x509.Certificate) -> str:
    """The consortium a CA certificate speaks for (its subject's O); PKIError if it names none."""
    cert = ca_cert if isinstance(ca_cert, x509.Certificate) else load_cert(Path(ca_cert))
    consortium = attr(cert.subject, NameOID.ORGANIZATION_NAME)
    if not consortium:
        raise PKIError(f"{ca_cert if isinstance(ca_cert, Path) else 'the CA certificate'} names no consortium (O)")
    return consortium


def check_member(identity: Identity, consortium: str) -> Identity:
    """`identity` if it is a party of `consortium`: same organisation (O), a valid party name (CN).

    The TLS stack proves the CA signed the certificate; this refuses one the CA signed for
    another organisation (or with a name no party could have), which a check of the chain alone
    would accept.
    """
    if identity.consortium != consortium:
        raise PKIError(
            f"certificate {identity.name!r} is from organisation {identity.consortium!r}, not consortium {consortium!r}"
        )
    if not NAME_RE.match(identity.name):
        raise PKIError(f"certificate names no valid party ({identity.name!r})")
    return identity


def check_name(name: str, *, what: str) -> None:
    """Refuse a party or consortium name that could not be a directory name or a CN."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PKIError(
            f"invalid {what} {name!r}: use 1-63 lowercase letters, digits or '-', starting with a letter or digit"
        )
