"""The consortium's app-publisher key (issue 13, finding 1): made with the CA, encrypted at rest,
its public half in every party's directory; replaced only on purpose, and then trusted alone."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from federation.security.app_signing import AppRefused, load_publishers, publisher_key_id, sign_entries, verify_fab
from federation.security.pki import PKIError, create_publisher, init_ca, issue, load_publisher_key, party_publishers
from tests.federation.security.pki.support import file_mode, snapshot

PYPROJECT = b'[project]\nname = "app"\nversion = "1.0.0"\n[tool.flwr.app]\npublisher = "fedseek"\n'


def bundle(key_pki: Path) -> bytes:
    """A minimal bundle signed with the publisher key of `key_pki`."""
    entries = {"pyproject.toml": PYPROJECT}
    statement = sign_entries(entries, load_publisher_key(key_pki))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pyproject.toml", PYPROJECT)
        zf.writestr("fedseek-signature.json", json.dumps(statement))
    return buf.getvalue()


def test_made_with_the_ca_and_given_to_every_party(pki: Path) -> None:
    issue(pki, "site-a", role="node")
    issue(pki, "reviewer", role="reviewer")
    key = pki / "ca" / "publisher.key"
    assert file_mode(key) == 0o600 and b"BEGIN ENCRYPTED PRIVATE KEY" in key.read_bytes()
    trust = (pki / "ca" / "publishers.json").read_bytes()
    for party in ("site-a", "reviewer"):
        assert party_publishers(pki, party).read_bytes() == trust
    (key_id,) = load_publishers(party_publishers(pki, "site-a"))
    assert key_id == publisher_key_id(load_publisher_key(pki).public_key())
    verify_fab(bundle(pki), load_publishers(party_publishers(pki, "site-a")))


def test_wrong_passphrase_opens_nothing(pki: Path) -> None:
    with pytest.raises(PKIError, match="wrong passphrase"):
        load_publisher_key(pki, passphrase="not the ca passphrase")
    before = snapshot(pki)
    with pytest.raises(PKIError, match="wrong passphrase"):
        create_publisher(pki, passphrase="not the ca passphrase", force=True)
    assert snapshot(pki) == before


def test_existing_key_is_replaced_only_with_force(pki: Path) -> None:
    before = snapshot(pki)
    with pytest.raises(PKIError, match="already exists"):
        create_publisher(pki)
    assert snapshot(pki) == before


def test_replaced_key_is_the_only_one_trusted(pki: Path) -> None:
    issue(pki, "site-a", role="node")
    old_bundle = bundle(pki)
    old_id = publisher_key_id(load_publisher_key(pki).public_key())
    new_id = create_publisher(pki, force=True)
    assert new_id != old_id
    trusted = load_publishers(party_publishers(pki, "site-a"))
    assert list(trusted) == [new_id]
    with pytest.raises(AppRefused, match="not a publisher this site trusts"):
        verify_fab(old_bundle, trusted)
    verify_fab(bundle(pki), trusted)


def test_a_ca_made_before_gets_one(pki: Path) -> None:
    issue(pki, "site-a", role="node")
    for path in (pki / "ca" / "publisher.key", pki / "ca" / "publishers.json", party_publishers(pki, "site-a")):
        path.unlink()
    with pytest.raises(PKIError, match="fedseek ca publisher"):
        load_publisher_key(pki)
    key_id = create_publisher(pki)
    assert list(load_publishers(party_publishers(pki, "site-a"))) == [key_id]


def test_a_key_the_trust_file_does_not_list_is_refused(pki: Path, tmp_path: Path) -> None:
    """A publisher key swapped in beside the trust file would sign bundles every site refuses."""
    other = tmp_path / "other"
    init_ca(other)
    (pki / "ca" / "publisher.key").write_bytes((other / "ca" / "publisher.key").read_bytes())
    with pytest.raises(PKIError, match="is not the one"):
        load_publisher_key(pki)
