"""Certificate requests: a party makes its key and a PKCS#10 request; the CA signs it with its own policy.

The private key never leaves the party. The CA takes from a request only what it cannot decide
itself: the public key (proved by the request's self-signature) and the party name (its CN),
checked against the same rules as `pki.issue`. Role, host names (subjectAltNames), key usage and
validity come from the CA operator's command line and the CA's policy (`certs.sign_leaf`);
whatever extensions a request asks for (extra names, ``CA:TRUE``) are ignored, and reported.

A name that already holds a current certificate is another party's unless the request proves it
is the same party: signed by the key of that certificate (`--keep-key`), or carrying a renewal
proof, a signature over the request by that key (`renewal_proof`). So a site renews with a fresh
key without the CA ever seeing either key, and nobody else can take over its name.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation.security.pki.ca import DEFAULT_LEAF_DAYS, issue_at
from federation.security.pki.certs import san_entries
from federation.security.pki.clock import utcnow
from federation.security.pki.errors import PKIError
from federation.security.pki.hosts import LOOPBACK_BY_ROLE, renewable
from federation.security.pki.identity import Identity, Role, attr, check_name, identity_of, is_role
from federation.security.pki.index import load_index
from federation.security.pki.layout import CA_CERT, CA_DIR, LEAF_CERT, LeafFiles
from federation.security.pki.party import check_issued_by
from federation.security.pki.pem import load_cert, read_file

__all__ = [
    "RENEWAL_CONTEXT",
    "Signed",
    "build_request",
    "load_request",
    "renewal_proof",
    "request_name",
    "request_pem",
    "sign_request",
]

RENEWAL_CONTEXT = b"fedseek-renewal-v1\0"
"""Prefix of what a renewal proof signs, so the signature means nothing anywhere else."""


@dataclass(frozen=True)
class Signed:
    """What `sign_request` issued, and what the request asked for that the CA did not grant."""

    leaf: LeafFiles
    identity: Identity
    renewal: bool
    ignored: tuple[str, ...]


def build_request(
    key: ec.EllipticCurvePrivateKey, name: str, *, hosts: Sequence[str] = ()
) -> x509.CertificateSigningRequest:
    """A request for party ``name``'s certificate, signed by ``key`` (CN = name).

    ``hosts`` are asked for as subjectAltNames, for the CA operator to read: `sign_request` grants
    only the names its operator gives, so a request never decides what a certificate may serve.
    """
    check_name(name, what="party name")
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
    return builder.sign(key, hashes.SHA256())


def request_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def renewal_proof(current_key: ec.EllipticCurvePrivateKey, csr: x509.CertificateSigningRequest) -> bytes:
    """The current key's signature over ``csr`` (base64, one line): "the holder of my certificate asks"."""
    der = csr.public_bytes(serialization.Encoding.DER)
    return base64.b64encode(current_key.sign(RENEWAL_CONTEXT + der, ec.ECDSA(hashes.SHA256()))) + b"\n"


def load_request(path: Path) -> x509.CertificateSigningRequest:
    """Parse a PEM request and check its self-signature (proof the requester holds the key)."""
    path = Path(path)
    try:
        csr = x509.load_pem_x509_csr(read_file(path, "certificate request"))
    except ValueError as exc:
        raise PKIError(f"malformed certificate request PEM: {path}") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PKIError(f"certificate request {path} has an unreadable signature") from exc
    if not valid:
        raise PKIError(f"certificate request {path} is not signed by its own key (altered in transit?)")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PKIError(f"certificate request {path}: party keys are ECDSA P-256 (make one with `fedseek node enroll`)")
    return csr


def request_name(csr: x509.CertificateSigningRequest) -> str:
    """The party name a request asks for (its CN), checked against the naming rules."""
    name = attr(csr.subject, NameOID.COMMON_NAME)
    if name is None:
        raise PKIError("the certificate request names no party (no CN)")
    check_name(name, what="party name")
    return name


