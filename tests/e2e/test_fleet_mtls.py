"""Real processes: a coordinator (SuperLink + nginx gateway), site sidecars (stunnel) and raw
`flower-supernode`s.

Only a SuperNode whose sidecar presents a consortium certificate AND whose Flower key is the
one registered for that certificate's site gets in; the others are refused by the gateway,
each with an audit record. The fleet port serves the Fleet API only: the Control API is out
of reach even with a valid node certificate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.service import CONNECTION, flwr_bin, flwr_control, flwr_env, write_cli_config
from federation.ops.layout import CoordinatorLayout
from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.sidecar import TLSFiles
from tests.e2e.fleet import (
    activated,
    site_sidecar,
    start_coordinator,
    stop,
    supernode,
    wait_activated,
    wait_record,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path) -> Iterator[dict[str, object]]:
    """One coordinator for the tests below (start-up is the slow part); site-a's key registered."""
    tmp_path = tmp_path_factory.mktemp("coordinator")
    keys = tmp_path / "site-keys"
    keys.mkdir()
    shutil.copy(ensure_auth_keypair(pki_dir / "site-a").public_key, keys / "site-a.pub")
    argv = ["--pki", str(pki_dir), "--state", str(tmp_path / "coord"), "--fleet-port", str(free_port())]
    proc, info = start_coordinator(tmp_path, [*argv, "--site-keys", str(keys)])
    try:
        yield info
    finally:
        proc.stop()


def flwr_ls(flwr_home: Path, address: str, ca: Path) -> subprocess.CompletedProcess[str]:
    """`flwr ls` (the Control API's list-runs) against `address`, trusting `ca`."""
    write_cli_config(flwr_home, address, ca_cert=ca)
    return subprocess.run(
        [flwr_bin("flwr"), "ls", CONNECTION, "--format", "json"],
        env=flwr_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=60,
    )


def gateway_refusals(state: Path, subject: str, status: int) -> int:
    """Requests of `subject` that the gateway answered `status`, from nginx's access log."""
    log = CoordinatorLayout(state).gateway / "access.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(1 for e in map(json.loads, lines) if e["status"] == status and e["subject"].endswith(subject))


def test_only_consortium_certificate_with_its_sites_key_gets_in(
    tmp_path: Path, pki_dir: Path, coordinator: dict[str, object]
) -> None:
    ca = pki_dir / "ca" / "ca.pem"
    fleet, state = str(coordinator["fleet"]), Path(str(coordinator["state"]))
    site_a, site_b = pki.load_leaf(pki_dir, "site-a"), pki.load_leaf(pki_dir, "site-b")
    key_a = ensure_auth_keypair(pki_dir / "site-a").private_key
    key_b = ensure_auth_keypair(pki_dir / "site-b").private_key

    # 1. A certificate from another CA (its SuperNode trusts its own sidecar), and no client
    #    certificate at all: the gateway refuses both, with the reason in the audit trail.
    other = tmp_path / "other-pki"
    pki.init_ca(other, consortium="fedseek-test")
    rogue_leaf = pki.issue(other, "site-a", role="node")
    rogue_tls = TLSFiles(rogue_leaf.cert, rogue_leaf.key, ca)
    rogue = supernode(tmp_path, "rogue", tls=rogue_tls, target=fleet, auth_key=key_a, ca=rogue_leaf.ca_cert)
    bare = supernode(tmp_path, "bare", tls=None, target=fleet, auth_key=key_a, ca=ca)
    try:
        foreign = wait_record(state, "tls.refused", lambda r: "CN=site-a" in r["details"]["reason"], 30)
        missing = wait_record(state, "tls.refused", lambda r: r["details"]["reason"] == "no client certificate", 30)
    finally:
        stop(rogue + bare)
    assert foreign["details"]["endpoint"] == "fleet" and foreign["details"]["status"] == 400
    assert "unable to verify the first certificate" in foreign["details"]["reason"]  # OpenSSL, depth 1
    assert foreign["actor"].startswith("127.0.0.1:")  # an unverified subject is no actor
    assert missing["actor"].startswith("127.0.0.1:")
    assert activated(coordinator) == 0, "a node without a consortium certificate got in"

    # 2. A valid certificate for site-b with site-b's own, unregistered key, then with site-a's
    #    registered (stolen) key: refused per request, before the SuperLink sees either. The
    #    audit trail counts a peer's identical refusals per minute (tests/redteam/test_refusal_flood.py):
    #    the first attempt leaves a record at once, the second is seen in nginx's own log.
    for name, key in (("unregistered", key_b), ("stolen-key", key_a)):
        refused_before = gateway_refusals(state, "CN=site-b", 403)
        node = supernode(tmp_path, name, tls=TLSFiles(site_b.cert, site_b.key, ca), target=fleet, auth_key=key, ca=ca)
        try:
            deadline = time.monotonic() + 30
            while gateway_refusals(state, "CN=site-b", 403) == refused_before and time.monotonic() < deadline:
                time.sleep(0.3)
            assert gateway_refusals(state, "CN=site-b", 403) > refused_before, f"{name}: not refused"
            denied = wait_record(state, "access.refused", lambda r: r["actor"] == "site-b", 30)
        finally:
            stop(node)
        assert denied["actor"] == "site-b" and denied["details"]["status"] == 403, denied
        assert denied["resource"].startswith("POST /v1/fleet/"), denied
        assert "does not match the key registered" in denied["details"]["reason"]
        assert activated(coordinator) == 0, f"{name}: a node whose Flower key is not its site's got in"

    # 3. Positive control: site-a's certificate and site-a's key.
    good = supernode(tmp_path, "good", tls=TLSFiles(site_a.cert, site_a.key, ca), target=fleet, auth_key=key_a, ca=ca)
    try:
        assert wait_activated(coordinator, 1, timeout=40), (tmp_path / "good" / "supernode.log").read_text()[-2000:]
    finally:
        stop(good)


def test_control_api_is_not_reachable_through_the_fleet_port(
    tmp_path: Path, pki_dir: Path, coordinator: dict[str, object]
) -> None:
    """`flwr ls` through a site's sidecar (valid node certificate) is refused 403 and audited;
    the same command run by the operator inside the SuperLink's network namespace works."""
    ca = pki_dir / "ca" / "ca.pem"
    state = Path(str(coordinator["state"]))
    socket, flwr_home = Path(str(coordinator["superlink_socket"])), Path(str(coordinator["flwr_home"]))
    operator = flwr_control(socket, flwr_home, ["ls", CONNECTION, "--format", "json"])
    assert operator.returncode == 0 and json.loads(operator.stdout)["success"], operator.stdout + operator.stderr

    site_a = pki.load_leaf(pki_dir, "site-a")
    sidecar, address = site_sidecar(
        tmp_path, "site-a", tls=TLSFiles(site_a.cert, site_a.key, ca), target=str(coordinator["fleet"])
    )
    try:
        through_fleet = flwr_ls(tmp_path / "flwr-site", address, ca)
    finally:
        sidecar.stop()
    refused = json.loads(through_fleet.stdout)
    assert not refused["success"] and "403 Forbidden" in refused["error-message"], refused
    denied = wait_record(state, "access.refused", lambda r: r["resource"].startswith("POST /v1/control/"), 10)
    assert denied["actor"] == "site-a" and denied["details"]["status"] == 403
    assert denied["details"]["reason"] == "route not served on the fleet port (Fleet API only)"
