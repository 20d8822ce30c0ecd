"""App-publisher signatures on Flower App Bundles (issue 13, finding 1): what a site accepts and what it refuses.

Bundles are built with Flower's own builder, as `flwr run` builds them at the coordinator; the
refused ones are repacked from a signed bundle, so the only difference is the one under test.
"""

from __future__ import annotations

import base64
import io
import json
import stat
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.cli.build import build_fab_from_disk

from federation.errors import Forbidden
from federation.security.app_signing import (
    FEDSEEK_APP_DIR,
    SIGNATURE_FILE,
    AppRefused,
    PublisherFileError,
    app_digest,
    fab_entries,
    load_publishers,
    publisher_key_id,
    publishers_bytes,
    sign_app_dir,
    signing_payload,
    verify_fab,
)

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "demo-app"
version = "1.2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedseek"

[tool.flwr.app.components]
serverapp = "demo_pkg.server:app"
clientapp = "demo_pkg.client:app"

[tool.flwr.app.config]
rounds = 2

[tool.flwr.federations]
default = "local"
"""


@pytest.fixture(scope="module")
def publisher() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def trusted(publisher: ed25519.Ed25519PrivateKey) -> dict[str, ed25519.Ed25519PublicKey]:
    return {publisher_key_id(publisher.public_key()): publisher.public_key()}


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, publisher: ed25519.Ed25519PrivateKey) -> bytes:
    """A signed app with code in it, built as `flwr run` builds it."""
    source = tmp_path_factory.mktemp("source") / "demo-app"
    (source / "demo_pkg").mkdir(parents=True)
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "demo_pkg" / "__init__.py").write_text("")
    (source / "demo_pkg" / "client.py").write_text("app = 'client'\n")
    (source / "demo_pkg" / "server.py").write_text("app = 'server'\n")
    out = tmp_path_factory.mktemp("signed") / "app"
    sign_app_dir(source, out, publisher)
    return build_fab_from_disk(out)


def repack(
    fab: bytes,
    *,
    change: Mapping[str, bytes | None] = {},  # read only
    raw_names: Mapping[str, bytes] = {},  # read only
    compression: int = zipfile.ZIP_DEFLATED,
    reverse: bool = False,
) -> bytes:
    """`fab` rebuilt: entries changed (None drops one, a new name adds one), extra entries under
    names a builder would never write, another compression and order."""
    entries = {k: v for k, v in fab_entries(fab).items() if k not in change}
    entries.update({k: v for k, v in change.items() if v is not None})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name in sorted(entries, reverse=reverse):
            zf.writestr(name, entries[name])
        for name, data in raw_names.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def statement_of(fab: bytes) -> dict[str, object]:
    return dict(json.loads(fab_entries(fab)[SIGNATURE_FILE]))


def refused(fab: bytes, trusted: Mapping[str, ed25519.Ed25519PublicKey], *needles: str) -> str:
    with pytest.raises(AppRefused) as info:
        verify_fab(fab, trusted)
    message = str(info.value)
    assert "\n" not in message and message.strip()
    for needle in needles:
        assert needle in message, message
    return message


# ---- accepted ---------------------------------------------------------------------------------------
def test_signed_bundle_is_approved(signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]) -> None:
    approval = verify_fab(signed, trusted)
    assert approval.app == "fedseek/demo-app" and approval.version == "1.2.0"
    assert approval.key_id in trusted
    assert approval.digest == statement_of(signed)["digest"]


def test_the_same_content_rebuilt_elsewhere_is_approved(
    signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    """Another zip library, compression, entry order and TOML layout, and the federations table
    `flwr` drops: the same signed content."""
    config = _toml(fab_entries(signed)["pyproject.toml"])
    config["tool"]["flwr"]["federations"] = {"default": "elsewhere"}
    relaid = tomli_w.dumps(dict(reversed(list(config.items())))).encode()
    rebuilt = repack(signed, change={"pyproject.toml": relaid}, compression=zipfile.ZIP_STORED, reverse=True)
    assert rebuilt != signed
    assert verify_fab(rebuilt, trusted).digest == verify_fab(signed, trusted).digest


def test_fedseek_app_signs_and_verifies(tmp_path: Path, publisher: ed25519.Ed25519PrivateKey) -> None:
    trusted = {publisher_key_id(publisher.public_key()): publisher.public_key()}
    approval = sign_app_dir(FEDSEEK_APP_DIR, tmp_path / "app", publisher)
    assert approval.app == "fedseek/fedseek-lora"
    assert verify_fab(build_fab_from_disk(tmp_path / "app"), trusted) == approval
    assert not (FEDSEEK_APP_DIR / SIGNATURE_FILE).exists()  # the packaged source is not touched


# ---- refused ----------------------------------------------------------------------------------------
def test_unsigned_bundle_is_refused(signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]) -> None:
    refused(repack(signed, change={SIGNATURE_FILE: None}), trusted, "not signed")


def test_bundle_signed_by_another_key_is_refused(
    tmp_path: Path, signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    """A key of the operator's own making (or another consortium's) is not the site's publisher."""
    rogue = ed25519.Ed25519PrivateKey.generate()
    sign_app_dir(FEDSEEK_APP_DIR, tmp_path / "rogue", rogue)
    refused(build_fab_from_disk(tmp_path / "rogue"), trusted, publisher_key_id(rogue.public_key()), "not a publisher")