def sign_request(
    pki_dir: Path,
    csr_path: Path,
    *,
    role: Role,
    hosts: Sequence[str] | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    proof: bytes | None = None,
    passphrase: str | bytes | None = None,
) -> Signed:
    """Issue the certificate ``csr_path`` asks for, under the CA's rules; no private key is read but the CA's.

    ``hosts``: the names the certificate serves under (the role's loopback names are added, as by
    `pki.issue`); None on a renewal keeps the current certificate's. ``proof``: the renewal proof
    (`renewal_proof`) when the name already holds a current certificate and the request brings a
    new key. The certificate, CA certificate, CRL and publishers.json land in ``pki_dir/<name>/``,
    the bundle the party copies back.
    """
    if not is_role(role):
        raise PKIError(f"unknown role '{role}'")
    csr = load_request(csr_path)
    name = request_name(csr)
    pki_dir = Path(pki_dir)
    current = _current(pki_dir, name)
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):  # load_request refused anything else already
        raise PKIError(f"certificate request {csr_path}: party keys are ECDSA P-256")
    if current is not None:
        _check_renewal(current, role, key, csr, proof, csr_path)
        if hosts is None:
            hosts = renewable(role, current[0].hosts)
    if isinstance(hosts, str):
        raise PKIError("hosts must be a sequence of host names, not a single string")
    wanted = tuple(hosts or ())
    leaf = issue_at(
        pki_dir,
        name,
        role=role,
        hosts=(*wanted, *LOOPBACK_BY_ROLE[role]),
        days=days,
        not_before=None,
        passphrase=passphrase,
        key=key,
    )
    ident = identity_of(load_cert(leaf.cert), leaf.cert)
    return Signed(leaf=leaf, identity=ident, renewal=current is not None, ignored=_ignored(csr, ident))


def _current(pki_dir: Path, name: str) -> tuple[Identity, ec.EllipticCurvePublicKey] | None:
    """The certificate ``name`` holds now (issued here, unexpired, unrevoked) and its key, if any."""
    path = pki_dir / name / LEAF_CERT
    if not path.is_file():
        return None
    cert = load_cert(path)
    ident = identity_of(cert, path)
    ca_path = pki_dir / CA_DIR / CA_CERT
    check_issued_by(cert, ident, load_cert(ca_path), ca_path)
    records = {r.serial: r for r in load_index(pki_dir / CA_DIR).records}
    record = records.get(ident.serial)
    if record is None or record.revoked_at is not None or ident.not_after < utcnow():
        return None  # revoked or expired: the name is free to enroll afresh, as `ca issue` may
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"certificate {path} does not hold an ECDSA key")
    return ident, key


def _check_renewal(
    current: tuple[Identity, ec.EllipticCurvePublicKey],
    role: Role,
    key: ec.EllipticCurvePublicKey,
    csr: x509.CertificateSigningRequest,
    proof: bytes | None,
    csr_path: Path,
) -> None:
    ident, current_key = current
    held = (
        f"'{ident.name}' holds a current {ident.role} certificate (serial {ident.serial:x}, until "
        f"{ident.not_after:%Y-%m-%d}); "
    )
    if ident.role != role:
        raise PKIError(held + f"a request may not turn it into a {role} certificate")
    if key == current_key:
        return  # `--keep-key`: the request's own signature is by the current key
    if proof is None:
        raise PKIError(
            held + f"request {csr_path} is not from its holder (no renewal proof: the site renews with "
            "`fedseek node enroll --renew`; revoke the old certificate first to re-enroll a lost site)"
        )
    try:
        signature = base64.b64decode(proof.strip(), validate=True)
        current_key.verify(
            signature, RENEWAL_CONTEXT + csr.public_bytes(serialization.Encoding.DER), ec.ECDSA(hashes.SHA256())
        )
    except (ValueError, InvalidSignature) as exc:
        raise PKIError(held + f"the renewal proof for {csr_path} is not signed by its key") from exc


def _ignored(csr: x509.CertificateSigningRequest, ident: Identity) -> tuple[str, ...]:
    """What the request asked for that the certificate does not carry (for the operator to see)."""
    out: list[str] = []
    for ext in csr.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            names = [*value.get_values_for_type(x509.DNSName), *map(str, value.get_values_for_type(x509.IPAddress))]
            out.extend(f"subjectAltName {n}" for n in names if n not in ident.hosts)
        elif isinstance(value, x509.BasicConstraints):
            if value.ca:
                out.append("CA:TRUE")
        else:
            out.append(f"extension {ext.oid.dotted_string}")
    extra = [a for a in csr.subject if a.oid != NameOID.COMMON_NAME]
    out.extend(f"subject {a.rfc4514_string()}" for a in extra)
    return tuple(out)
