"""Key pairs for Flower's SuperNode authentication, the second factor after the mTLS certificate.

Flower expects an EC key on a NIST curve: the private key in OpenSSH format for
`flower-supernode --auth-supernode-private-key`, the public key in OpenSSH format for
`flwr supernode register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.ops.atomic import write_atomic


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
    # The private key first: a crash between the two leaves no public key, so the pair is made anew.
    write_atomic(paths.private_key, priv, mode=0o600)
    write_atomic(paths.public_key, pub + b"\n", mode=0o644)
    return paths
