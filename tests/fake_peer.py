"""A stand-in for the TLS layer in TestClient tests, which have no handshake.

`x-test-peer: name:role` plays the verified client certificate. Only tests pass `header_peer`
to an app; the parties themselves always read the certificate federation.security.mtls_server verified
(tests with real handshakes: tests/federation/test_mtls_server.py, the `node_url` tests of
tests/node/test_explain_api.py, tests/e2e/test_fleet_revocation.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import Request

from federation.security.pki import Identity

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
