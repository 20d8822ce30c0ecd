"""A SuperNode's certificate must name the site whose Flower auth key it authenticates with."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.security.flower_auth import auth_key_paths
from federation.security.pki import PKIError, init_ca, issue
from federation.security.site_binding import check_site_binding, register_site_key, registered_site_key


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    init_ca(root)
    issue(root, "coordinator", role="coordinator")
    for site in ("site-a", "site-b"):
        issue(root, site, role="node")
        register_site_key(root, site)
    return root


def _presented(pki: Path, site: str) -> bytes:
    return auth_key_paths(pki / site).public_key.read_bytes()


def test_register_publishes_the_sites_public_key(pki: Path) -> None:
    published = pki / "site-keys" / "site-a.pub"
    assert published.read_bytes() == _presented(pki, "site-a")
    assert published.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    # Registering again keeps the same key pair (the coordinator's registration stays valid).
    assert register_site_key(pki, "site-a").read_bytes() == published.read_bytes()


def test_matching_site_is_accepted(pki: Path) -> None:
    cert = pki / "site-a" / "cert.pem"
    assert registered_site_key(cert, pki / "site-keys") == _presented(pki, "site-a").strip()
    ident = check_site_binding(cert, _presented(pki, "site-a"), pki / "site-keys")
    assert (ident.name, ident.role) == ("site-a", "node")
    # The comment of an OpenSSH line does not matter, the key does.
    check_site_binding(cert, _presented(pki, "site-a").strip() + b" operator@site-a", pki / "site-keys")
    check_site_binding(cert, _presented(pki, "site-a").decode(), pki / "site-keys")


def test_another_sites_key_is_refused(pki: Path) -> None:
    with pytest.raises(PKIError, match="certificate of site 'site-a' but a Flower auth key that is not the one"):
        check_site_binding(pki / "site-a" / "cert.pem", _presented(pki, "site-b"), pki / "site-keys")


def test_refusals(pki: Path) -> None:
    keys = pki / "site-keys"
    with pytest.raises(PKIError, match="has role 'coordinator', not 'node'"):
        registered_site_key(pki / "coordinator" / "cert.pem", keys)
    issue(pki, "site-c", role="node")
    with pytest.raises(PKIError, match="no Flower auth key registered for site 'site-c'"):
        check_site_binding(pki / "site-c" / "cert.pem", _presented(pki, "site-a"), keys)
    with pytest.raises(PKIError, match="not an OpenSSH public key"):
        check_site_binding(pki / "site-a" / "cert.pem", b"ssh-rsa garbage", keys)
    (keys / "site-b.pub").write_text("not a key\n")
    with pytest.raises(PKIError, match="registered Flower auth key for site 'site-b' is malformed"):
        registered_site_key(pki / "site-b" / "cert.pem", keys)
