"""Tie a SuperNode's consortium certificate to the Flower auth key registered for its site.

The mTLS certificate says "a member of the consortium, site X"; the Flower SuperNode key says
"the SuperNode registered under name Y". Each alone can be borrowed from another site, so
the coordinator accepts a SuperNode only when both name the same site: the certificate's site
id (its CN, role ``node``) must select the very key the SuperNode authenticates with.

Registered keys live as ``<site>.pub`` (OpenSSH format) in the site-keys directory,
``pki_dir/site-keys`` by default, which ``register_site_key`` fills when a node is issued.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from federation.ops.atomic import write_atomic
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.pki import SITE_KEYS_DIR, Identity, PKIError, read_identity

__all__ = ["check_site_binding", "register_site_key", "registered_site_key"]


def register_site_key(pki_dir: Path, name: str) -> Path:
    """Create site ``name``'s Flower key pair (once) and publish its public key for the coordinator."""
    pki_dir = Path(pki_dir)
    keys = ensure_auth_keypair(pki_dir / name)
    site_keys = pki_dir / SITE_KEYS_DIR
    site_keys.mkdir(exist_ok=True)
    dest = site_keys / f"{name}.pub"
    write_atomic(dest, keys.public_key.read_bytes(), mode=0o644)
    return dest


def registered_site_key(cert: Path | x509.Certificate, site_keys_dir: Path) -> bytes:
    """The Flower public key (OpenSSH line) registered for the site a node certificate names.

    Raises PKIError when the certificate is not a node's or no key is registered for its site.
    The certificate's chain is not checked here: the mTLS sidecar (or ``verify_leaf``) did that.
    """
    ident = read_identity(cert)
    return _normalised(_site_key_path(ident, Path(site_keys_dir)), ident)


def check_site_binding(cert: Path | x509.Certificate, presented_key: bytes | str, site_keys_dir: Path) -> Identity:
    """Accept a SuperNode only if the key it authenticates with is its certificate's site's key.

    ``presented_key`` is an OpenSSH public key line (the comment is ignored). Returns the
    certificate's identity; raises PKIError naming both sides when they disagree.
    """
    ident = read_identity(cert)
    registered = _normalised(_site_key_path(ident, Path(site_keys_dir)), ident)
    presented = _openssh(presented_key.encode() if isinstance(presented_key, str) else presented_key)
    if presented is None:
        raise PKIError("the SuperNode's Flower auth key is not an OpenSSH public key")
    if presented != registered:
        raise PKIError(
            f"SuperNode presents certificate of site '{ident.name}' but a Flower auth key "
            f"that is not the one registered for '{ident.name}'"
        )
    return ident


def _site_key_path(ident: Identity, site_keys_dir: Path) -> Path:
    if ident.role != "node":
        raise PKIError(f"certificate '{ident.name}' has role '{ident.role}', not 'node': it names no site")
    path = site_keys_dir / f"{ident.name}.pub"
    if not path.is_file():
        raise PKIError(f"no Flower auth key registered for site '{ident.name}' (expected {path})")
    return path


def _normalised(path: Path, ident: Identity) -> bytes:
    key = _openssh(path.read_bytes())
    if key is None:
        raise PKIError(f"registered Flower auth key for site '{ident.name}' is malformed: {path}")
    return key


def _openssh(line: bytes) -> bytes | None:
    """Canonical OpenSSH encoding (type and key, no comment), None if unparseable."""
    try:
        key = serialization.load_ssh_public_key(line.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
