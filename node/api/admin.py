"""`/v1/admin/*`: the node's state and its gray release, for the site's operator (admin certificate).

- `GET /v1/admin/status`: model, rounds, privacy budget, audit trail;
- `GET /v1/admin/models`: the release (node/release.py): policy, stable, candidate, every version's
  status, share of default traffic, eval loss, requests and errors;
- `POST /v1/admin/models/promote` `{"version": ...}`, `POST /v1/admin/models/rollback`
  `{"version": ... | null}` and `POST /v1/admin/models/policy` `{"share": ..., ...}`: a person's
  decisions, audited under the admin certificate's name (`fedseek model promote|rollback|policy`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from node.api.deps import caller, current_caller, node_of
from node.release import ReleasePolicy

router = APIRouter(dependencies=[caller("admin")])


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = None  # None: the candidate if there is one, else the stable version


class PolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    share: float | None = None
    tolerance: float | None = None
    min_requests: int | None = None
    error_margin: float | None = None


@router.get("/v1/admin/status", response_model=None)
def status(request: Request) -> dict[str, Any]:
    return node_of(request).status()


@router.get("/v1/admin/models", response_model=None)
def release(request: Request) -> dict[str, Any]:
    return node_of(request).release.to_json()


@router.post("/v1/admin/models/promote", response_model=None)
def promote(body: PromoteRequest, request: Request) -> dict[str, Any]:
    node = node_of(request)
    node.release.promote(body.version, actor=current_caller(request).actor)
    return node.release.to_json()


@router.post("/v1/admin/models/rollback", response_model=None)
def rollback(body: RollbackRequest, request: Request) -> dict[str, Any]:
    node = node_of(request)
    node.release.rollback(body.version, actor=current_caller(request).actor)
    return node.release.to_json()


@router.post("/v1/admin/models/policy", response_model=None)
def policy(body: PolicyRequest, request: Request) -> dict[str, Any]:
    """Change the fields given; the others keep their values."""
    node = node_of(request)
    current = node.release.policy.__dict__
    changed = {k: v for k, v in body.model_dump().items() if v is not None}
    node.release.set_policy(ReleasePolicy(**{**current, **changed}), actor=current_caller(request).actor)
    return node.release.to_json()
