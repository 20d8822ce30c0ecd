"""`fedseek app sign` and `fedseek ca publisher` (issue 13, finding 1): the signed app the sites accept."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from federation.cli.main import main
from federation.security import pki
from federation.security.app_signing import SIGNATURE_FILE, load_publishers, verify_fab


def _pki(tmp_path: Path) -> tuple[Path, list[str]]:
    root, secret = tmp_path / "pki", tmp_path / "ca-pass"
    secret.write_text("cli test passphrase, not the env one\n")
    pw = ["--passphrase-file", str(secret)]
    assert main(["ca", "init", "--pki", str(root), *pw]) == 0
    assert main(["ca", "issue", "site-x", "--pki", str(root), "--role", "node", *pw]) == 0
    return root, pw


def test_signed_app_is_what_a_site_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, pw = _pki(tmp_path)
    out = tmp_path / "coordinator" / "app"
    assert main(["app", "sign", "--pki", str(root), "--out", str(out), *pw]) == 0
    assert "signed fedseek/fedseek-lora" in capsys.readouterr().out
    approval = verify_fab(build_fab_from_disk(out), load_publishers(pki.party_publishers(root, "site-x")))
    assert approval.app == "fedseek/fedseek-lora"
    # signing again replaces the directory whole
    assert main(["app", "sign", "--pki", str(root), "--out", str(out), *pw]) == 0
    assert sorted(p.name for p in out.iterdir()) == [SIGNATURE_FILE, "pyproject.toml"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["app"]  # no staging left behind


def test_sign_with_the_wrong_passphrase_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _pki(tmp_path)
    wrong = tmp_path / "wrong-pass"
    wrong.write_text("not the passphrase of this CA\n")
    out = tmp_path / "app"
    assert main(["app", "sign", "--pki", str(root), "--out", str(out), "--passphrase-file", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedseek: error:") and "wrong passphrase" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_ca_publisher_replaces_the_key_only_with_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, pw = _pki(tmp_path)
    before = (root / "site-x" / "publishers.json").read_bytes()
    assert main(["ca", "publisher", "--pki", str(root), *pw]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["ca", "publisher", "--pki", str(root), "--force", *pw]) == 0
    after = (root / "site-x" / "publishers.json").read_bytes()
    assert after != before and after == (root / "ca" / "publishers.json").read_bytes()
