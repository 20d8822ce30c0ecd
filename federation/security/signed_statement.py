"""A site's signed statements: a JSON payload signed with the site's node key, checkable with its public key.

What a site tells the consortium about its own state (its privacy ledger's head, its audit
log's checkpoints) must be something the site cannot later deny or rewrite. The node key is the
site's Flower SuperNode key (`federation.security.flower_auth`, EC P-384, OpenSSH format): the
coordinator already holds every registered site's public key (`pki/site-keys/<site>.pub`) and
binds it to the site's certificate, so no second key has to be distributed or revoked.

The signature (ECDSA with SHA-384) covers the canonical JSON of `{"kind": ..., "payload": ...}`:
the kind keeps a statement of one sort from being replayed as another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.errors import Unauthenticated

_HASH = hashes.SHA384()


class StatementError(Unauthenticated):
    """A signed statement is malformed, of another kind, or its signature does not verify."""

    default_code = "BadStatement"


def _canonical(kind: str, payload: Mapping[str, Any]) -> bytes:
    return json.dumps({"kind": kind, "payload": payload}, sort_keys=True, separators=(",", ":")).encode()


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's node key, OpenSSH (as Flower writes it) or PEM."""
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except ValueError:
        key = serialization.load_pem_private_key(data, password=None)  # type: ignore[assignment]
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StatementError(f"{path}: not an EC private key")
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A site's public node key, OpenSSH (`<site>.pub`) or PEM."""
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except ValueError:
        key = serialization.load_pem_public_key(data)  # type: ignore[assignment]
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise StatementError(f"{path}: not an EC public key")
    return key


def key_id(key: ec.EllipticCurvePublicKey) -> str:
    """sha256 of the public key's SubjectPublicKeyInfo DER, hex: names the key a statement was signed with."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def sign_statement(kind: str, payload: Mapping[str, Any], *, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """`{"kind", "payload", "key_id", "signature"}` (signature base64), ready to send or store as JSON."""
    if not kind:
        raise ValueError("a statement needs a kind")
    signature = key.sign(_canonical(kind, payload), ec.ECDSA(_HASH))
    return {
        "kind": kind,
        "payload": dict(payload),
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }


def verify_statement(statement: object, *, kind: str, key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The statement's payload, once it is well formed, of `kind`, and signed by `key`; else StatementError."""
    if not isinstance(statement, Mapping):
        raise StatementError("signed statement: not a JSON object")
    if statement.get("kind") != kind:
        raise StatementError(f"signed statement: kind {statement.get('kind')!r}, expected {kind!r}")
    payload = statement.get("payload")
    if not isinstance(payload, Mapping):
        raise StatementError("signed statement: payload is not a JSON object")
    if statement.get("key_id") != key_id(key):
        raise StatementError("signed statement: signed with another key than this site's")
    try:
        signature = base64.b64decode(str(statement.get("signature", "")), validate=True)
        key.verify(signature, _canonical(kind, payload), ec.ECDSA(_HASH))
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise StatementError(f"signed statement ({kind}): signature does not verify") from exc
    return dict(payload)
