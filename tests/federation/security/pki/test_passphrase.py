"""The CA passphrase: files, the environment, explicit arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.security.pki import (
    PASSPHRASE_ENV,
    PKIError,
    generate_passphrase_file,
    init_ca,
    issue,
    read_passphrase_file,
)
from tests.federation.security.pki.support import file_mode


def test_passphrase_files(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "ca-pass"
    secret = generate_passphrase_file(path)
    assert len(secret) >= 32
    assert file_mode(path) == 0o600
    assert read_passphrase_file(path) == secret
    with pytest.raises(PKIError, match="already exists"):
        generate_passphrase_file(path)
    assert read_passphrase_file(path) == secret
    crlf = tmp_path / "crlf"
    crlf.write_bytes(b"with trailing space \r\n")
    assert read_passphrase_file(crlf) == b"with trailing space "
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    with pytest.raises(PKIError, match="is empty"):
        read_passphrase_file(empty)
    with pytest.raises(PKIError, match="passphrase file not found"):
        read_passphrase_file(tmp_path / "missing")


def test_explicit_passphrase_overrides_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV)
    root = tmp_path / "pki"
    init_ca(root, passphrase=b"explicit passphrase")
    issue(root, "site-a", role="node", passphrase="explicit passphrase")
    with pytest.raises(PKIError, match=f"--passphrase-file FILE or set {PASSPHRASE_ENV}"):
        issue(root, "site-b", role="node")
    assert not (root / "site-b").exists()


def test_short_passphrase_refused_at_init(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="at least 12 characters"):
        init_ca(tmp_path / "pki", passphrase="short")
    assert list(tmp_path.iterdir()) == []
