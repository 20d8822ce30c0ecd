"""The consortium's app-publisher key: made with the CA, kept encrypted beside it, trusted by every party.

Sites run only app bundles signed with this key (`federation.security.app_signing`); it is not
the CA key, so signing an app never unlocks certificate issuance and a leaked publisher key is
replaced without re-issuing a certificate::

    pki_dir/ca/publisher.key          ed25519, PKCS#8 encrypted with the CA passphrase (0600)
    pki_dir/ca/publishers.json        the public key parties trust
    pki_dir/<party>/publishers.json   a copy in every party's directory, as ca.pem is

`init_ca` makes the first key; `create_publisher` (`fedseek ca publisher`) adds one to a CA made
before, or with ``force`` replaces it: every party's copy is rewritten, and bundles signed with the
old key are refused from then on (re-sign with `fedseek app sign`).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from federation.ops.atomic import write_atomic
from federation.security.app_signing import PUBLISHERS_FILE, load_publishers, publisher_key_id, publishers_bytes
from federation.security.pki.clock import utcnow
from federation.security.pki.errors import PKIError
from federation.security.pki.layout import CA_DIR, party_dirs
from federation.security.pki.passphrase import resolve_passphrase
from federation.security.pki.pem import read_file

__all__ = [
    "PUBLISHER_KEY",
    "copy_publishers",
    "create_publisher",
    "load_publisher_key",
    "party_publishers",
    "write_publisher",
]

PUBLISHER_KEY = "publisher.key"


def write_publisher(ca_dir: Path, passphrase: bytes) -> ed25519.Ed25519PublicKey:
    """A new publisher key, encrypted with ``passphrase``, and the trust file naming it, into ``ca_dir``."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    write_atomic(ca_dir / PUBLISHER_KEY, pem, mode=0o600)
    write_atomic(ca_dir / PUBLISHERS_FILE, publishers_bytes([key.public_key()]), mode=0o644)
    return key.public_key()


def copy_publishers(pki_dir: Path, party_dir: Path) -> None:
    """Give a party the consortium's trust file (nothing to give where the CA has no publisher key yet)."""
    source = Path(pki_dir) / CA_DIR / PUBLISHERS_FILE
    if source.is_file():
        write_atomic(party_dir / PUBLISHERS_FILE, source.read_bytes(), mode=0o644)


def party_publishers(pki_dir: Path, name: str) -> Path:
    """Where party ``name`` finds the app-publisher keys it trusts."""
    return Path(pki_dir) / name / PUBLISHERS_FILE


def create_publisher(pki_dir: Path, *, passphrase: str | bytes | None = None, force: bool = False) -> str:
    """Make the consortium's app-publisher key and give every party its public key; returns the key id.

    Refuses to replace an existing key unless ``force``: the replaced key's signatures stop
    verifying at every site that has the new trust file.
    """
    # ca.py calls write_publisher and copy_publishers from here, so its lock is imported late.
    from federation.security.pki.ca import _ca_lock
    from federation.security.pki.signer import open_ca

    pki_dir = Path(pki_dir)
    with _ca_lock(pki_dir):
        ca = open_ca(pki_dir, passphrase, utcnow())  # the CA passphrase, checked before it encrypts anything
        if not force and (ca.dir / PUBLISHER_KEY).exists():
            raise PKIError(
                f"an app-publisher key already exists in {ca.dir} (use force to replace it; "
                "app bundles signed with it are then refused)"
            )
        public = write_publisher(ca.dir, resolve_passphrase(passphrase))
        for party in party_dirs(pki_dir):
            copy_publishers(pki_dir, party)
    return publisher_key_id(public)


def load_publisher_key(pki_dir: Path, *, passphrase: str | bytes | None = None) -> ed25519.Ed25519PrivateKey:
    """The publisher key, decrypted with the CA passphrase; refused unless the trust file lists it."""
    ca_dir = Path(pki_dir) / CA_DIR
    path = ca_dir / PUBLISHER_KEY
    if not path.is_file():
        raise PKIError(f"no app-publisher key in {ca_dir} (create one with `fedseek ca publisher`)")
    data = read_file(path, "app-publisher key")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in data:
        raise PKIError(f"app-publisher key {path} is not encrypted; replace it with `fedseek ca publisher --force`")
    try:
        key = serialization.load_pem_private_key(data, password=resolve_passphrase(passphrase))
    except ValueError as exc:
        raise PKIError(f"cannot open the app-publisher key {path}: wrong passphrase or malformed key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PKIError(f"app-publisher key {path} is not an ed25519 key")
    trusted = load_publishers(ca_dir / PUBLISHERS_FILE)
    if publisher_key_id(key.public_key()) not in trusted:
        raise PKIError(f"app-publisher key {path} is not the one {ca_dir / PUBLISHERS_FILE} lists")
    return key