def test_trusted_key_id_with_another_keys_signature_is_refused(
    signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    statement = statement_of(signed)
    rogue = ed25519.Ed25519PrivateKey.generate()
    statement["signature"] = base64.b64encode(rogue.sign(signing_payload(statement))).decode()
    forged = repack(signed, change={SIGNATURE_FILE: json.dumps(statement).encode()})
    refused(forged, trusted, "does not verify")


@pytest.mark.parametrize(
    "change",
    [
        {"demo_pkg/client.py": b"import os; os.system('touch /tmp/pwned')\n"},  # code changed
        {"demo_pkg/extra.py": b"print('smuggled')\n"},  # code added
        {"demo_pkg/server.py": None},  # code removed
        {".info/evil.py": b"x = 1\n"},  # beside the (unsigned) manifest
        {"pyproject.toml": PYPROJECT.replace("demo_pkg.client:app", "demo_pkg.extra:app").encode()},
    ],
    ids=["changed", "added", "removed", "info-dir", "component"],
)
def test_tampered_bundle_is_refused(
    signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey], change: dict[str, bytes | None]
) -> None:
    refused(repack(signed, change=change), trusted, "differs from what the publisher signed")


def test_statement_for_another_identity_is_refused(
    signed: bytes, publisher: ed25519.Ed25519PrivateKey, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    """A genuine signature over this very content, but issued for another app: not this one's."""
    statement = statement_of(signed)
    statement["app"] = "fedseek/other-app"
    statement["signature"] = base64.b64encode(publisher.sign(signing_payload(statement))).decode()
    relabelled = repack(signed, change={SIGNATURE_FILE: json.dumps(statement).encode()})
    refused(relabelled, trusted, "fedseek/demo-app", "fedseek/other-app")


@pytest.mark.parametrize(
    "name",
    [
        "../escape.py",
        "/etc/cron.d/job",
        "demo_pkg/../../escape.py",
        "demo_pkg\\..\\x.py",
        "a//b.py",
        "./a.py",
        "a\x01.py",
    ],
)
def test_path_traversal_entries_are_refused(
    signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey], name: str
) -> None:
    refused(repack(signed, raw_names={name: b"x = 1\n"}), trusted, "unsafe entry name")


def test_directory_and_symlink_entries_are_refused(signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]) -> None:
    refused(repack(signed, raw_names={"demo_pkg/sub/": b""}), trusted, "not a plain file")
    link = zipfile.ZipInfo("demo_pkg/link.py")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO(repack(signed))
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    refused(buf.getvalue(), trusted, "not a plain file")


