"""PEM in and out: reading certificates and keys with errors that name the file, and writing
them in the encodings stunnel and Python's ``ssl`` read without a prompt."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.security.pki.errors import PKIError

__all__ = ["cert_pem", "ec_private_key", "leaf_key_pem", "load_cert", "load_leaf_key", "read_file"]


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``; a missing or unreadable file is a PKIError naming ``what`` it is."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PKIError(f"{what} not found: {path}") from exc
    except OSError as exc:
        raise PKIError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_cert(path: Path) -> x509.Certificate:
    """Parse a PEM certificate file."""
    try:
        return x509.load_pem_x509_certificate(read_file(path, "certificate"))
    except ValueError as exc:
        raise PKIError(f"malformed certificate PEM: {path}") from exc


def load_leaf_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Parse a party's private key, which must be unencrypted (see :func:`leaf_key_pem`)."""
    data = read_file(path, "private key")
    try:
        return ec_private_key(data, password=None, path=path, what="private key")
    except TypeError as exc:
        raise PKIError(f"private key {path} is encrypted; parties need the unencrypted 0600 key") from exc
    except ValueError as exc:
        raise PKIError(f"malformed private key PEM: {path}") from exc


def ec_private_key(data: bytes, *, password: bytes | None, path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    """Parse the PEM private key ``data`` (read from ``path``) that must be ECDSA, a PKIError otherwise.

    cryptography's TypeError (encryption and password disagree) and ValueError (malformed, or a
    wrong password) pass through: what they mean differs between a party's key and the CA's.
    """
    key = serialization.load_pem_private_key(data, password=password)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{what} {path} is not an ECDSA key")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def leaf_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: stunnel and ssl.load_cert_chain read it without a prompt;
    # the 0600 file mode is what protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
