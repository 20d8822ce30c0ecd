"""SiteAccess: which sites are registered, and the bindings the fleet gateway enforces per request.

The SuperLink's register/unregister calls are recorded instead of run (the e2e fleet tests run
them for real); the PKI, the site keys and the audit trail are real.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.sites import SiteAccess
from federation.security import pki
from federation.security.fleet_gateway import flower_key_header, subject_dn
from federation.security.site_binding import register_site_key
from privacy.audit import AuditTrail


def test_bindings_follow_registration_and_revocation(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root, consortium="sites-test")
    for site in ("site-a", "site-b"):
        pki.issue(root, site, role="node")
        register_site_key(root, site)
    (root / "site-keys" / "site-c.pub").write_bytes((root / "site-keys" / "site-a.pub").read_bytes())  # no cert
    calls: list[tuple[str, object]] = []

    def register(key: Path, name: str) -> int:
        calls.append(("register", name))
        return len(calls)

    sites = SiteAccess(
        pki_dir=root,
        site_keys_dir=root / "site-keys",
        audit=AuditTrail(tmp_path / "audit.jsonl"),
        register=register,
        unregister=lambda node_id: calls.append(("unregister", node_id)),
    )
    assert sorted(sites.sync()) == ["site-a", "site-b"]
    expected = {
        subject_dn(name=s, role="node", consortium="sites-test"): flower_key_header(
            (root / "site-keys" / f"{s}.pub").read_bytes()
        )
        for s in ("site-a", "site-b")
    }
    assert sites.fleet_bindings() == expected

    pki.revoke(root, "site-a")
    assert sorted(sites.sync()) == ["site-b"]
    assert list(sites.fleet_bindings()) == [subject_dn(name="site-b", role="node", consortium="sites-test")]
    assert calls == [("register", "site-a"), ("register", "site-b"), ("unregister", 1)]
    actions = [json.loads(line)["action"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert actions == ["site.registered", "site.registered", "site.unregistered"]


def test_a_malformed_key_is_not_registered(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root, consortium="sites-test")
    pki.issue(root, "site-a", role="node")
    (root / "site-keys").mkdir()
    (root / "site-keys" / "site-a.pub").write_text("not a key\n")
    sites = SiteAccess(
        pki_dir=root,
        site_keys_dir=root / "site-keys",
        audit=AuditTrail(tmp_path / "audit.jsonl"),
        register=lambda key, name: 1,
        unregister=lambda node_id: None,
    )
    assert sites.sync() == {} and sites.fleet_bindings() == {}
