"""The CA's operations: init, issue and renew, all-or-nothing on disk, and what they refuse."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from federation.security.pki import (
    PKIError,
    init_ca,
    issue,
    list_issued,
    load_leaf,
    load_party,
    read_identity,
    renew,
    revoke,
    verify_leaf,
)
from federation.security.pki import ca as ca_mod
from tests.federation.security.pki.support import file_mode, read_cert, snapshot


def test_init_and_issue_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    ca = init_ca(root, consortium="fedseek")
    assert ca.cert == root / "ca" / "ca.pem"
    assert ca.key == root / "ca" / "ca.key"
    assert ca.crl == root / "ca" / "crl.pem"
    assert sorted(p.name for p in (root / "ca").iterdir()) == [
        "ca.key",
        "ca.pem",
        "crl.pem",
        "index.json",
        "publisher.key",  # the consortium's app-publisher key is made with the CA
        "publishers.json",
    ]

    leaf = issue(root, "coordinator", role="coordinator")
    assert leaf.cert == root / "coordinator" / "cert.pem"
    assert leaf.key == root / "coordinator" / "key.pem"
    assert leaf.crl == root / "coordinator" / "crl.pem"
    assert leaf.ca_cert.read_bytes() == ca.cert.read_bytes()
    assert load_leaf(root, "coordinator") == leaf

    issue(root, "site-a", role="node")
    assert [i.name for i in list_issued(root)] == ["coordinator", "site-a"]
    # No staging leftovers, and every party holds the current CRL.
    assert sorted(p.name for p in root.iterdir()) == ["ca", "coordinator", "site-a"]
    assert (root / "coordinator" / "crl.pem").read_bytes() == ca.crl.read_bytes()
    assert (root / "site-a" / "crl.pem").read_bytes() == ca.crl.read_bytes()


def test_key_file_modes(pki: Path) -> None:
    leaf = issue(pki, "site-a", role="node")
    assert file_mode(pki / "ca") == 0o700
    assert file_mode(pki / "ca" / "ca.key") == 0o600
    assert file_mode(leaf.key) == 0o600


def test_reissue_replaces_certificate_and_keeps_other_files(pki: Path) -> None:
    first = read_identity(issue(pki, "site-a", role="node").cert)
    (pki / "site-a" / "supernode_auth.key").write_text("flower key")
    second = read_identity(issue(pki, "site-a", role="reviewer").cert)
    assert second.serial != first.serial
    assert load_leaf(pki, "site-a").role == "reviewer"
    assert (pki / "site-a" / "supernode_auth.key").read_text() == "flower key"
    assert sorted(p.name for p in pki.iterdir()) == ["ca", "site-a"]


def test_leaf_days_capped(pki: Path) -> None:
    with pytest.raises(PKIError, match="at most 90 days"):
        issue(pki, "site-a", role="node", days=91)
    assert not (pki / "site-a").exists()
    assert read_identity(issue(pki, "site-a", role="node", days=90).cert).not_after > datetime.now(UTC) + timedelta(
        days=89
    )


def test_leaf_validity_capped_at_ca_expiry(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    init_ca(root, days=2)
    ident = read_identity(issue(root, "site-a", role="node", days=30).cert)
    assert ident.not_after == read_cert(root / "ca" / "ca.pem").not_valid_after_utc


def test_failure_while_installing_leaves_directory_as_before(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    issue(pki, "site-a", role="node")
    before = snapshot(pki)

    def broken(staging: Path, dest: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ca_mod, "install_dir", broken)
    for operation in (lambda: issue(pki, "site-b", role="node"), lambda: renew(pki, "site-a")):
        with pytest.raises(OSError, match="No space left"):
            operation()
        assert snapshot(pki) == before  # index restored, no staging directory left


def test_corrupt_index_refused(pki: Path) -> None:
    (pki / "ca" / "index.json").write_text("{not json")
    before = snapshot(pki)
    with pytest.raises(PKIError, match=r"CA index .*index\.json is corrupt"):
        issue(pki, "site-a", role="node")
    assert snapshot(pki) == before


def test_init_twice_refused(pki: Path) -> None:
    before = snapshot(pki)
    with pytest.raises(PKIError, match="already exists"):
        init_ca(pki)
    assert snapshot(pki) == before
    init_ca(pki, force=True)
    assert (pki / "ca" / "ca.pem").read_bytes() != before["ca/ca.pem"][1]
    assert file_mode(pki / "ca" / "ca.key") == 0o600


def test_issue_without_ca_refused(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="no consortium CA"):
        issue(tmp_path, "site-a", role="node")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "Site-A", "-site", "site_a", "a" * 64, "../x", "ca", "site-keys"])
def test_bad_name_refused(pki: Path, name: str) -> None:
    before = snapshot(pki)
    with pytest.raises(PKIError):
        issue(pki, name, role="node")
    assert snapshot(pki) == before


def test_bad_role_refused(pki: Path) -> None:
    with pytest.raises(PKIError, match="unknown role"):
        issue(pki, "site-a", role="superuser")  # type: ignore[arg-type]


def test_renew_gives_a_new_certificate_for_the_same_party(pki: Path) -> None:
    from federation.security.site_binding import register_site_key

    old = issue(pki, "coordinator", role="coordinator", hosts=("fl.example.org", "127.0.0.1"), days=5)
    old_cert, old_key = old.cert.read_bytes(), old.key.read_bytes()
    registered = register_site_key(pki, "coordinator").read_bytes()
    flower_key = (pki / "coordinator" / "supernode_auth.key").read_bytes()

    new = renew(pki, "coordinator")
    before, after = read_identity(_cert_from(old_cert)), read_identity(new.cert)
    assert after.serial != before.serial
    assert (after.name, after.role, after.hosts) == (before.name, before.role, before.hosts)
    assert after.not_after - after.not_before > timedelta(days=29)  # renewal takes the default lifetime
    assert new.key.read_bytes() != old_key  # a new key: a copied old key dies with the old certificate
    assert file_mode(new.key) == 0o600
    # The Flower auth key pair stays, so the SuperNode's registration still holds.
    assert (pki / "coordinator" / "supernode_auth.key").read_bytes() == flower_key
    assert (pki / "site-keys" / "coordinator.pub").read_bytes() == registered
    # Both certificates are valid: parties switch over at their next reload.
    stale = pki.parent / "old.pem"
    stale.write_bytes(old_cert)
    verify_leaf(stale, pki / "ca" / "ca.pem")
    verify_leaf(new.cert, new.ca_cert)
    load_party(pki, "coordinator", role="coordinator")


def _cert_from(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_renew_keep_key_changes_only_the_certificate(pki: Path) -> None:
    old = issue(pki, "site-a", role="node")
    key = old.key.read_bytes()
    cert = old.cert.read_bytes()
    new = renew(pki, "site-a", keep_key=True)
    assert new.key.read_bytes() == key
    assert new.cert.read_bytes() != cert
    load_leaf(pki, "site-a")  # key matches the new certificate


def test_renew_swaps_files_without_a_gap(pki: Path) -> None:
    """A party re-reading its files during renewals always finds a complete, matching set."""
    issue(pki, "site-a", role="node")
    stop = threading.Event()
    errors: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                load_leaf(pki, "site-a")
                reads += 1
            except (PKIError, OSError) as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(10):
            renew(pki, "site-a", keep_key=True)
    finally:
        stop.set()
        thread.join()
    assert reads > 0
    assert errors == []


def test_renew_refusals(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(PKIError, match="no complete certificate for 'ghost'"):
        renew(pki, "ghost")
    issue(pki, "site-a", role="node")
    with pytest.raises(PKIError, match="at most 90 days"):
        renew(pki, "site-a", days=365)
    revoke(pki, "site-a")
    with pytest.raises(PKIError, match="is revoked; issue a new one"):
        renew(pki, "site-a")
    # A certificate from another CA placed in the directory is not renewed by this one.
    other = tmp_path / "other"
    init_ca(other)
    issue(other, "site-b", role="node")
    (pki / "site-b").mkdir()
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (pki / "site-b" / name).write_bytes((other / "site-b" / name).read_bytes())
    before = snapshot(pki)
    with pytest.raises(PKIError, match="not signed by the consortium CA"):
        renew(pki, "site-b")
    assert snapshot(pki) == before
