"""The consortium's app-publisher signature on a Flower App Bundle (FAB), and the sites' trust in it.

A site runs a ClientApp only from a FAB signed by an app-publisher key listed in its party
directory's `publishers.json` (written by the CA beside `ca.pem`, `federation.security.pki.publisher`).

What is signed is not the zip: `flwr run` rebuilds the FAB at the coordinator, and its bytes
depend on the flwr, zlib and tomli-w versions there. The publisher signs a digest of the FAB's
*entries*: every member but `.info/CONTENT` (derived from the others) and the signature file
itself, sorted by name, each as the sha256 of its bytes, except `pyproject.toml`, which `flwr`
re-serialises (dropping `[tool.flwr.federations]`) and is therefore hashed as canonical JSON of
its parsed TOML, federations dropped as `flwr` drops them. The signature statement travels in the
FAB as `fedseek-signature.json` at the app's root (`*.json` is in Flower's default FAB include
list), so a signed app directory can be submitted with plain `flwr run`.

Verification reads the zip in memory and refuses, before anything is unpacked, an archive that
is too large, holds an unsafe entry name (absolute, `..`, backslash, control characters, a
directory or a symlink) or a duplicate, carries no statement, or one that is malformed, by a key
the site does not trust, with a bad signature, over other content, or for another app identity.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import shutil
import stat
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import federation.protocol
from federation.errors import Forbidden, InvalidInput
from federation.ops.atomic import install_dir

__all__ = [
    "FEDSEEK_APP_DIR",
    "PUBLISHERS_FILE",
    "SIGNATURE_FILE",
    "AppRefused",
    "Approval",
    "PublisherFileError",
    "TrustedPublishers",
    "app_digest",
    "fab_entries",
    "fab_identity",
    "load_publishers",
    "publisher_key_id",
    "publishers_bytes",
    "sign_app_dir",
    "sign_entries",
    "signing_payload",
    "verify_fab",
]

SIGNATURE_FILE = "fedseek-signature.json"
PUBLISHERS_FILE = "publishers.json"
FEDSEEK_APP_DIR = Path(federation.protocol.__file__).parent / "flower_app"
"""FedSeek's own Flower app (no code: its components are modules of the installed distribution)."""

_SIGNATURE_FORMAT = "fedseek-app-signature/v1"
_PUBLISHERS_FORMAT = "fedseek-app-publishers/v1"
# Domain separation: a digest or a signature made for one purpose never verifies for another.
_DIGEST_DOMAIN = b"fedseek-app-digest-v1\n"
_SIGNATURE_DOMAIN = b"fedseek-app-signature-v1\n"
_UNSIGNED = frozenset({".info/CONTENT", SIGNATURE_FILE})
_STATEMENT_KEYS = frozenset({"format", "key_id", "app", "version", "digest", "signed_at", "signature"})
# Flower caps a FAB at 10 MB and 1000 files; the uncompressed cap stops a zip bomb before inflating.
_MAX_FAB_BYTES = 10 * 1024 * 1024
_MAX_ENTRIES = 1000
_MAX_UNCOMPRESSED = 64 * 1024 * 1024
_MAX_NAME = 255
_MAX_SMALL_FILE = 64 * 1024  # the statement and the trust file are a few hundred bytes
_DETAIL_CHARS = 200  # attacker-chosen strings (app names, entry names) are cut to this in messages

TrustedPublishers = Mapping[str, ed25519.Ed25519PublicKey]
"""key id -> the app-publisher public key a site trusts."""


class AppRefused(Forbidden):
    """The app bundle carries no valid signature by an app-publisher key this site trusts."""


class PublisherFileError(InvalidInput):
    """A trust file (`publishers.json`) that cannot be used: missing, malformed, or a key that does not match its id."""


@dataclass(frozen=True)
class Approval:
    """A FAB that verified: who signed it, what it says it is, and what exactly was checked."""

    key_id: str
    app: str
    version: str
    digest: str
    fab_sha256: str


# ---- keys and the trust file ---------------------------------------------------------------------
def publisher_key_id(key: ed25519.Ed25519PublicKey) -> str:
    """A key's id is its fingerprint, so a trust file cannot name one key with another's id."""
    return "ed25519:" + hashlib.sha256(_raw(key)).hexdigest()[:32]


def publishers_bytes(keys: Iterable[ed25519.Ed25519PublicKey]) -> bytes:
    """The trust file listing `keys` (the CA writes it; sites read it with `load_publishers`)."""
    entries = [{"key_id": publisher_key_id(k), "ed25519": base64.b64encode(_raw(k)).decode()} for k in keys]
    return (json.dumps({"format": _PUBLISHERS_FORMAT, "publishers": entries}, indent=2) + "\n").encode()


