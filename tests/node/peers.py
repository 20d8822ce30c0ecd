"""Node access policies for TestClient tests (see tests/fake_peer.py for the stand-in peer)."""

from __future__ import annotations

from federation.ops.layout import NodeLayout
from node.access import AccessPolicy
from node.api_keys import ensure_first_key
from node.policy import SitePolicy, add_members
from node.service import NodeService
from privacy.audit import AuditTrail
from tests.fake_peer import HEADER, as_peer, header_peer

__all__ = ["HEADER", "MEMBERS", "api_key", "as_peer", "policy_for", "site_policy"]

MEMBERS = ("rita", "olga", "ops", "reviewer")
"""The reviewers and admins the tests present, listed in the site's organisation (node/policy.py)."""


def site_policy(layout: NodeLayout, *, audit: AuditTrail, site: str = "site-a") -> SitePolicy:
    """The site's policy file (the default, written if there is none) with MEMBERS listed."""
    add_members(layout.access_policy, site=site, org=site, names=MEMBERS)
    return SitePolicy(layout.access_policy, audit=audit)


def policy_for(service: NodeService, *, openai_auth: str = "api_key") -> AccessPolicy:
    return AccessPolicy(
        site=service.config.name,
        audit=service.audit,
        api_keys=ensure_first_key(service.layout),
        agent_token=service.token,
        policy=site_policy(service.layout, audit=service.audit, site=service.config.name),
        openai_auth=openai_auth,  # type: ignore[arg-type]
        peer=header_peer,
    )


def api_key(service: NodeService) -> str:
    ensure_first_key(service.layout)
    return service.layout.api_key.read_text().strip()
