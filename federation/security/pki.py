"""Consortium certificate authority for FedSeek.

Every party (coordinator, hospital nodes, reviewers, admins) authenticates to
every other party with mutual TLS, so one small CA issues all certificates.
The PEM files are consumed directly by stunnel sidecars and Python ``ssl``
servers, hence the plain on-disk layout::

    pki_dir/ca/ca.pem        CA certificate
    pki_dir/ca/ca.key        CA private key, PKCS#8 encrypted with the CA passphrase (0600)
    pki_dir/ca/index.json    every certificate issued: serial, name, role, expiry, revocation
    pki_dir/ca/crl.pem       certificate revocation list signed by the CA
    pki_dir/<name>/cert.pem  leaf certificate
    pki_dir/<name>/key.pem   leaf private key (0600, unencrypted: sidecars start unattended)
    pki_dir/<name>/ca.pem    copy of the CA certificate (trust anchor)
    pki_dir/<name>/crl.pem   copy of the CRL (each party reads only its own directory)
    pki_dir/site-keys/       Flower SuperNode public keys (see federation.security.site_binding)

Only CA operations (init, issue, renew, revoke, crl) need the CA passphrase;
parties never do. It is passed in, or read from ``FEDSEEK_CA_PASSPHRASE``.

Each operation checks its input and signs everything in memory before it
writes, and writes go through temporary files and directories renamed into
place: a refused or interrupted operation leaves the PKI directory as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TypeGuard, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.ops.atomic import install_dir, write_atomic

__all__ = [
    "CRL_DAYS",
    "DEFAULT_LEAF_DAYS",
    "MAX_LEAF_DAYS",
    "PASSPHRASE_ENV",
    "SITE_KEYS_DIR",
    "CAFiles",
    "Identity",
    "LeafFiles",
    "PKIError",
    "Reason",
    "Role",
    "Status",
    "generate_passphrase_file",
    "identity_from_der",
    "init_ca",
    "is_revoked",
    "issue",
    "list_issued",
    "list_status",
    "load_crl",
    "load_leaf",
    "load_party",
    "read_identity",
    "read_passphrase_file",
    "renew",
    "revoke",
    "verify_leaf",
    "write_crl",
]

Role = Literal["coordinator", "node", "reviewer", "admin"]
# RFC 5280 reason codes an operator may give; CA/AA compromise and holds make no sense here.
Reason = Literal[
    "unspecified",
    "key-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
    "privilege-withdrawn",
]
Status = Literal["valid", "revoked", "expired", "not-yet-valid"]

PASSPHRASE_ENV = "FEDSEEK_CA_PASSPHRASE"
# PKCS#8 encryption in cryptography uses PBKDF2 with a fixed, modest iteration count,
# so the passphrase itself has to carry the strength.
MIN_PASSPHRASE_LEN = 12
DEFAULT_LEAF_DAYS = 30
MAX_LEAF_DAYS = 90
# How long a CRL stays acceptable: OpenSSL (stunnel, Python ssl) rejects every peer once the
# CRL's nextUpdate has passed, so `write_crl` must run (and be published) more often than this.
CRL_DAYS = 7
SITE_KEYS_DIR = "site-keys"

_ROLES: frozenset[str] = frozenset(get_args(Role))
_REASON_FLAGS: dict[str, x509.ReasonFlags] = {r: x509.ReasonFlags[r.replace("-", "_")] for r in get_args(Reason)}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_CA_DIR = "ca"
_RESERVED = frozenset({_CA_DIR, SITE_KEYS_DIR})
_CA_CERT = "ca.pem"
_CA_KEY = "ca.key"
_INDEX = "index.json"
_CRL = "crl.pem"
_LEAF_CERT = "cert.pem"
_LEAF_KEY = "key.pem"
_LEAF_CA = "ca.pem"
_LEAF_MANAGED = frozenset({_LEAF_CERT, _LEAF_KEY, _LEAF_CA, _CRL})
# Backdate fresh certificates and CRLs slightly so peers with a skewed clock accept them.
_CLOCK_SKEW = timedelta(minutes=5)
_TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_RECREATE_HINT = "; create a new CA with `fedseek ca init --force` and re-issue every certificate"


class PKIError(RuntimeError):
    """A PKI operation failed; the message is meant for operators, not code."""


@dataclass(frozen=True)
class CAFiles:
    """Where the consortium CA lives on disk."""

    cert: Path
    key: Path
    crl: Path


@dataclass(frozen=True)
class LeafFiles:
    """Everything a party needs to configure its mTLS endpoint.

    ``crl`` is the party's copy of the revocation list, None where none was published
    (directories assembled by hand).
    """

    name: str
    role: Role
    cert: Path
    key: Path
    ca_cert: Path
    crl: Path | None = None


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


def read_passphrase_file(path: Path) -> bytes:
    """The CA passphrase stored in ``path`` (one trailing newline ignored).

    A file, not a command-line argument, so the secret never shows in ``ps``.
    """
    data = _read_file(Path(path), "passphrase file")
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


def init_ca(
    pki_dir: Path,
    *,
    consortium: str = "fedseek",
    days: int = 3650,
    force: bool = False,
    passphrase: str | bytes | None = None,
) -> CAFiles:
    """Create the consortium CA; refuse to clobber an existing one unless ``force``.

    Replacing a CA (``force=True``) invalidates every leaf issued by the old
    one, which is why it is opt-in. The key is stored encrypted with
    ``passphrase`` (default: ``$FEDSEEK_CA_PASSPHRASE``).
    """
    _check_name(consortium, what="consortium name")
    _check_days(days)
    secret = _passphrase(passphrase)
    if len(secret) < MIN_PASSPHRASE_LEN:
        raise PKIError(f"the CA passphrase must be at least {MIN_PASSPHRASE_LEN} characters")
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
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    index = _Index()
    crl = _sign_crl(_CA(cert=cert, key=key, consortium=consortium, dir=ca_dir), index, now=now)

    staging = Path(tempfile.mkdtemp(dir=pki_dir, prefix=f".{_CA_DIR}.new-"))
    try:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(secret),
        )
        write_atomic(staging / _CA_KEY, key_pem, mode=0o600)
        write_atomic(staging / _CA_CERT, _cert_pem(cert), mode=0o644)
        write_atomic(staging / _INDEX, _index_bytes(index), mode=0o644)
        write_atomic(staging / _CRL, crl, mode=0o644)
        os.chmod(staging, 0o700)
        install_dir(staging, ca_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CAFiles(cert=ca_dir / _CA_CERT, key=ca_dir / _CA_KEY, crl=ca_dir / _CRL)


def issue(
    pki_dir: Path,
    name: str,
    *,
    role: Role,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = DEFAULT_LEAF_DAYS,
    passphrase: str | bytes | None = None,
) -> LeafFiles:
    """Issue (or re-issue, replacing atomically) the certificate for party ``name``.

    Leaves are short-lived (at most ``MAX_LEAF_DAYS``) so a lost key stops
    working on its own. ``hosts`` become subjectAltNames so the party can also
    act as a TLS server under those names/addresses. Other files in the
    party's directory (its Flower auth key) are kept. A node certificate always names
    127.0.0.1: the site's sidecar serves it to the local SuperNode (`federation.security.sidecar`).
    """
    if role == "node" and "127.0.0.1" not in hosts:
        hosts = (*hosts, "127.0.0.1")
    return _issue_at(pki_dir, name, role=role, hosts=hosts, days=days, not_before=None, passphrase=passphrase)


def renew(
    pki_dir: Path,
    name: str,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    keep_key: bool = False,
    passphrase: str | bytes | None = None,
) -> LeafFiles:
    """Give ``name`` a fresh certificate (new serial, same name, role and hosts).

    The directory is swapped atomically, so a party that re-reads its files
    (sidecar reload) switches without downtime; the old certificate stays valid
    until it expires unless revoked. A new key is the default: a copied key then
    dies with its certificate. ``keep_key`` changes only ``cert.pem``, for
    parties that read cert and key at different moments.
    """
    leaf = load_leaf(pki_dir, name)
    current = _load_cert(leaf.cert)
    ident = _identity(current, leaf.cert)
    ca_path = Path(pki_dir) / _CA_DIR / _CA_CERT
    _check_issued_by(current, ident, _load_cert(ca_path), ca_path)
    if any(r.serial == ident.serial and r.revoked_at for r in _load_index(Path(pki_dir) / _CA_DIR).records):
        raise PKIError(f"certificate '{name}' is revoked; issue a new one with `fedseek ca issue`")
    key = _load_leaf_key(leaf.key) if keep_key else None
    return _issue_at(
        pki_dir, name, role=ident.role, hosts=ident.hosts, days=days, not_before=None, passphrase=passphrase, key=key
    )


def revoke(
    pki_dir: Path,
    name: str,
    *,
    reason: Reason = "unspecified",
    serial: int | None = None,
    passphrase: str | bytes | None = None,
) -> list[int]:
    """Revoke ``name``'s certificates and republish the CRL; returns the serials revoked.

    Without ``serial`` every unexpired certificate of ``name`` is revoked, older
    renewals included (a compromised party must lose them all); with it, only
    that one (e.g. the certificate a renewal superseded).
    """
    _check_name(name, what="party name")
    if reason not in _REASON_FLAGS:
        raise PKIError(f"unknown revocation reason '{reason}' (expected one of {', '.join(_REASON_FLAGS)})")
    pki_dir = Path(pki_dir)
    with _ca_lock(pki_dir):
        now = _utcnow()
        ca = _open_ca(pki_dir, passphrase, now)
        index = _load_index(ca.dir)
        mine = [r for r in index.records if r.name == name and serial in (None, r.serial)]
        if not mine:
            which = f" with serial {serial:x}" if serial is not None else ""
            raise PKIError(f"no certificate{which} was issued to '{name}' by this CA")
        targets = {r.serial for r in mine if r.revoked_at is None and (serial is not None or r.not_after > now)}
        if not targets:
            raise PKIError(f"nothing to revoke: the certificates of '{name}' are already revoked or expired")
        records = tuple(replace(r, revoked_at=now, reason=reason) if r.serial in targets else r for r in index.records)
        index = replace(index, records=records, crl_number=index.crl_number + 1)
        _commit(pki_dir, index, _sign_crl(ca, index, now=now))
    return sorted(targets)


def write_crl(pki_dir: Path, *, days: int = CRL_DAYS, passphrase: str | bytes | None = None) -> Path:
    """Sign a fresh CRL and publish it to the CA directory and every party's directory.

    Run it (and ship the parties' copies) more often than ``days``: peers
    refuse everyone once the CRL they hold has expired.
    """
    _check_days(days)
    pki_dir = Path(pki_dir)
    with _ca_lock(pki_dir):
        now = _utcnow()
        ca = _open_ca(pki_dir, passphrase, now)
        index = _load_index(ca.dir)
        index = replace(index, crl_number=index.crl_number + 1)
        _commit(pki_dir, index, _sign_crl(ca, index, now=now, days=days))
    return ca.dir / _CRL


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """Parse a PEM CRL, with an operator-readable error for a bad file."""
    path = Path(path)
    try:
        return x509.load_pem_x509_crl(_read_file(path, "CRL"))
    except ValueError as exc:
        raise PKIError(f"malformed CRL PEM: {path}") from exc


def is_revoked(cert: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    """Whether ``crl`` lists ``cert``; the CRL's own signature is not checked here."""
    return crl.issuer == cert.issuer and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def load_leaf(pki_dir: Path, name: str) -> LeafFiles:
    """Locate the files previously issued for ``name`` so a party can start TLS.

    The key is parsed and matched to the certificate here, so a damaged file
    is reported by name instead of as a TLS alert.
    """
    _check_name(name, what="party name")
    leaf_dir = Path(pki_dir) / name
    files = (leaf_dir / _LEAF_CERT, leaf_dir / _LEAF_KEY, leaf_dir / _LEAF_CA)
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise PKIError(
            f"no complete certificate for '{name}' in {leaf_dir} (missing {', '.join(missing)}; issue one first)"
        )
    cert = _load_cert(files[0])
    ident = _identity(cert, files[0])
    if ident.name != name:
        raise PKIError(f"certificate in {leaf_dir} belongs to '{ident.name}', not '{name}'")
    if _load_leaf_key(files[1]).public_key() != cert.public_key():
        raise PKIError(f"private key {files[1]} does not match certificate {files[0]}")
    crl = leaf_dir / _CRL
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
    return leaf


def read_identity(cert_pem: Path | x509.Certificate) -> Identity:
    """Read who a leaf certificate speaks for, without checking who signed it.

    Use :func:`verify_leaf` when the answer must be trusted.
    """
    if isinstance(cert_pem, x509.Certificate):
        return _identity(cert_pem, "certificate")
    return _identity(_load_cert(Path(cert_pem)), Path(cert_pem))


def identity_from_der(der: bytes) -> Identity:
    """Who a certificate received in a TLS handshake speaks for (the TLS stack verified it)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PKIError(f"peer certificate is not valid DER: {exc}") from exc
    return _identity(cert, Path("<peer certificate>"))


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
        now = _utcnow()
    elif now.tzinfo is None:
        raise PKIError("verify_leaf needs a timezone-aware 'now'")
    cert_path, ca_path = Path(cert_pem), Path(ca_cert_pem)
    cert = _load_cert(cert_path)
    ident = _identity(cert, cert_path)
    ca = _load_cert(ca_path)
    _check_issued_by(cert, ident, ca, ca_path)
    _check_period(f"consortium CA ({_org(ca)})", ca.not_valid_before_utc, ca.not_valid_after_utc, now)
    _check_period(f"certificate '{ident.name}'", ident.not_before, ident.not_after, now)
    crl_path = Path(crl) if crl is not None else ca_path.parent / _CRL
    if crl is not None or crl_path.is_file():
        revoked = _check_crl(load_crl(crl_path), crl_path, ca, now).get_revoked_certificate_by_serial_number(
            ident.serial
        )
        if revoked is not None:
            raise PKIError(
                f"certificate '{ident.name}' (serial {ident.serial:x}) was revoked at "
                f"{_ts(revoked.revocation_date_utc)}{_reason_text(revoked)}"
            )
    return ident


def list_issued(pki_dir: Path) -> list[Identity]:
    """List the identities currently issued under ``pki_dir``, sorted by name.

    Used for audits and renewal planning; leftovers of interrupted writes
    (dot-prefixed staging directories) are ignored.
    """
    return [read_identity(d / _LEAF_CERT) for d in _party_dirs(Path(pki_dir))]


def list_status(pki_dir: Path, *, now: datetime | None = None) -> list[tuple[Identity, Status]]:
    """Each current certificate with its status, from the CA's own records (no passphrase needed)."""
    pki_dir = Path(pki_dir)
    now = now or _utcnow()
    revoked = {r.serial for r in _load_index(pki_dir / _CA_DIR).records if r.revoked_at}
    out: list[tuple[Identity, Status]] = []
    for ident in list_issued(pki_dir):
        status: Status
        if ident.serial in revoked:
            status = "revoked"
        elif now > ident.not_after:
            status = "expired"
        elif now < ident.not_before:
            status = "not-yet-valid"
        else:
            status = "valid"
        out.append((ident, status))
    return out


# --------------------------------------------------------------------------
# Internals: the CA and its records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    consortium: str
    dir: Path


@dataclass(frozen=True)
class _Record:
    """One issued certificate, as the CA remembers it (for revocation and the CRL)."""

    serial: int
    name: str
    role: str
    not_after: datetime
    revoked_at: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class _Index:
    records: tuple[_Record, ...] = ()
    crl_number: int = 1


def _load_index(ca_dir: Path) -> _Index:
    path = ca_dir / _INDEX
    if not path.is_file():
        return _Index()
    try:
        data = json.loads(_read_file(path, "CA index"))
        records = tuple(
            _Record(
                serial=int(r["serial"], 16),
                name=str(r["name"]),
                role=str(r["role"]),
                not_after=_parse_ts(r["not_after"]),
                revoked_at=_parse_ts(r["revoked_at"]) if r.get("revoked_at") else None,
                reason=r.get("reason"),
            )
            for r in data["certificates"]
        )
        return _Index(records=records, crl_number=int(data["crl_number"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise PKIError(f"CA index {path} is corrupt ({exc})") from exc


def _index_bytes(index: _Index) -> bytes:
    records = [
        {
            "serial": f"{r.serial:x}",
            "name": r.name,
            "role": r.role,
            "not_after": _ts(r.not_after),
            "revoked_at": _ts(r.revoked_at) if r.revoked_at else None,
            "reason": r.reason,
        }
        for r in index.records
    ]
    return (json.dumps({"crl_number": index.crl_number, "certificates": records}, indent=2) + "\n").encode()


def _open_ca(pki_dir: Path, passphrase: str | bytes | None, now: datetime) -> _CA:
    """Load the CA pair for signing; fails clearly when it is missing, locked or expired."""
    ca_dir = pki_dir / _CA_DIR
    cert_path, key_path = ca_dir / _CA_CERT, ca_dir / _CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise PKIError(f"no consortium CA in {ca_dir} (run `fedseek ca init` first)")
    cert = _load_cert(cert_path)
    if not _is_ca(cert):
        raise PKIError(f"{cert_path} is not a CA certificate")
    consortium = _attr(cert.subject, NameOID.ORGANIZATION_NAME)
    if consortium is None:
        raise PKIError(f"consortium CA in {ca_dir} has no organisation name")
    _check_period(
        f"consortium CA ({consortium})", cert.not_valid_before_utc, cert.not_valid_after_utc, now, hint=_RECREATE_HINT
    )
    key = _load_ca_key(key_path, passphrase)
    if key.public_key() != cert.public_key():
        raise PKIError(f"CA private key {key_path} does not match {cert_path}")
    return _CA(cert=cert, key=key, consortium=consortium, dir=ca_dir)


def _load_ca_key(path: Path, passphrase: str | bytes | None) -> ec.EllipticCurvePrivateKey:
    data = _read_file(path, "CA private key")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in data and b"Proc-Type: 4,ENCRYPTED" not in data:
        if re.search(rb"-----BEGIN (EC )?PRIVATE KEY-----", data):
            raise PKIError(
                f"CA private key {path} is not encrypted; encrypt it once with "
                f"`openssl pkcs8 -topk8 -v2 aes-256-cbc -in {path} -out {path}.enc && mv {path}.enc {path}`"
            )
        raise PKIError(f"malformed CA private key PEM: {path}")
    secret = _passphrase(passphrase)
    try:
        key = serialization.load_pem_private_key(data, password=secret)
    except ValueError as exc:
        if "password" in str(exc).lower():
            raise PKIError(f"wrong passphrase for the CA private key {path}") from exc
        raise PKIError(f"malformed CA private key PEM: {path} (or wrong passphrase)") from exc
    except TypeError as exc:
        raise PKIError(f"malformed CA private key PEM: {path}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"CA private key {path} is not an ECDSA key")
    return key


def _passphrase(value: str | bytes | None) -> bytes:
    if value is None:
        value = os.environ.get(PASSPHRASE_ENV)
        if not value:
            raise PKIError(f"the CA passphrase is needed: give --passphrase-file FILE or set {PASSPHRASE_ENV}")
    secret = value.encode("utf-8") if isinstance(value, str) else value
    if not secret:
        raise PKIError("the CA passphrase is empty")
    return secret


@contextlib.contextmanager
def _ca_lock(pki_dir: Path) -> Iterator[None]:
    """Serialise CA operations (a cron'd `ca crl` next to a `ca revoke` must not lose a record)."""
    ca_dir = pki_dir / _CA_DIR
    try:
        fd = os.open(ca_dir, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise PKIError(f"no consortium CA in {ca_dir} (run `fedseek ca init` first)") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _commit(pki_dir: Path, index: _Index, crl: bytes, *, install: tuple[Path, Path] | None = None) -> None:
    """Record ``index``, install a staged party directory, then publish ``crl`` everywhere.

    The index is restored if the install fails, so a failed issue leaves no
    trace. The CRL goes last: a party left with the previous one still holds a
    valid list, and `write_crl` brings it up to date.
    """
    index_path = pki_dir / _CA_DIR / _INDEX
    before = index_path.read_bytes() if index_path.is_file() else None
    write_atomic(index_path, _index_bytes(index), mode=0o644)
    try:
        if install is not None:
            install_dir(*install)
    except BaseException:
        if before is None:
            index_path.unlink(missing_ok=True)
        else:
            write_atomic(index_path, before, mode=0o644)
        raise
    for target in (pki_dir / _CA_DIR, *_party_dirs(pki_dir)):
        write_atomic(target / _CRL, crl, mode=0o644)


def _sign_crl(ca: _CA, index: _Index, *, now: datetime, days: int = CRL_DAYS) -> bytes:
    """The CRL for ``index``: revoked certificates until they expire (then TLS refuses them anyway)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(min(now + timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.CRLNumber(index.crl_number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for record in index.records:
        if record.revoked_at is None or record.not_after < now:
            continue
        entry = x509.RevokedCertificateBuilder().serial_number(record.serial).revocation_date(record.revoked_at)
        if record.reason and record.reason != "unspecified":  # RFC 5280: omit rather than say "unspecified"
            entry = entry.add_extension(x509.CRLReason(_REASON_FLAGS[record.reason]), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _check_crl(
    crl: x509.CertificateRevocationList, path: Path, ca: x509.Certificate, now: datetime
) -> x509.CertificateRevocationList:
    ca_key = ca.public_key()
    if (
        crl.issuer != ca.subject
        or not isinstance(ca_key, ec.EllipticCurvePublicKey)
        or not crl.is_signature_valid(ca_key)
    ):
        raise PKIError(f"CRL {path} is not signed by the consortium CA ({_org(ca)})")
    next_update = crl.next_update_utc
    if next_update is None or now > next_update:
        when = _ts(next_update) if next_update else "an unknown time"
        raise PKIError(f"CRL {path} expired at {when}; publish a fresh one with `fedseek ca crl`")
    return crl


def _reason_text(revoked: x509.RevokedCertificate) -> str:
    try:
        flag = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return ""
    return f" ({flag.name.replace('_', '-')})"


# --------------------------------------------------------------------------
# Internals: leaves
# --------------------------------------------------------------------------


def _issue_at(
    pki_dir: Path,
    name: str,
    *,
    role: Role,
    hosts: Sequence[str],
    days: int,
    not_before: datetime | None,
    passphrase: str | bytes | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> LeafFiles:
    """Issue a leaf; ``not_before`` overrides the start of validity (tests only)."""
    _check_name(name, what="party name")
    if name in _RESERVED:
        raise PKIError(f"party name '{name}' is reserved for the PKI layout")
    if not _is_role(role):
        raise PKIError(f"unknown role '{role}' (expected one of {', '.join(sorted(_ROLES))})")
    _check_days(days)
    if days > MAX_LEAF_DAYS:
        raise PKIError(f"party certificates are short-lived: at most {MAX_LEAF_DAYS} days, got {days}")
    sans = _san_entries(hosts)
    pki_dir = Path(pki_dir)
    with _ca_lock(pki_dir):
        now = _utcnow()
        ca = _open_ca(pki_dir, passphrase, now)
        if not_before is None:
            start, valid_from = now, now - _CLOCK_SKEW
        else:
            start = valid_from = not_before.astimezone(UTC).replace(microsecond=0)
        valid_until = min(start + timedelta(days=days), ca.cert.not_valid_after_utc)
        if valid_until <= valid_from:
            raise PKIError(f"certificate '{name}' would expire before it becomes valid")

        key = key or ec.generate_private_key(ec.SECP256R1())
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
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca.key, hashes.SHA256())
        index = _load_index(ca.dir)
        record = _Record(serial=cert.serial_number, name=name, role=role, not_after=valid_until)
        index = replace(index, records=(*index.records, record), crl_number=index.crl_number + 1)
        crl = _sign_crl(ca, index, now=now)

        leaf_dir = pki_dir / name
        staging = Path(tempfile.mkdtemp(dir=pki_dir, prefix=f".{name}.new-"))
        try:
            _carry_over(leaf_dir, staging)
            write_atomic(staging / _LEAF_KEY, _leaf_key_pem(key), mode=0o600)
            write_atomic(staging / _LEAF_CERT, _cert_pem(cert), mode=0o644)
            write_atomic(staging / _LEAF_CA, _cert_pem(ca.cert), mode=0o644)
            write_atomic(staging / _CRL, crl, mode=0o644)
            os.chmod(staging, 0o755)
            _commit(pki_dir, index, crl, install=(staging, leaf_dir))
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # on success: gone, or the swapped-out old directory
    return LeafFiles(
        name=name,
        role=role,
        cert=leaf_dir / _LEAF_CERT,
        key=leaf_dir / _LEAF_KEY,
        ca_cert=leaf_dir / _LEAF_CA,
        crl=leaf_dir / _CRL,
    )


def _carry_over(leaf_dir: Path, staging: Path) -> None:
    """Copy what a party keeps across renewals (its Flower auth key pair) into the new directory."""
    if not leaf_dir.is_dir():
        return
    for entry in leaf_dir.iterdir():
        if entry.name in _LEAF_MANAGED:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, staging / entry.name, follow_symlinks=False)


def _load_leaf_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise PKIError(f"private key {path} is encrypted; parties need the unencrypted 0600 key") from exc
    except ValueError as exc:
        raise PKIError(f"malformed private key PEM: {path}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"private key {path} is not an ECDSA key")
    return key


def _check_issued_by(cert: x509.Certificate, ident: Identity, ca: x509.Certificate, ca_path: Path) -> None:
    """The leaf names this CA's consortium and carries its signature (the signature is what counts)."""
    if not _is_ca(ca):
        raise PKIError(f"{ca_path} is not a CA certificate")
    ca_org = _org(ca)
    if ident.consortium != ca_org:
        raise PKIError(f"certificate '{ident.name}' is from consortium '{ident.consortium}', not '{ca_org}'")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PKIError(f"certificate '{ident.name}' is not signed by the consortium CA ({ca_org})") from exc
    if _is_ca(cert):
        raise PKIError(f"certificate '{ident.name}' is a CA certificate, not a party certificate")


def _check_period(what: str, not_before: datetime, not_after: datetime, now: datetime, *, hint: str = "") -> None:
    if now < not_before:
        raise PKIError(f"{what} is not valid until {_ts(not_before)}{hint}")
    if now > not_after:
        raise PKIError(f"{what} expired at {_ts(not_after)}{hint}")


def _party_dirs(pki_dir: Path) -> list[Path]:
    """Issued parties' directories, sorted; the CA, site keys and staging leftovers are not parties."""
    if not pki_dir.is_dir():
        return []
    return [
        child
        for child in sorted(pki_dir.iterdir())
        if child.name not in _RESERVED
        and _NAME_RE.match(child.name)
        and child.is_dir()
        and (child / _LEAF_CERT).is_file()
    ]


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PKIError(f"{what} not found: {path}") from exc
    except OSError as exc:
        raise PKIError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_file(path, "certificate"))
    except ValueError as exc:
        raise PKIError(f"malformed certificate PEM: {path}") from exc


def _identity(cert: x509.Certificate, path: Path | str) -> Identity:
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


def _org(cert: x509.Certificate) -> str:
    return _attr(cert.subject, NameOID.ORGANIZATION_NAME) or "?"


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


def _utcnow() -> datetime:
    # X.509 times have one-second resolution; keep Identity values comparable.
    return datetime.now(UTC).replace(microsecond=0)


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TS_FORMAT)


def _parse_ts(text: str) -> datetime:
    return datetime.strptime(text, _TS_FORMAT).replace(tzinfo=UTC)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: stunnel and ssl.load_cert_chain read it without a prompt;
    # the 0600 file mode is what protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