def load_publishers(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """The app-publisher keys `path` lists; a PublisherFileError if there are none or one is malformed."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_SMALL_FILE + 1)
    except FileNotFoundError:
        raise PublisherFileError(
            f"no trusted app publishers: {path} is missing "
            "(`fedseek ca publisher` writes it into every party directory)"
        ) from None
    except OSError as exc:
        raise PublisherFileError(f"cannot read trusted app publishers {path}: {exc.strerror}") from None
    try:
        if len(raw) > _MAX_SMALL_FILE:
            raise ValueError("file too large")
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != _PUBLISHERS_FORMAT:
            raise ValueError(f"format is not {_PUBLISHERS_FORMAT}")
        entries = data.get("publishers")
        if not isinstance(entries, list) or not entries:
            raise ValueError("no publisher keys listed")
        keys: dict[str, ed25519.Ed25519PublicKey] = {}
        for entry in entries:
            key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(entry["ed25519"], validate=True))
            if entry["key_id"] != publisher_key_id(key):
                raise ValueError(f"key id {str(entry['key_id'])[:_DETAIL_CHARS]!r} is not its key's fingerprint")
            keys[entry["key_id"]] = key
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise PublisherFileError(f"malformed trusted app publishers {path}: {exc}") from None
    return keys


def _raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---- the FAB's entries and their digest ------------------------------------------------------------
def fab_entries(fab: bytes) -> dict[str, bytes]:
    """Every member of the FAB by name, read in memory; AppRefused for an unsafe or oversized archive."""
    if len(fab) > _MAX_FAB_BYTES:
        raise AppRefused(f"app bundle of {len(fab)} bytes is over the {_MAX_FAB_BYTES} byte limit")
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise AppRefused(f"app bundle is not a zip archive ({exc})") from None
    if len(infos) > _MAX_ENTRIES:
        raise AppRefused(f"app bundle has {len(infos)} entries, over the {_MAX_ENTRIES} limit")
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise AppRefused("app bundle has duplicate entries")
    if sum(info.file_size for info in infos) > _MAX_UNCOMPRESSED:
        raise AppRefused(f"app bundle unpacks to over {_MAX_UNCOMPRESSED} bytes")
    entries: dict[str, bytes] = {}
    for info in infos:
        _check_entry(info)
        try:
            with archive.open(info) as member:
                data = member.read(info.file_size + 1)  # never more than it declares (zipfile caps it too)
        except (zipfile.BadZipFile, RuntimeError, ValueError, OSError, EOFError) as exc:  # CRC, encryption, truncation
            raise AppRefused(f"app bundle entry {_shown(info.filename)} is unreadable ({exc})") from None
        if len(data) != info.file_size:
            raise AppRefused(f"app bundle entry {_shown(info.filename)} is not the size it declares")
        entries[info.filename] = data
    if "pyproject.toml" not in entries:
        raise AppRefused("app bundle has no pyproject.toml")
    return entries


def _check_entry(info: zipfile.ZipInfo) -> None:
    """Only plain files at plain relative paths: nothing that could land outside the app's directory."""
    name = info.filename
    kind = stat.S_IFMT(info.external_attr >> 16)
    if info.is_dir() or kind not in (0, stat.S_IFREG):
        raise AppRefused(f"app bundle entry {_shown(name)} is not a plain file")
    parts = name.split("/")
    unsafe = (
        not name
        or len(name) > _MAX_NAME
        or name.startswith("/")
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or any(part in ("", ".", "..") for part in parts)
        or ":" in parts[0]
    )
    if unsafe:
        raise AppRefused(f"app bundle has an unsafe entry name {_shown(name)}")


def app_digest(entries: Mapping[str, bytes]) -> str:
    """The digest the publisher signs: sha256 over (name, sha256 of content) of every signed entry."""
    lines = []
    for name in sorted(entries):
        if name in _UNSIGNED:
            continue
        data = _canonical_pyproject(entries[name]) if name == "pyproject.toml" else entries[name]
        lines.append(f"{name}\x00{hashlib.sha256(data).hexdigest()}\n")
    return hashlib.sha256(_DIGEST_DOMAIN + "".join(lines).encode("utf-8")).hexdigest()


def _parse_pyproject(data: bytes) -> dict[str, Any]:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AppRefused(f"app bundle's pyproject.toml is not valid TOML ({exc})") from None


def _canonical_pyproject(data: bytes) -> bytes:
    config = _parse_pyproject(data)
    flwr = _table(_table(config, "tool"), "flwr")
    flwr.pop("federations", None)  # as `flwr build` does
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_toml_value)
    return text.encode("utf-8")


def _toml_value(value: Any) -> Any:
    """TOML dates and times have no JSON form; their ISO text is canonical."""
    return {"$toml": type(value).__name__, "value": value.isoformat()}


