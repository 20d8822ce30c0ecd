"""Consortium certificate authority for FedSeek.

Every party (coordinator, hospital nodes, reviewers, admins) authenticates to
every other party with mutual TLS, so one small CA issues all certificates.
The PEM files are consumed directly by stunnel sidecars and Python ``ssl``
servers, hence the plain on-disk layout::

    pki_dir/ca/ca.pem        CA certificate
    pki_dir/ca/ca.key        CA private key (0600)
    pki_dir/<name>/cert.pem  leaf certificate
    pki_dir/<name>/key.pem   leaf private key (0600)
    pki_dir/<name>/ca.pem    copy of the CA certificate (trust anchor)

Writes go through temporary files and directories that are renamed into
place, so an interrupted run never leaves a half-written key or certificate.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TypeGuard, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CAFiles",
    "Identity",
    "LeafFiles",
    "PKIError",
    "Role",
    "init_ca",
    "issue",
    "list_issued",
    "load_leaf",
    "read_identity",
    "verify_leaf",
]

Role = Literal["coordinator", "node", "reviewer", "admin"]

_ROLES: frozenset[str] = frozenset(get_args(Role))
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_CA_DIR = "ca"
_CA_CERT = "ca.pem"
_CA_KEY = "ca.key"
_LEAF_CERT = "cert.pem"
_LEAF_KEY = "key.pem"
_LEAF_CA = "ca.pem"
# Backdate fresh certificates slightly so peers with a skewed clock accept them.
_CLOCK_SKEW = timedelta(minutes=5)


class PKIError(RuntimeError):
    """A PKI operation failed; the message is meant for operators, not code."""


@dataclass(frozen=True)
class CAFiles:
    """Where the consortium CA lives on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class LeafFiles:
    """Everything a party needs to configure its mTLS endpoint."""

    name: str
    role: Role
    cert: Path
    key: Path
    ca_cert: Path


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


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def init_ca(
    pki_dir: Path,
    *,
    consortium: str = "fedseek",
    days: int = 3650,
    force: bool = False,
) -> CAFiles:
    """Create the consortium CA; refuse to clobber an existing one unless ``force``.

    Replacing a CA (``force=True``) invalidates every leaf issued by the old
    one, which is why it is opt-in.
    """
    _check_name(consortium, what="consortium name")
    _check_days(days)
    pki_dir = Path(pki_dir)
    ca_dir = pki_dir / _CA_DIR
    if not force and ((ca_dir / _CA_CERT).exists() or (ca_dir / _CA_KEY).exists()):
        raise PKIError(f"a consortium CA already exists in {ca_dir} (use force to replace it)")
    pki_dir.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} consortium CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )

    staging = Path(tempfile.mkdtemp(dir=pki_dir, prefix=f".{_CA_DIR}.new-"))
    try:
        _write_atomic(staging / _CA_KEY, _key_pem(key), mode=0o600)
        _write_atomic(
            staging / _CA_CERT,
            cert.public_bytes(serialization.Encoding.PEM),
            mode=0o644,
        )
        os.chmod(staging, 0o700)
        _install_dir(staging, ca_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CAFiles(cert=ca_dir / _CA_CERT, key=ca_dir / _CA_KEY)


def issue(
    pki_dir: Path,
    name: str,
    *,
    role: Role,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 30,
) -> LeafFiles:
    """Issue (or renew, replacing atomically) the certificate for party ``name``.

    Leaves are short-lived by default so a lost key stops working on its own;
    renewal is just issuing again. ``hosts`` become subjectAltNames so the
    party can also act as a TLS server under those names/addresses.
    """
    return _issue_at(pki_dir, name, role=role, hosts=hosts, days=days, not_before=None)


def load_leaf(pki_dir: Path, name: str) -> LeafFiles:
    """Locate the files previously issued for ``name`` so a party can start TLS."""
    _check_name(name, what="party name")
    leaf_dir = Path(pki_dir) / name
    files = (leaf_dir / _LEAF_CERT, leaf_dir / _LEAF_KEY, leaf_dir / _LEAF_CA)
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise PKIError(
            f"no complete certificate for '{name}' in {leaf_dir} (missing {', '.join(missing)}; issue one first)"
        )
    ident = read_identity(files[0])
    if ident.name != name:
        raise PKIError(f"certificate in {leaf_dir} belongs to '{ident.name}', not '{name}'")
    return LeafFiles(name=name, role=ident.role, cert=files[0], key=files[1], ca_cert=files[2])


def read_identity(cert_pem: Path) -> Identity:
    """Read who a leaf certificate speaks for, without checking who signed it.

    Use :func:`verify_leaf` when the answer must be trusted.
    """
    return _identity(_load_cert(Path(cert_pem)), Path(cert_pem))


def verify_leaf(
    cert_pem: Path,
    ca_cert_pem: Path,
    *,
    now: datetime | None = None,
) -> Identity:
    """Check that a leaf was issued by this consortium's CA and is valid at ``now``.

    This mirrors what the TLS stack enforces, so operators can diagnose a
    rejected peer with a readable message instead of an OpenSSL alert.
    """
    if now is None:
        now = _utcnow()
    elif now.tzinfo is None:
        raise PKIError("verify_leaf needs a timezone-aware 'now'")
    cert_path, ca_path = Path(cert_pem), Path(ca_cert_pem)
    cert = _load_cert(cert_path)
    ident = _identity(cert, cert_path)
    ca = _load_cert(ca_path)
    ca_org = _attr(ca.subject, NameOID.ORGANIZATION_NAME) or "?"

    if not _is_ca(ca):
        raise PKIError(f"{ca_path} is not a CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PKIError(f"certificate '{ident.name}' is not signed by the consortium CA ({ca_org})") from exc
    if ident.consortium != ca_org:
        raise PKIError(f"certificate '{ident.name}' belongs to consortium '{ident.consortium}', not '{ca_org}'")
    if _is_ca(cert):
        raise PKIError(f"certificate '{ident.name}' is a CA certificate, not a party certificate")
    if now < ca.not_valid_before_utc:
        raise PKIError(f"consortium CA ({ca_org}) is not valid until {_ts(ca.not_valid_before_utc)}")
    if now > ca.not_valid_after_utc:
        raise PKIError(f"consortium CA ({ca_org}) expired at {_ts(ca.not_valid_after_utc)}")
    if now < ident.not_before:
        raise PKIError(f"certificate '{ident.name}' is not valid until {_ts(ident.not_before)}")
    if now > ident.not_after:
        raise PKIError(f"certificate '{ident.name}' expired at {_ts(ident.not_after)}")
    return ident


def list_issued(pki_dir: Path) -> list[Identity]:
    """List the identities currently issued under ``pki_dir``, sorted by name.

    Used for audits and renewal planning; leftovers of interrupted writes
    (dot-prefixed staging directories) are ignored.
    """
    pki_dir = Path(pki_dir)
    if not pki_dir.is_dir():
        return []
    out: list[Identity] = []
    for child in sorted(pki_dir.iterdir()):
        if child.name == _CA_DIR or not _NAME_RE.match(child.name):
            continue
        cert = child / _LEAF_CERT
        if child.is_dir() and cert.is_file():
            out.append(read_identity(cert))
    return out


# --------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------


def _issue_at(
    pki_dir: Path,
    name: str,
    *,
    role: Role,
    hosts: Sequence[str],
    days: int,
    not_before: datetime | None,
) -> LeafFiles:
    """Issue a leaf; ``not_before`` overrides the start of validity (tests only)."""
    _check_name(name, what="party name")
    if name == _CA_DIR:
        raise PKIError(f"party name '{name}' is reserved for the CA directory")
    if not _is_role(role):
        raise PKIError(f"unknown role '{role}' (expected one of {', '.join(sorted(_ROLES))})")
    _check_days(days)
    pki_dir = Path(pki_dir)
    ca_cert, ca_key = _load_ca(pki_dir)
    consortium = _attr(ca_cert.subject, NameOID.ORGANIZATION_NAME)
    if consortium is None:
        raise PKIError(f"consortium CA in {pki_dir / _CA_DIR} has no organisation name")

    now = _utcnow()
    if not_before is None:
        start, valid_from = now, now - _CLOCK_SKEW
    else:
        start = valid_from = not_before.astimezone(UTC).replace(microsecond=0)
    valid_until = min(start + timedelta(days=days), ca_cert.not_valid_after_utc)
    if now > ca_cert.not_valid_after_utc:
        raise PKIError(f"consortium CA ({consortium}) expired at {_ts(ca_cert.not_valid_after_utc)}")
    if valid_until <= valid_from:
        raise PKIError(f"certificate '{name}' would expire before it becomes valid")

    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    sans = _san_entries(hosts)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())

    leaf_dir = pki_dir / name
    staging = Path(tempfile.mkdtemp(dir=pki_dir, prefix=f".{name}.new-"))
    try:
        _write_atomic(staging / _LEAF_KEY, _key_pem(key), mode=0o600)
        _write_atomic(
            staging / _LEAF_CERT,
            cert.public_bytes(serialization.Encoding.PEM),
            mode=0o644,
        )
        _write_atomic(
            staging / _LEAF_CA,
            ca_cert.public_bytes(serialization.Encoding.PEM),
            mode=0o644,
        )
        os.chmod(staging, 0o755)
        _install_dir(staging, leaf_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return LeafFiles(
        name=name,
        role=role,
        cert=leaf_dir / _LEAF_CERT,
        key=leaf_dir / _LEAF_KEY,
        ca_cert=leaf_dir / _LEAF_CA,
    )


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA pair, failing clearly when it was never initialised."""
    ca_dir = pki_dir / _CA_DIR
    cert_path, key_path = ca_dir / _CA_CERT, ca_dir / _CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise PKIError(f"no consortium CA in {ca_dir} (run init_ca first)")
    cert = _load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"malformed CA private key PEM: {key_path}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"CA private key {key_path} is not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise PKIError(f"CA private key {key_path} does not match {cert_path}")
    if not _is_ca(cert):
        raise PKIError(f"{cert_path} is not a CA certificate")
    return cert, key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PKIError(f"certificate not found: {path}") from exc
    except OSError as exc:
        raise PKIError(f"cannot read certificate {path}: {exc.strerror}") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PKIError(f"malformed certificate PEM: {path}") from exc


def _identity(cert: x509.Certificate, path: Path) -> Identity:
    name = _attr(cert.subject, NameOID.COMMON_NAME)
    consortium = _attr(cert.subject, NameOID.ORGANIZATION_NAME)
    role = _attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if name is None or consortium is None or role is None:
        raise PKIError(f"{path} is not a FedSeek party certificate (needs CN, O and OU)")
    if not _is_role(role):
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


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
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


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _is_role(value: str) -> TypeGuard[Role]:
    return value in _ROLES


def _check_name(name: str, *, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PKIError(
            f"invalid {what} {name!r}: use 1-63 lowercase letters, digits or '-', starting with a letter or digit"
        )


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"validity must be a positive number of days, got {days!r}")


def _utcnow() -> datetime:
    # X.509 times have one-second resolution; keep Identity values comparable.
    return datetime.now(UTC).replace(microsecond=0)


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: stunnel and ssl.load_cert_chain read it without a prompt;
    # the 0600 file mode is what protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write via temp file + fsync + rename so readers never see a partial file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _install_dir(staging: Path, dest: Path) -> None:
    """Move a fully written directory into place, replacing any previous one.

    POSIX cannot rename over a non-empty directory, so the old one is moved
    aside first and restored if the second rename fails.
    """
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
        os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    _fsync_dir(dest.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_party(pki_dir: Path, name: str, *, role: Role, now: datetime | None = None) -> LeafFiles:
    """A party's files after checking its certificate chains to the CA and carries `role`."""
    leaf = load_leaf(pki_dir, name)
    identity = verify_leaf(leaf.cert, leaf.ca_cert, now=now)
    if identity.role != role:
        raise PKIError(f"certificate {identity.name!r} has role {identity.role!r}, expected {role!r}")
    return leaf
