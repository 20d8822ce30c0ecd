"""Where everything lives under a PKI directory.

The PEM files are consumed directly by stunnel sidecars and Python ``ssl`` servers, hence the
plain on-disk layout::

    pki_dir/ca/ca.pem        CA certificate
    pki_dir/ca/ca.key        CA private key, PKCS#8 encrypted with the CA passphrase (0600)
    pki_dir/ca/index.json    every certificate issued: serial, name, role, expiry, revocation
    pki_dir/ca/crl.pem       certificate revocation list signed by the CA
    pki_dir/<name>/cert.pem  leaf certificate
    pki_dir/<name>/key.pem   leaf private key (0600, unencrypted: sidecars start unattended)
    pki_dir/<name>/ca.pem    copy of the CA certificate (trust anchor)
    pki_dir/<name>/crl.pem   copy of the CRL (each party reads only its own directory)
    pki_dir/site-keys/       Flower SuperNode public keys (see federation.security.site_binding)
    pki_dir/ca-audit/        the CA operator's audit trail of `fedseek ca` operations and refusals
                             (beside ca/, which `ca init --force` replaces whole)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from federation.security.pki.identity import NAME_RE, Role

__all__ = [
    "CA_AUDIT_DIR",
    "CA_CERT",
    "CA_DIR",
    "CA_KEY",
    "CRL_FILE",
    "INDEX_FILE",
    "LEAF_CA",
    "LEAF_CERT",
    "LEAF_KEY",
    "LEAF_MANAGED",
    "RESERVED",
    "SITE_KEYS_DIR",
    "CAFiles",
    "LeafFiles",
    "party_dirs",
]

CA_DIR = "ca"
SITE_KEYS_DIR = "site-keys"
CA_AUDIT_DIR = "ca-audit"
# Directory names under pki_dir that are not parties, so no party may take them.
RESERVED = frozenset({CA_DIR, SITE_KEYS_DIR, CA_AUDIT_DIR})
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
INDEX_FILE = "index.json"
CRL_FILE = "crl.pem"  # the same name in the CA's directory and in every party's
LEAF_CERT = "cert.pem"
LEAF_KEY = "key.pem"
LEAF_CA = "ca.pem"
# What the CA writes into a party's directory; anything else there is the party's own and kept.
LEAF_MANAGED = frozenset({LEAF_CERT, LEAF_KEY, LEAF_CA, CRL_FILE})


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


def party_dirs(pki_dir: Path) -> list[Path]:
    """Issued parties' directories, sorted; the CA, site keys and staging leftovers are not parties."""
    if not pki_dir.is_dir():
        return []
    return [
        child
        for child in sorted(pki_dir.iterdir())
        if child.name not in RESERVED and NAME_RE.match(child.name) and child.is_dir() and (child / LEAF_CERT).is_file()
    ]
