"""`/v1/admin/status`: the node's state for its operator (model, rounds, privacy budget, audit trail)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from node.api.deps import caller, node_of

router = APIRouter(dependencies=[caller("admin")])


@router.get("/v1/admin/status", response_model=None)
def status(request: Request) -> dict[str, Any]:
    return node_of(request).status()
