"""Revocation on the fleet channel, with real processes: coordinator (SuperLink + stunnel)
and two SuperNodes behind their site sidecars.

`fedseek ca revoke` must shut the revoked site out within 60 seconds (its SuperNode key is
unregistered, so its open session is no longer served, and its certificate fails new
handshakes), while the other site keeps its tunnel and its registration, with no restart.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from federation import config as cfg
from federation import pki
from federation.flower_auth import ensure_auth_keypair
from federation.procs import free_port
from federation.sidecar import TLSFiles
from federation.site_binding import register_site_key
from tests.e2e.fleet import start_coordinator, stop, supernode, wait_activated

pytestmark = pytest.mark.e2e

LIMIT_S = 60.0


def audit_actions(state: Path) -> list[dict[str, object]]:
    path = state / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def handshake(pki_dir: Path, name: str, fleet: str) -> str:
    """Open a TLS connection to the fleet port with `name`'s certificate: 'open' or the error."""
    host, port = fleet.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(pki_dir / name / "cert.pem"), str(pki_dir / name / "key.pem"))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.settimeout(2)
            try:
                data = tls.recv(1)  # TLS 1.3: a refused client certificate arrives as an alert here
            except TimeoutError:
                return "open"  # nothing to read, no alert: the tunnel is up
            return "open" if data else "closed"
    except (ssl.SSLError, OSError) as exc:
        return str(exc)


def admin_client(pki_dir: Path, name: str) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(pki_dir / name / "cert.pem"), str(pki_dir / name / "key.pem"))
    return httpx.Client(verify=ctx, timeout=10)


def test_revoked_site_is_shut_out_within_a_minute_and_the_other_stays(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root, consortium="revocation-test")
    pki.issue(root, "coordinator", role="coordinator")
    pki.issue(root, "operator", role="admin")
    for site in ("site-x", "site-y"):
        pki.issue(root, site, role="node")
        register_site_key(root, site)
    conf = cfg.CoordinatorConfig(
        pki_dir=str(root),
        state_dir=str(tmp_path / "coord"),
        fleet_port=free_port(),
        site_keys_dir=str(root / "site-keys"),
        pki_poll_seconds=1.0,
    )
    proc, info = start_coordinator(tmp_path, ["--config", str(cfg.save(conf, tmp_path / "coordinator.json"))])
    state, fleet, ca = Path(str(info["state"])), str(info["fleet"]), root / "ca" / "ca.pem"
    nodes = {}
    try:
        for site in ("site-x", "site-y"):
            leaf = pki.load_leaf(root, site)
            nodes[site] = supernode(
                tmp_path,
                site,
                tls=TLSFiles(leaf.cert, leaf.key, ca, crl=leaf.crl),
                target=fleet,
                auth_key=ensure_auth_keypair(root / site).private_key,
                ca=ca,
                max_retries=0,
                max_wait=300,
            )
        assert wait_activated(info, 2, timeout=90), (tmp_path / "site-x" / "supernode.log").read_text()[-2000:]
        assert handshake(root, "site-x", fleet) == "open"
        registered = {r["resource"]: r for r in audit_actions(state) if r["action"] == "site.registered"}
        assert set(registered) == {"site-x", "site-y"}
        y_sidecar_pid = nodes["site-y"][0].pid

        started = time.monotonic()
        pki.revoke(root, "site-x", reason="key-compromise")
        deadline = started + LIMIT_S
        while time.monotonic() < deadline:
            if any(r["action"] == "site.unregistered" for r in audit_actions(state)):
                break
            time.sleep(0.2)
        unregistered_after = time.monotonic() - started
        gone = [r for r in audit_actions(state) if r["action"] == "site.unregistered"]
        assert [r["resource"] for r in gone] == ["site-x"], gone
        assert unregistered_after < LIMIT_S
        while (refused := handshake(root, "site-x", fleet)) == "open" and time.monotonic() < deadline:
            time.sleep(0.5)
        refused_after = time.monotonic() - started
        assert "revoked" in refused or refused == "closed", refused
        assert refused_after < LIMIT_S
        print(f"site-x unregistered after {unregistered_after:.1f}s, handshake refused after {refused_after:.1f}s")

        # The other site: same sidecar process, tunnel still accepted, still registered.
        assert nodes["site-y"][0].alive() and nodes["site-y"][0].pid == y_sidecar_pid
        assert nodes["site-y"][1].alive()
        assert handshake(root, "site-y", fleet) == "open"
        assert proc.alive()
        sidecar_log = (state / "sidecar" / "fleet-sidecar.log").read_text(errors="replace")
        assert "certificate revoked" in sidecar_log.lower()
        while time.monotonic() < deadline and not any(
            r["action"] == "tls.refused" and "revoked" in str(r["details"]) for r in audit_actions(state)
        ):
            time.sleep(0.5)
        fleet_refusals = [r for r in audit_actions(state) if r["action"] == "tls.refused"]
        assert any(r["actor"] == "site-x" and r["details"]["endpoint"] == "fleet" for r in fleet_refusals)

        # The admin API: admins only, and it shows what happened.
        admin_url = str(info["admin"])
        with admin_client(root, "operator") as admin:
            rows = {row["name"]: row for row in admin.get(f"{admin_url}/v1/admin/sites").json()["data"]}
        assert rows["site-x"]["status"] == "revoked" and rows["site-x"]["registered_node_id"] is None
        assert rows["site-y"]["status"] == "valid" and rows["site-y"]["registered_node_id"] is not None
        with admin_client(root, "site-y") as node:
            assert node.get(f"{admin_url}/v1/admin/sites").status_code == 403
    finally:
        for procs in nodes.values():
            stop(procs)
        proc.stop()
