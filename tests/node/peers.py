"""A stand-in for the TLS layer in TestClient tests, which have no handshake.

`x-test-peer: name:role` plays the verified client certificate. Only tests build an
AccessPolicy with `header_peer`; the node itself always reads the certificate that
federation.mtls_server verified (tests/node/test_api_mtls.py covers that path with real
handshakes).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import Request

from federation.pki import Identity
from node.access import AccessPolicy
from node.api_keys import ensure_first_key
from node.service import NodeService

HEADER = "x-test-peer"


def identity(name: str, role: str) -> Identity:
    now = datetime.now(UTC)
    return Identity(
        name=name,
        role=role,  # type: ignore[arg-type]
        consortium="fedseek-test",
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=1),
        serial=1,
        fingerprint_sha256="0" * 64,
    )


def header_peer(request: Request) -> Identity | None:
    value = request.headers.get(HEADER)
    if not value:
        return None
    name, _, role = value.partition(":")
    return identity(name, role)


def as_peer(name: str, role: str) -> dict[str, str]:
    return {HEADER: f"{name}:{role}"}


def policy_for(service: NodeService, *, openai_auth: str = "api_key") -> AccessPolicy:
    return AccessPolicy(
        site=service.config.name,
        audit=service.audit,
        api_keys=ensure_first_key(service.state_dir),
        agent_token=service.token,
        openai_auth=openai_auth,  # type: ignore[arg-type]
        peer=header_peer,
    )


def api_key(service: NodeService) -> str:
    ensure_first_key(service.state_dir)
    return (service.state_dir / "api-key").read_text().strip()
