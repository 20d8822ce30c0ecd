"""What the CA signs: its own certificate and party certificates, with their extensions.

Both are ECDSA P-256 with SHA-256. The CA may sign certificates and CRLs only, and no
intermediate CAs (path length 0); a party certificate may sign TLS handshakes only, as client
and as server, under the host names and addresses given as subjectAltNames.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.security.pki.errors import PKIError
from federation.security.pki.identity import Role
from federation.security.pki.signer import SigningCA

__all__ = ["build_ca_cert", "san_entries", "sign_leaf"]


def build_ca_cert(
    key: ec.EllipticCurvePrivateKey, *, consortium: str, not_before: datetime, not_after: datetime
) -> x509.Certificate:
    """The consortium's self-signed CA certificate for ``key``."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} consortium CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def sign_leaf(
    ca: SigningCA,
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
    *,
    name: str,
    role: Role,
    sans: Sequence[x509.GeneralName],
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """Party ``name``'s certificate for ``key``, signed by ``ca`` (CN = name, O = consortium, OU = role).

    ``key`` may be the party's public key alone: a certificate request (`pki.sign_request`) brings
    no private key to the CA. Every extension comes from here, never from the request.
    """
    public_key = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.consortium),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Turn hosts into SANs; IPs must be IPAddress entries or TLS won't match them."""
    if isinstance(hosts, str):
        raise PKIError("hosts must be a sequence of host names, not a single string")
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        host = raw.strip().lower()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not host.isascii() or any(c.isspace() for c in host):
            raise PKIError(f"invalid host name '{raw}' (use ASCII/punycode DNS names)")
        entries.append(x509.DNSName(host))
    return entries


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """CA: sign certificates and CRLs only; leaf: sign TLS handshakes only."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
