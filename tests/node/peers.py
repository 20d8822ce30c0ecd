"""Node access policies for TestClient tests (see tests/fake_peer.py for the stand-in peer)."""

from __future__ import annotations

from node.access import AccessPolicy
from node.api_keys import ensure_first_key
from node.service import NodeService
from tests.fake_peer import HEADER, as_peer, header_peer

__all__ = ["HEADER", "api_key", "as_peer", "policy_for"]


def policy_for(service: NodeService, *, openai_auth: str = "api_key") -> AccessPolicy:
    return AccessPolicy(
        site=service.config.name,
        audit=service.audit,
        api_keys=ensure_first_key(service.layout),
        agent_token=service.token,
        openai_auth=openai_auth,  # type: ignore[arg-type]
        peer=header_peer,
    )


def api_key(service: NodeService) -> str:
    ensure_first_key(service.layout)
    return service.layout.api_key.read_text().strip()
