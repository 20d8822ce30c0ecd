"""Real processes: a coordinator (SuperLink + stunnel) and raw `flower-supernode`s.

Only a SuperNode whose sidecar presents a consortium certificate AND whose Flower auth key
is registered gets in; the others fail at the TLS handshake or at SuperNode authentication.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation import pki
from federation.flower_auth import ensure_auth_keypair
from federation.procs import free_port
from federation.sidecar import TLSFiles
from tests.e2e.fleet import start_coordinator, stop, supernode, wait_activated

pytestmark = pytest.mark.e2e


@pytest.fixture
def coordinator(tmp_path: Path, pki_dir: Path) -> Iterator[dict[str, object]]:
    keys = tmp_path / "site-keys"
    keys.mkdir()
    shutil.copy(ensure_auth_keypair(pki_dir / "site-a").public_key, keys / "site-a.pub")
    argv = ["--pki", str(pki_dir), "--state", str(tmp_path / "coord"), "--fleet-port", str(free_port())]
    proc, info = start_coordinator(tmp_path, [*argv, "--site-keys", str(keys)])
    try:
        yield info
    finally:
        proc.stop()


def test_only_consortium_certificate_with_registered_key_gets_in(
    tmp_path: Path, pki_dir: Path, coordinator: dict[str, object]
) -> None:
    ca = pki_dir / "ca" / "ca.pem"
    fleet = str(coordinator["fleet"])
    site_a = pki.load_leaf(pki_dir, "site-a")
    key_a = ensure_auth_keypair(pki_dir / "site-a").private_key

    # 1. A certificate from another CA: the coordinator's sidecar refuses the handshake.
    other = tmp_path / "other-pki"
    pki.init_ca(other, consortium="fedseek-test")
    pki.issue(other, "site-a", role="node")
    rogue_leaf = pki.load_leaf(other, "site-a")
    rogue = supernode(
        tmp_path, "rogue", tls=TLSFiles(rogue_leaf.cert, rogue_leaf.key, ca), target=fleet, auth_key=key_a, ca=ca
    )
    # 2. No client certificate at all: straight to the mTLS port.
    bare = supernode(tmp_path, "bare", tls=None, target=fleet, auth_key=key_a, ca=ca)
    try:
        assert not wait_activated(coordinator, 1, timeout=15), "a node without a consortium certificate got in"
    finally:
        stop(rogue + bare)
    coord_sidecar_log = (Path(str(coordinator["state"])) / "sidecar" / "fleet-sidecar.log").read_text(errors="replace")
    assert (
        "CERTIFICATE_REQUIRED" in coord_sidecar_log.upper() or "peer did not return a certificate" in coord_sidecar_log
    )
    assert (
        "certificate verify failed" in coord_sidecar_log.lower()
        or "unable to get local issuer" in coord_sidecar_log.lower()
    )

    # 3. A consortium certificate but an unregistered Flower auth key: the second factor refuses it.
    site_b = pki.load_leaf(pki_dir, "site-b")
    unregistered = supernode(
        tmp_path,
        "unregistered",
        tls=TLSFiles(site_b.cert, site_b.key, ca),
        target=fleet,
        auth_key=ensure_auth_keypair(pki_dir / "site-b").private_key,
        ca=ca,
    )
    try:
        assert not wait_activated(coordinator, 1, timeout=12), "a node with an unregistered auth key got in"
    finally:
        stop(unregistered)
    link_log = (Path(str(coordinator["state"])) / "logs" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link_log

    # 4. Positive control: consortium certificate and registered key.
    good = supernode(tmp_path, "good", tls=TLSFiles(site_a.cert, site_a.key, ca), target=fleet, auth_key=key_a, ca=ca)
    try:
        assert wait_activated(coordinator, 1, timeout=40), (tmp_path / "good" / "supernode.log").read_text()[-2000:]
    finally:
        stop(good)