def _table(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _identity(pyproject: bytes) -> tuple[str, str]:
    """(publisher/name, version) as Flower reads them from pyproject.toml."""
    config = _parse_pyproject(pyproject)
    project = _table(config, "project")
    publisher = _table(_table(_table(config, "tool"), "flwr"), "app").get("publisher")
    name, version = project.get("name"), project.get("version")
    if not all(isinstance(v, str) and v for v in (publisher, name, version)):
        raise AppRefused("app bundle's pyproject.toml does not name its publisher, name and version")
    return f"{publisher}/{name}", str(version)


def fab_identity(fab: bytes) -> dict[str, str]:
    """What a FAB says it is, for audit records of refusals: never raises, strings cut short."""
    found = {"fab_sha256": hashlib.sha256(fab).hexdigest()}
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            info = archive.getinfo("pyproject.toml")
            if info.file_size <= _MAX_SMALL_FILE:
                app, version = _identity(archive.read(info))
                found.update(app=app[:_DETAIL_CHARS], version=version[:_DETAIL_CHARS])
    except Exception:  # best effort: the refusal itself is already decided
        pass
    return found


# ---- signing and verifying ---------------------------------------------------------------------------
def signing_payload(statement: Mapping[str, Any]) -> bytes:
    """The bytes a statement's signature covers: every field but the signature, canonical JSON."""
    body = {k: v for k, v in statement.items() if k != "signature"}
    return _SIGNATURE_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_entries(entries: Mapping[str, bytes], key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    """The signature statement for a FAB with these entries."""
    app, version = _identity(entries["pyproject.toml"])
    statement: dict[str, Any] = {
        "format": _SIGNATURE_FORMAT,
        "key_id": publisher_key_id(key.public_key()),
        "app": app,
        "version": version,
        "digest": app_digest(entries),
        "signed_at": int(time.time()),
    }
    statement["signature"] = base64.b64encode(key.sign(signing_payload(statement))).decode("ascii")
    return statement


def verify_fab(fab: bytes, trusted: TrustedPublishers) -> Approval:
    """The FAB's approval, or AppRefused with the one-line reason."""
    entries = fab_entries(fab)
    if SIGNATURE_FILE not in entries:
        raise AppRefused(f"app bundle is not signed (no {SIGNATURE_FILE})")
    statement, signature = _statement(entries[SIGNATURE_FILE])
    key = trusted.get(statement["key_id"])
    if key is None:
        raise AppRefused(f"app bundle is signed by {_shown(statement['key_id'])}, not a publisher this site trusts")
    try:
        key.verify(signature, signing_payload(statement))
    except InvalidSignature:
        raise AppRefused(f"app bundle's signature by {statement['key_id']} does not verify") from None
    digest = app_digest(entries)
    if digest != statement["digest"]:
        raise AppRefused("app bundle's content differs from what the publisher signed")
    app, version = _identity(entries["pyproject.toml"])
    if (statement["app"], statement["version"]) != (app, version):
        raise AppRefused(
            f"app bundle is {_shown(app)} {_shown(version)}, but the publisher signed "
            f"{_shown(statement['app'])} {_shown(statement['version'])}"
        )
    return Approval(statement["key_id"], app, version, digest, hashlib.sha256(fab).hexdigest())


def _statement(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """The statement's fields, exactly those of the format and of the right types, and the signature."""
    try:
        if len(raw) > _MAX_SMALL_FILE:
            raise ValueError("too large")
        statement = json.loads(raw)
        if not isinstance(statement, dict) or set(statement) != _STATEMENT_KEYS:
            raise ValueError(f"fields must be {', '.join(sorted(_STATEMENT_KEYS))}")
        if statement["format"] != _SIGNATURE_FORMAT:
            raise ValueError(f"format is not {_SIGNATURE_FORMAT}")
        text = ("key_id", "app", "version", "digest", "signature")
        if not all(isinstance(statement[k], str) for k in text) or type(statement["signed_at"]) is not int:
            raise ValueError("a field has the wrong type")
        signature = base64.b64decode(statement["signature"], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise AppRefused(f"app bundle's {SIGNATURE_FILE} is malformed: {exc}") from None
    return statement, signature


def _shown(value: str) -> str:
    return repr(value[:_DETAIL_CHARS])


# ---- a signed app directory (the publisher's side) ----------------------------------------------------
def sign_app_dir(source: Path, out: Path, key: ed25519.Ed25519PrivateKey) -> Approval:
    """Copy the app in `source` to `out` with its signature, checked by building its FAB as `flwr run` will.

    `out` is replaced as a whole (a reader sees the old or the new signed app); `source` is not changed.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        shutil.copytree(
            source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", SIGNATURE_FILE)
        )
        statement = sign_entries(fab_entries(_build_fab(staging)), key)
        (staging / SIGNATURE_FILE).write_text(json.dumps(statement, indent=2) + "\n", encoding="utf-8")
        # Built again with the statement inside: a FAB include rule that dropped it would show here.
        approval = verify_fab(_build_fab(staging), {statement["key_id"]: key.public_key()})
        staging.chmod(0o755)
        install_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # on success: gone, or the swapped-out old directory
    return approval


def _build_fab(app: Path) -> bytes:
    """The FAB exactly as `flwr run APP` builds it (Flower is imported only when signing)."""
    from flwr.cli.build import build_fab_from_disk

    try:
        fab: bytes = build_fab_from_disk(app)
    except ValueError as exc:
        raise InvalidInput(f"cannot build the app bundle from {app}: {exc}") from None
    return fab
