"""What a FedSeek backup is: its manifest, what each party's layout contributes, and the manifest's signature.

Shared by `federation.ops.backup` (making one) and `federation.ops.restore` (checking and installing one).
A backup is a directory or a tar archive holding `MANIFEST.json` (format, party kind and name, time,
FedSeek version, whether secrets are in it, and every file's path, size, sha256 and mode) and the files
under `state/` (and `pki/` when the PKI directory was included). With the party's own key
(`pki/<name>/key.pem`) the manifest is signed (ECDSA-SHA256, over its canonical JSON without the
signature) and carries its certificate; otherwise only its sha256 identifies it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.errors import Conflict, InvalidInput
from federation.ops.layout import CoordinatorLayout, NodeLayout

__all__ = [
    "FORMAT",
    "LAYOUTS",
    "MANIFEST",
    "PLANS",
    "BackupError",
    "How",
    "PartyKind",
    "StateInUse",
    "canonical",
    "check_manifest",
    "safe_name",
    "sign_manifest",
    "verify_manifest",
]

FORMAT = "fedseek-backup/1"
MANIFEST = "MANIFEST.json"
MAX_MANIFEST = 64 << 20
CHUNK = 1 << 20

PartyKind = Literal["coordinator", "node"]
How = Literal["sqlite", "log", "logs", "tree", "file", "secret", "runtime"]

# Every layout property, by how a backup takes it. "log": one append-only JSONL (and its companions);
# "logs": a directory of them; "tree": files written by rename; "secret": only with include_secrets.
PLANS: dict[PartyKind, dict[str, How]] = {
    "node": {
        "audit": "log",
        "ledger": "sqlite",
        "agent_token": "secret",
        "api_key": "secret",
        "site_secret": "secret",
        "kek": "file",  # the KEK's id and salt, never the key: encrypted files stay encrypted in a backup
        "audit_payload_keys": "tree",  # wrapped by the KEK: useless without it
        "api_key_digests": "file",
        "api_keys_lock": "runtime",
        "access_policy": "file",
        "adapters": "tree",
        "explanations": "tree",
        "sidecar": "runtime",
        "sockets": "runtime",
        "fleet_socket": "runtime",
        "relay_socket": "runtime",
        "agent_socket": "runtime",
        "runtime_socket": "runtime",
        "logs": "runtime",
        "supernode_log": "runtime",
        "flwr_home": "runtime",
        "superexec_secret": "runtime",  # new at every start
        "app_guard_home": "runtime",
        "app_guard_log": "runtime",
        "endpoints": "runtime",
    },
    "coordinator": {
        "audit": "log",
        "registry": "tree",
        "superlink_db": "sqlite",
        "witness": "logs",
        "gateway": "runtime",  # config and site bindings are written again from the PKI at start
        "logs": "runtime",
        "superlink_log": "runtime",
        "control": "runtime",
        "superlink_socket": "runtime",
        "flwr_home": "runtime",
        "signed_app": "tree",
        "flwr_cli": "runtime",
        "endpoints": "runtime",
    },
}
LAYOUTS: dict[PartyKind, Callable[[Path], CoordinatorLayout | NodeLayout]] = {
    "node": NodeLayout,
    "coordinator": CoordinatorLayout,
}


class BackupError(InvalidInput):
    """A backup cannot be made, or is refused on restore (damaged, altered, incomplete): one line naming the file."""


class StateInUse(Conflict):
    """The destination holds state (restore without --force) or a party runs on it."""


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign_manifest(body: bytes, key_pem: Path, cert_pem: Path) -> dict[str, str]:
    try:
        key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BackupError(f"cannot sign the backup with {key_pem}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BackupError(f"cannot sign the backup with {key_pem}: not an EC key")
    return {
        "alg": "ecdsa-sha256",
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "value": base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode("ascii"),
    }


def _subject(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def verify_manifest(manifest: dict[str, Any], *, ca: Path | None) -> str | None:
    """The signer's name if the manifest is signed and the signature holds (and, with `ca`, its certificate
    was issued by that CA to the party the manifest names); None if unsigned and no `ca` asks for one."""
    sig = manifest.get("signature")
    if sig is None:
        if ca is not None:
            raise BackupError("the backup's manifest is not signed, and --ca asks for a signed one")
        return None
    body = canonical({k: v for k, v in manifest.items() if k != "signature"})
    try:
        cert = x509.load_pem_x509_certificate(str(sig["certificate"]).encode("ascii"))
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or sig.get("alg") != "ecdsa-sha256":
            raise BackupError("the backup's manifest signature is of an unknown kind")
        key.verify(base64.b64decode(str(sig["value"]), validate=True), body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BackupError("the backup's manifest does not match its signature (altered after it was made)") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"the backup's manifest signature is unreadable: {exc}") from None
    signer = _subject(cert)
    if signer != manifest["party"].get("name"):
        raise BackupError(f"the backup names party {manifest['party'].get('name')!r} but is signed by {signer!r}")
    if ca is not None:
        try:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
        except (OSError, ValueError, TypeError, InvalidSignature) as exc:
            raise BackupError(
                f"the backup's signer {signer!r} is not certified by {ca}: {exc or 'bad signature'}"
            ) from None
    return signer


def check_manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackupError(f"the backup's {MANIFEST} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"not a FedSeek backup ({MANIFEST} is not of format {FORMAT})")
    party = manifest.get("party")
    if not isinstance(party, dict) or party.get("kind") not in PLANS:
        raise BackupError(f"the backup's {MANIFEST} names no party kind")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise BackupError(f"the backup's {MANIFEST} lists no files")
    seen: set[str] = set()
    for f in files:
        path = f.get("path") if isinstance(f, dict) else None
        if not isinstance(path, str) or not safe_name(path) or path in seen:
            raise BackupError(f"the backup's {MANIFEST} lists an unsafe or repeated path: {path!r}")
        if not isinstance(f.get("size"), int) or not re.fullmatch(r"[0-9a-f]{64}", str(f.get("sha256"))):
            raise BackupError(f"the backup's {MANIFEST} entry for {path} has no size or sha256")
        seen.add(path)
    return manifest


def safe_name(name: str) -> bool:
    parts = name.split("/")
    return (
        parts[0] in ("state", "pki")
        and len(parts) > 1
        and all(p not in ("", ".", "..") for p in parts)
        and "\\" not in name
        and "\0" not in name
    )
