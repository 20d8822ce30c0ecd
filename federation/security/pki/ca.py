"""The consortium CA's operations: create it, issue, renew and revoke party certificates, publish the CRL.

These operations need the CA passphrase (`federation.security.pki.passphrase`); parties never do.

Each operation checks its input and signs everything in memory before it writes, and writes go
through temporary files and directories renamed into place: a refused or interrupted operation
leaves the PKI directory as it was. Operations that sign hold a lock on the CA directory, so two
of them (a cron'd `ca crl` next to a `ca revoke`) cannot lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.ops.atomic import install_dir, write_atomic
from federation.security.pki.certs import build_ca_cert, san_entries, sign_leaf
from federation.security.pki.clock import CLOCK_SKEW, utcnow
from federation.security.pki.crl import CRL_DAYS, REASON_FLAGS, Reason, load_crl, sign_crl
from federation.security.pki.errors import PKIError
from federation.security.pki.hosts import LOOPBACK_BY_ROLE, check_hosts, renewable
from federation.security.pki.identity import ROLES, Role, check_name, identity_of, is_role
from federation.security.pki.index import Index, Record, index_bytes, load_index
from federation.security.pki.layout import (
    CA_CERT,
    CA_DIR,
    CA_KEY,
    CRL_FILE,
    INDEX_FILE,
    LEAF_CA,
    LEAF_CERT,
    LEAF_KEY,
    LEAF_MANAGED,
    RESERVED,
    CAFiles,
    LeafFiles,
    party_dirs,
)
from federation.security.pki.party import check_issued_by, load_leaf
from federation.security.pki.passphrase import MIN_PASSPHRASE_LEN, resolve_passphrase
from federation.security.pki.pem import cert_pem, leaf_key_pem, load_cert, load_leaf_key
from federation.security.pki.publisher import copy_publishers, write_publisher
from federation.security.pki.signer import SigningCA, open_ca
from federation.security.pki.status import list_issued

__all__ = [
    "DEFAULT_LEAF_DAYS",
    "MAX_LEAF_DAYS",
    "init_ca",
    "issue",
    "issue_at",
    "refresh_crl",
    "renew",
    "revoke",
    "write_crl",
]

DEFAULT_LEAF_DAYS = 30
# Leaves are short-lived so a lost key stops working on its own.
MAX_LEAF_DAYS = 90


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
    check_name(consortium, what="consortium name")
    _check_days(days)
    secret = resolve_passphrase(passphrase)
    if len(secret) < MIN_PASSPHRASE_LEN:
        raise PKIError(f"the CA passphrase must be at least {MIN_PASSPHRASE_LEN} characters")
    pki_dir = Path(pki_dir)
    ca_dir = pki_dir / CA_DIR
    if not force and ((ca_dir / CA_CERT).exists() or (ca_dir / CA_KEY).exists()):
        raise PKIError(f"a consortium CA already exists in {ca_dir} (use force to replace it)")
    pki_dir.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    cert = build_ca_cert(key, consortium=consortium, not_before=now - CLOCK_SKEW, not_after=now + timedelta(days=days))
    index = Index()
    crl = sign_crl(SigningCA(cert=cert, key=key, consortium=consortium, dir=ca_dir), index, now=now)

    staging = Path(tempfile.mkdtemp(dir=pki_dir, prefix=f".{CA_DIR}.new-"))
    try:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(secret),
        )
        write_atomic(staging / CA_KEY, key_pem, mode=0o600)
        write_atomic(staging / CA_CERT, cert_pem(cert), mode=0o644)
        write_atomic(staging / INDEX_FILE, index_bytes(index), mode=0o644)
        write_atomic(staging / CRL_FILE, crl, mode=0o644)
        write_publisher(staging, secret)  # the consortium's app-publisher key is born with the CA
        os.chmod(staging, 0o700)
        install_dir(staging, ca_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CAFiles(cert=ca_dir / CA_CERT, key=ca_dir / CA_KEY, crl=ca_dir / CRL_FILE)


def issue(
    pki_dir: Path,
    name: str,
    *,
    role: Role,
    hosts: Sequence[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
    passphrase: str | bytes | None = None,
) -> LeafFiles:
    """Issue (or re-issue, replacing atomically) the certificate for party ``name``.

    Leaves are short-lived (at most ``MAX_LEAF_DAYS``) so a lost key stops
    working on its own. ``hosts`` become subjectAltNames so the party can also
    act as a TLS server under those names/addresses. Other files in the
    party's directory (its Flower auth key) are kept. The loopback names a role needs are
    added (`hosts.LOOPBACK_BY_ROLE`): a node certificate always names 127.0.0.1, where the
    site's sidecar serves it to the local SuperNode; a coordinator certificate localhost and
    127.0.0.1, and its role name (`hosts.coordinator_host`); reviewers and admins none.
    """
    if isinstance(hosts, str):
        raise PKIError("hosts must be a sequence of host names, not a single string")
    if is_role(role):
        hosts = (*hosts, *LOOPBACK_BY_ROLE[role])
    return issue_at(pki_dir, name, role=role, hosts=hosts, days=days, not_before=None, passphrase=passphrase)


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
    party = Path(pki_dir) / name
    if (party / LEAF_CERT).is_file() and not (party / LEAF_KEY).exists():
        raise PKIError(
            f"'{name}' enrolled with its own key, which is not here: it renews on its host with "
            "`fedseek node enroll --renew`, and the request is signed here with `fedseek ca sign`"
        )
    leaf = load_leaf(pki_dir, name)
    current = load_cert(leaf.cert)
    ident = identity_of(current, leaf.cert)
    ca_path = Path(pki_dir) / CA_DIR / CA_CERT
    check_issued_by(current, ident, load_cert(ca_path), ca_path)
    if any(r.serial == ident.serial and r.revoked_at for r in load_index(Path(pki_dir) / CA_DIR).records):
        raise PKIError(f"certificate '{name}' is revoked; issue a new one with `fedseek ca issue`")
    key = load_leaf_key(leaf.key) if keep_key else None
    hosts = renewable(ident.role, ident.hosts)  # loopback names the role may no longer carry are dropped
    return issue_at(
        pki_dir, name, role=ident.role, hosts=hosts, days=days, not_before=None, passphrase=passphrase, key=key
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
    check_name(name, what="party name")
    if reason not in REASON_FLAGS:
        raise PKIError(f"unknown revocation reason '{reason}' (expected one of {', '.join(REASON_FLAGS)})")
    pki_dir = Path(pki_dir)
    with _ca_lock(pki_dir):
        now = utcnow()
        ca = open_ca(pki_dir, passphrase, now)
        index = load_index(ca.dir)
        mine = [r for r in index.records if r.name == name and serial in (None, r.serial)]
        if not mine:
            which = f" with serial {serial:x}" if serial is not None else ""
            raise PKIError(f"no certificate{which} was issued to '{name}' by this CA")
        targets = {r.serial for r in mine if r.revoked_at is None and (serial is not None or r.not_after > now)}
        if not targets:
            raise PKIError(f"nothing to revoke: the certificates of '{name}' are already revoked or expired")
        records = tuple(replace(r, revoked_at=now, reason=reason) if r.serial in targets else r for r in index.records)
        index = replace(index, records=records, crl_number=index.crl_number + 1)
        _commit(pki_dir, index, sign_crl(ca, index, now=now))
    return sorted(targets)


def write_crl(pki_dir: Path, *, days: int = CRL_DAYS, passphrase: str | bytes | None = None) -> Path:
    """Sign a fresh CRL and publish it to the CA directory and every party's directory.

    Run it (and ship the parties' copies) more often than ``days``: peers
    refuse everyone once the CRL they hold has expired.
    """
    _check_days(days)
    pki_dir = Path(pki_dir)
    with _ca_lock(pki_dir):
        now = utcnow()
        ca = open_ca(pki_dir, passphrase, now)
        index = load_index(ca.dir)
        index = replace(index, crl_number=index.crl_number + 1)
        _commit(pki_dir, index, sign_crl(ca, index, now=now, days=days))
    return ca.dir / CRL_FILE


def refresh_crl(
    pki_dir: Path,
    *,
    within: timedelta,
    days: int = CRL_DAYS,
    passphrase: str | bytes | None = None,
) -> datetime | None:
    """Re-sign and publish the CRL when the published one lapses within ``within``; its new expiry, else None.

    For a timer (deploy/systemd/fedseek-crl.timer): it runs often, and signs only when due, so
    the CA key is unlocked a few times a week. A missing or unreadable CRL is due.
    """
    _check_days(days)
    if within >= timedelta(days=days):
        raise PKIError(f"a refresh margin of {within} would re-sign a {days}-day CRL on every run")
    pki_dir = Path(pki_dir)
    path = pki_dir / CA_DIR / CRL_FILE
    try:
        next_update = load_crl(path).next_update_utc
    except PKIError:
        next_update = None
    if next_update is not None and next_update - utcnow() > within:
        return None
    write_crl(pki_dir, days=days, passphrase=passphrase)
    return load_crl(path).next_update_utc


def issue_at(
    pki_dir: Path,
    name: str,
    *,
    role: Role,
    hosts: Sequence[str],
    days: int,
    not_before: datetime | None,
    passphrase: str | bytes | None = None,
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey | None = None,
) -> LeafFiles:
    """Issue a leaf; ``not_before`` overrides the start of validity (tests only).

    Not exported by the package: `issue`, `renew` and `sign_request` are the operations; this is
    what they share. With a public ``key`` (a certificate request's) no ``key.pem`` is written:
    the party's directory here is the bundle it copies back, and the private key never left it.
    """
    check_name(name, what="party name")
    if name in RESERVED:
        raise PKIError(f"party name '{name}' is reserved for the PKI layout")
    if not is_role(role):
        raise PKIError(f"unknown role '{role}' (expected one of {', '.join(sorted(ROLES))})")
    _check_days(days)
    if days > MAX_LEAF_DAYS:
        raise PKIError(f"party certificates are short-lived: at most {MAX_LEAF_DAYS} days, got {days}")
    san_entries(hosts)  # malformed host names are refused before the CA key is opened
    pki_dir = Path(pki_dir)
    with _ca_lock(pki_dir):
        now = utcnow()
        ca = open_ca(pki_dir, passphrase, now)
        # Role-bound names: loopback only where needed, the coordinator's names on coordinators only.
        sans = san_entries(check_hosts(name, role, ca.consortium, hosts, others=list_issued(pki_dir)))
        if not_before is None:
            start, valid_from = now, now - CLOCK_SKEW
        else:
            start = valid_from = not_before.astimezone(UTC).replace(microsecond=0)
        valid_until = min(start + timedelta(days=days), ca.cert.not_valid_after_utc)
        if valid_until <= valid_from:
            raise PKIError(f"certificate '{name}' would expire before it becomes valid")

        keyless = isinstance(key, ec.EllipticCurvePublicKey)  # a request's: the party keeps its keys
        key = key or ec.generate_private_key(ec.SECP256R1())
        cert = sign_leaf(ca, key, name=name, role=role, sans=sans, not_before=valid_from, not_after=valid_until)
        index = load_index(ca.dir)
        record = Record(serial=cert.serial_number, name=name, role=role, not_after=valid_until)
        index = replace(index, records=(*index.records, record), crl_number=index.crl_number + 1)
        crl = sign_crl(ca, index, now=now)

        leaf_dir = pki_dir / name
        staging = Path(tempfile.mkdtemp(dir=pki_dir, prefix=f".{name}.new-"))
        try:
            if not keyless:  # an enrolled party's directory here is only its bundle: no keys of any kind
                _carry_over(leaf_dir, staging)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                write_atomic(staging / LEAF_KEY, leaf_key_pem(key), mode=0o600)
            write_atomic(staging / LEAF_CERT, cert_pem(cert), mode=0o644)
            write_atomic(staging / LEAF_CA, cert_pem(ca.cert), mode=0o644)
            write_atomic(staging / CRL_FILE, crl, mode=0o644)
            copy_publishers(pki_dir, staging)  # which app bundles the party may run
            os.chmod(staging, 0o755)
            _commit(pki_dir, index, crl, install=(staging, leaf_dir))
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # on success: gone, or the swapped-out old directory
    return LeafFiles(
        name=name,
        role=role,
        cert=leaf_dir / LEAF_CERT,
        key=leaf_dir / LEAF_KEY,
        ca_cert=leaf_dir / LEAF_CA,
        crl=leaf_dir / CRL_FILE,
    )


def _carry_over(leaf_dir: Path, staging: Path) -> None:
    """Copy what a party keeps across renewals (its Flower auth key pair) into the new directory."""
    if not leaf_dir.is_dir():
        return
    for entry in leaf_dir.iterdir():
        if entry.name in LEAF_MANAGED:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, staging / entry.name, follow_symlinks=False)


@contextlib.contextmanager
def _ca_lock(pki_dir: Path) -> Iterator[None]:
    """Serialise CA operations (a cron'd `ca crl` next to a `ca revoke` must not lose a record)."""
    ca_dir = pki_dir / CA_DIR
    try:
        fd = os.open(ca_dir, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise PKIError(f"no consortium CA in {ca_dir} (run `fedseek ca init` first)") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _commit(pki_dir: Path, index: Index, crl: bytes, *, install: tuple[Path, Path] | None = None) -> None:
    """Record ``index``, install a staged party directory, then publish ``crl`` everywhere.

    The index is restored if the install fails, so a failed issue leaves no
    trace. The CRL goes last: a party left with the previous one still holds a
    valid list, and `write_crl` brings it up to date.
    """
    index_path = pki_dir / CA_DIR / INDEX_FILE
    before = index_path.read_bytes() if index_path.is_file() else None
    write_atomic(index_path, index_bytes(index), mode=0o644)
    try:
        if install is not None:
            install_dir(*install)
    except BaseException:
        if before is None:
            index_path.unlink(missing_ok=True)
        else:
            write_atomic(index_path, before, mode=0o644)
        raise
    for target in (pki_dir / CA_DIR, *party_dirs(pki_dir)):
        write_atomic(target / CRL_FILE, crl, mode=0o644)


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"validity must be a positive number of days, got {days!r}")
