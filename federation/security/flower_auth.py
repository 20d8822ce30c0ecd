"""Key pairs for Flower's SuperNode authentication, the second factor after the mTLS certificate.

Flower expects an EC key on a NIST curve: the private key in OpenSSH format for
`flower-supernode --auth-supernode-private-key`, the public key in OpenSSH format for
`flwr supernode register`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass(frozen=True)
class AuthKeyPair:
    private_key: Path
    public_key: Path


def auth_key_paths(directory: Path) -> AuthKeyPair:
    return AuthKeyPair(directory / "supernode_auth.key", directory / "supernode_auth.pub")


def ensure_auth_keypair(directory: Path) -> AuthKeyPair:
    """Create the site's SuperNode key pair in `directory` once; reuse it afterwards."""
    paths = auth_key_paths(directory)
    if paths.private_key.exists() and paths.public_key.exists():
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    tmp = paths.private_key.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    os.replace(tmp, paths.private_key)
    paths.public_key.write_bytes(pub + b"\n")
    return paths
