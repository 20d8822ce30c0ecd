"""The one shape of an `access.refused` audit record, which the node's and the coordinator's tests both check.

Their apps write it through federation.security.refusals.audit_refusal; checking both against this one
definition is what keeps an auditor's view of refusals the same for every party.
"""

from __future__ import annotations

from typing import Any

CHAIN_FIELDS = ("seq", "ts", "prev_hash", "hash")  # the audit trail's own, not the refusal's


def refusal(*, actor: str, resource: str, status: int, reason: str, role: str | None) -> dict[str, Any]:
    """An `access.refused` record's content: who, which route, and why (status, message, certificate role)."""
    return {
        "actor": actor,
        "action": "access.refused",
        "resource": resource,
        "details": {"status": status, "reason": reason, "role": role},
    }


def content(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record without the fields that chain it to the trail."""
    return {k: v for k, v in record.items() if k not in CHAIN_FIELDS}
