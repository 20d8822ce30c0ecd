"""Listing issued certificates with their status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from federation.security.pki import issue, list_status, revoke


def test_list_status(pki: Path) -> None:
    issue(pki, "site-a", role="node", days=1)
    issue(pki, "site-b", role="node")
    issue(pki, "site-c", role="node")
    revoke(pki, "site-c")
    assert [(i.name, s) for i, s in list_status(pki)] == [
        ("site-a", "valid"),
        ("site-b", "valid"),
        ("site-c", "revoked"),
    ]
    later = datetime.now(UTC) + timedelta(days=2)
    assert [s for _, s in list_status(pki, now=later)] == ["expired", "valid", "revoked"]
