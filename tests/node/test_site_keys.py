"""node.site_keys: the site secret, keyed digests, explanations sealed at rest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from federation.errors import FedSeekError
from node.site_keys import SealError, SiteKeys, load_site_keys


def test_secret_made_once_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    first = load_site_keys(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    assert load_site_keys(path).digest("x") == first.digest("x")  # the same key on the next start


def test_digests_are_keyed(tmp_path: Path) -> None:
    a, b = load_site_keys(tmp_path / "a.key"), load_site_keys(tmp_path / "b.key")
    text = '[{"content": "67 y, female, postcode 8047", "role": "user"}]'
    assert a.digest(text) == a.digest(text) != b.digest(text)
    assert a.digest(text) != hashlib.sha256(text.encode()).hexdigest()
    assert "<secret>" in repr(a) and a.prompt.hex() not in repr(a)


def test_a_damaged_secret_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    path.write_bytes(b"short")
    with pytest.raises(FedSeekError, match="32 bytes"):
        load_site_keys(path)


def test_sealed_data_opens_only_with_its_key_and_label() -> None:
    keys, other = SiteKeys.ephemeral(), SiteKeys.ephemeral()
    blob = keys.seal(b"Kussmaul breathing", label="expl-1/json")
    assert b"Kussmaul" not in blob
    assert keys.unseal(blob, label="expl-1/json") == b"Kussmaul breathing"
    for opener, label in ((keys, "expl-2/json"), (keys, "expl-1/html"), (other, "expl-1/json")):
        with pytest.raises(SealError):
            opener.unseal(blob, label=label)
    with pytest.raises(SealError, match="not a sealed"):
        keys.unseal(b'{"plain": "json"}', label="expl-1/json")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SealError):
        keys.unseal(tampered, label="expl-1/json")
