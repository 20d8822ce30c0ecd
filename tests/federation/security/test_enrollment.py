"""A site enrolls with its own keys: request on the site, signature at the CA, install on the site, mTLS works.

The CA and the site are separate directories (separate hosts in a deployment); only the public
files `make_request` names cross from the site, and only the CA's bundle crosses back.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from federation.security.enrollment import accept_bundle, make_request, register_site_key
from federation.security.pki import (
    PASSPHRASE_ENV,
    PKIError,
    build_request,
    init_ca,
    issue,
    load_party,
    read_identity,
    request_pem,
    revoke,
    sign_request,
)
from federation.security.pki.pem import load_leaf_key
from federation.security.site_binding import check_site_binding
from tests.federation.security.pki.support import PASS, file_mode
from tests.federation.security.pki.test_tls import _attempt, _tls_server


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PASS)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    root = tmp_path / "ca-host"
    init_ca(root)
    issue(root, "coordinator", role="coordinator")
    return root


def _carry(files: list[Path | None], dest: Path) -> Path:
    """What an operator copies from the site to the CA: the public files only."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f is not None:
            shutil.copy2(f, dest / f.name)
    return dest / "request.csr"


def _enroll(ca: Path, site: Path, tmp_path: Path, name: str = "site-a") -> None:
    req = make_request(site, name, hosts=[f"{name}.example"])
    csr = _carry([req.csr, req.proof, req.flower_key], tmp_path / "inbox" / name)
    signed = sign_request(ca, csr, role="node", hosts=[f"{name}.example"])
    register_site_key(ca, name, csr.parent / "supernode_auth.pub")
    accept_bundle(site, name, signed.leaf.cert.parent)


def test_an_enrolled_site_handshakes_and_its_keys_never_left_it(ca: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-host"
    _enroll(ca, site, tmp_path)
    mine = site / "site-a"
    assert file_mode(mine / "key.pem") == 0o600 and file_mode(mine / "supernode_auth.key") == 0o600
    assert not (mine / "request.csr").exists()
    # Neither of the site's private keys is anywhere on the CA host.
    secrets = [(mine / "key.pem").read_bytes(), (mine / "supernode_auth.key").read_bytes()]
    for path in ca.rglob("*"):
        if path.is_file():
            assert all(s not in path.read_bytes() for s in secrets), path
    assert sorted(p.name for p in (ca / "site-a").iterdir()) == ["ca.pem", "cert.pem", "crl.pem", "publishers.json"]
    leaf = load_party(site, "site-a", role="node")
    # The coordinator's SuperNode check accepts the site's own Flower key, registered from its request.
    check_site_binding(leaf.cert, (mine / "supernode_auth.pub").read_bytes(), ca / "site-keys")
    # A real mutual-TLS handshake with the coordinator's endpoint, which checks the CRL.
    with _tls_server(ca, crl=ca / "coordinator" / "crl.pem") as srv:
        got, verdict = _attempt(site, "site-a", srv)
    assert (got, verdict) == (b"ok", ("ok", "site-a"))


def test_renewal_swaps_key_and_certificate_together(ca: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-host"
    _enroll(ca, site, tmp_path)
    mine = site / "site-a"
    old_key, old_serial = (mine / "key.pem").read_bytes(), read_identity(mine / "cert.pem").serial
    assert make_request(site, "site-a", renew=True, if_due=timedelta(days=5)).csr is None  # 30 days left: not due
    req = make_request(site, "site-a", renew=True)
    assert (mine / "key.pem").read_bytes() == old_key  # the running node keeps its key until the answer comes
    csr = _carry([req.csr, req.proof, req.flower_key], tmp_path / "inbox" / "renewal")
    signed = sign_request(ca, csr, role="node", proof=(csr.parent / "renewal.sig").read_bytes())
    assert signed.renewal
    accept_bundle(site, "site-a", signed.leaf.cert.parent)
    assert (mine / "key.pem").read_bytes() != old_key and not (mine / "key.new.pem").exists()
    assert read_identity(mine / "cert.pem").serial != old_serial
    load_party(site, "site-a", role="node")  # key and certificate match
    with _tls_server(ca, crl=ca / "coordinator" / "crl.pem") as srv:
        assert _attempt(site, "site-a", srv)[0] == b"ok"


def test_a_bundle_for_another_key_or_ca_is_refused(ca: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-host"
    _enroll(ca, site, tmp_path)
    with pytest.raises(PKIError, match="is for 'coordinator', not 'site-a'"):
        accept_bundle(site, "site-a", ca / "coordinator")
    other = tmp_path / "other-ca"
    init_ca(other, consortium="fedseek")
    stranger = make_request(tmp_path / "other-site", "site-a")
    assert stranger.csr is not None
    with pytest.raises(PKIError, match="not for this site's key"):
        accept_bundle(site, "site-a", sign_request(other, stranger.csr, role="node").leaf.cert.parent)
    # A CA of the same name that signed this very key is still not the CA the site enrolled with.
    own = tmp_path / "own.csr"
    own.write_bytes(request_pem(build_request(load_leaf_key(site / "site-a" / "key.pem"), "site-a")))
    shutil.rmtree(other / "site-a")  # that CA forgets the stranger, so it signs the site's key afresh
    shutil.copy2(site / "site-a" / "key.pem", tmp_path / "keep.pem")
    with pytest.raises(PKIError, match="not the consortium CA this site trusts"):
        accept_bundle(site, "site-a", sign_request(other, own, role="node").leaf.cert.parent)
    revoke(ca, "site-a")
    with pytest.raises(PKIError, match="revoked"):
        accept_bundle(site, "site-a", ca / "site-a")
    assert (site / "site-a" / "key.pem").read_bytes() == (tmp_path / "keep.pem").read_bytes()


def test_first_enrollment_refuses_a_site_that_holds_a_certificate(ca: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-host"
    _enroll(ca, site, tmp_path)
    with pytest.raises(PKIError, match="--renew"):
        make_request(site, "site-a")