def test_duplicate_entries_are_refused(signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]) -> None:
    """Two members of one name: which one would be unpacked is not what was checked."""
    buf = io.BytesIO(signed)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("demo_pkg/client.py", "import os\n")
    refused(buf.getvalue(), trusted, "duplicate")


@pytest.mark.parametrize(
    ("statement", "needle"),
    [
        (b"not json", "malformed"),
        (b"[]", "malformed"),
        (json.dumps({"format": "fedseek-app-signature/v1"}).encode(), "fields must be"),
        (None, "format is not"),
        (None, "wrong type"),
        (None, "Incorrect padding"),
    ],
    ids=["not-json", "not-object", "missing-fields", "format", "type", "base64"],
)
def test_malformed_statement_is_refused(
    signed: bytes, trusted: dict[str, ed25519.Ed25519PublicKey], statement: bytes | None, needle: str
) -> None:
    if statement is None:
        fields = statement_of(signed)
        if needle == "format is not":
            fields["format"] = "fedseek-app-signature/v0"
        elif needle == "wrong type":
            fields["signed_at"] = "yesterday"
        else:
            fields["signature"] = "abc"
        statement = json.dumps(fields).encode()
    refused(repack(signed, change={SIGNATURE_FILE: statement}), trusted, needle)


def test_not_a_zip_and_oversized_bundles_are_refused(trusted: dict[str, ed25519.Ed25519PublicKey]) -> None:
    refused(b"PK\x03\x04 garbage", trusted, "not a zip archive")
    refused(b"\0" * (10 * 1024 * 1024 + 1), trusted, "over the")


def test_zip_bomb_is_refused_before_inflating(trusted: dict[str, ed25519.Ed25519PublicKey]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pyproject.toml", PYPROJECT)
        zf.writestr("big.json", b"\0" * (65 * 1024 * 1024))
    assert len(buf.getvalue()) < 1024 * 1024
    refused(buf.getvalue(), trusted, "unpacks to over")


def test_refusal_is_a_403_fedseek_error() -> None:
    assert issubclass(AppRefused, Forbidden) and AppRefused.http_status == 403


def test_digest_ignores_the_manifest_and_the_statement(signed: bytes) -> None:
    entries = fab_entries(signed)
    same = {**entries, ".info/CONTENT": b"rewritten", SIGNATURE_FILE: b"{}"}
    assert app_digest(same) == app_digest(entries)


# ---- the trust file ---------------------------------------------------------------------------------
def test_trust_file_round_trip(tmp_path: Path, publisher: ed25519.Ed25519PrivateKey) -> None:
    path = tmp_path / "publishers.json"
    path.write_bytes(publishers_bytes([publisher.public_key()]))
    assert list(load_publishers(path)) == [publisher_key_id(publisher.public_key())]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "is missing"),
        (b"{", "malformed"),
        (json.dumps({"format": "fedseek-app-publishers/v1", "publishers": []}).encode(), "no publisher keys"),
        (json.dumps({"format": "other", "publishers": []}).encode(), "format"),
        ("swap", "fingerprint"),
        (json.dumps({"format": "fedseek-app-publishers/v1", "publishers": [{"key_id": "x"}]}).encode(), "ed25519"),
    ],
    ids=["missing", "not-json", "empty", "format", "key-id-of-another-key", "no-key"],
)
def test_unusable_trust_file_is_refused(
    tmp_path: Path, publisher: ed25519.Ed25519PrivateKey, content: bytes | str | None, needle: str
) -> None:
    path = tmp_path / "publishers.json"
    if content == "swap":  # a trusted key's id on another key
        other = ed25519.Ed25519PrivateKey.generate().public_key()
        data = json.loads(publishers_bytes([other]))
        data["publishers"][0]["key_id"] = publisher_key_id(publisher.public_key())
        content = json.dumps(data).encode()
    if isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(PublisherFileError, match=needle):
        load_publishers(path)


def _toml(data: bytes) -> dict[str, Any]:
    return tomllib.loads(data.decode())
