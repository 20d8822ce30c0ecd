"""Revocation on the fleet channel, with real processes: coordinator (SuperLink + nginx
gateway) and two SuperNodes behind their site sidecars.

`fedseek ca revoke` must shut the revoked site out within 60 seconds (its SuperNode key is
unregistered and dropped from the gateway's binding map, nginx reloads the CRL, its old
workers close the site's open connections, and its certificate is refused on every new
request), while the other site keeps its sidecar and registration and is served again
right after the reload, with no restart.
"""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import httpx
import pytest

from federation.ops.layout import CoordinatorLayout
from federation.ops.supervise import free_port
from federation.protocol import config as cfg
from federation.security import pki
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.sidecar import TLSFiles
from federation.security.site_binding import register_site_key
from tests.e2e.fleet import audit_records, start_coordinator, stop, supernode, wait_activated

pytestmark = pytest.mark.e2e

LIMIT_S = 60.0


def probe(pki_dir: Path, name: str, fleet: str) -> tuple[int, str]:
    """A request to the fleet port with `name`'s certificate: 403 (certificate accepted, a
    Control route refused) or 400 with nginx's certificate error."""
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(pki_dir / name / "cert.pem"), str(pki_dir / name / "key.pem"))
    with httpx.Client(verify=ctx, timeout=5) as client:
        response = client.post(f"https://localhost:{fleet.rsplit(':', 1)[1]}/v1/control/list-runs")
    return response.status_code, response.text


def served_since(state: Path, site: str, when: str) -> bool:
    """Whether the gateway forwarded a request of `site` (HTTP 200) at or after ISO time `when`."""
    for line in (CoordinatorLayout(state).gateway / "access.log").read_text().splitlines():
        entry = json.loads(line)
        if entry["status"] == 200 and entry["subject"].endswith(f"CN={site}") and entry["time"] >= when:
            return True
    return False


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
        assert probe(root, "site-x", fleet)[0] == 403
        registered = {r["resource"]: r for r in audit_records(state) if r["action"] == "site.registered"}
        assert set(registered) == {"site-x", "site-y"}
        y_sidecar_pid = nodes["site-y"][0].pid

        started = time.monotonic()
        revoked_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        pki.revoke(root, "site-x", reason="key-compromise")
        deadline = started + LIMIT_S
        checks = {
            "new request refused": lambda: probe(root, "site-x", fleet)[0] == 400,
            "its SuperNode refused": lambda: any(
                r["action"] == "tls.refused"
                and "certificate revoked" in r["details"]["reason"]
                and "CN=site-x" in r["details"]["reason"]
                and r["resource"].startswith("POST /v1/fleet/")  # the SuperNode's, not the probe's
                for r in audit_records(state)
            ),
            "unregistered": lambda: any(r["action"] == "site.unregistered" for r in audit_records(state)),
        }
        after: dict[str, float] = {}
        while len(after) < len(checks) and time.monotonic() < deadline:
            for what, check in checks.items():
                if what not in after and check():
                    after[what] = time.monotonic() - started
            time.sleep(0.2)
        print("site-x after revoke: " + ", ".join(f"{what} {t:.1f}s" for what, t in after.items()))
        assert set(after) == set(checks) and max(after.values()) < LIMIT_S, after
        status, body = probe(root, "site-x", fleet)
        assert status == 400 and "SSL certificate error" in body
        gone = [r for r in audit_records(state) if r["action"] == "site.unregistered"]
        assert [r["resource"] for r in gone] == ["site-x"], gone

        # The other site: same sidecar process, certificate accepted, served again after the reload.
        assert nodes["site-y"][0].alive() and nodes["site-y"][0].pid == y_sidecar_pid
        assert nodes["site-y"][1].alive()
        assert probe(root, "site-y", fleet)[0] == 403
        while time.monotonic() < deadline and not served_since(state, "site-y", revoked_at):
            time.sleep(0.5)
        assert served_since(state, "site-y", revoked_at), "site-y was not served after the reload"
        assert proc.alive()
        fleet_refusals = [r for r in audit_records(state) if r["action"] == "tls.refused"]
        assert all(r["details"]["endpoint"] == "fleet" for r in fleet_refusals)

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
