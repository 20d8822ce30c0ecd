"""What the node's routes take from their app: the checked caller, the serving engine, the node.

The app factory (node/api/app.py) puts the access policy and the rest on `app.state`; routes,
defined once per module on an `APIRouter`, read them per request through these functions, so
the same route serves `fedseek node` and `fedseek serve` alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request

from federation.errors import FedSeekError
from node.access import AccessPolicy, Caller, Rule
from node.api.guard import CALLER_STATE_KEY, RULE_STATE_KEY
from node.explain_service import Explanations
from node.service import Loading, NodeService, Serving

GetServing = Callable[[], Serving | None]


class GuardMismatch(FedSeekError):
    """A route's rule is not the one node/access.py's table gave its path: a bug, refused (500)."""


class Admitted:
    """The dependency `caller(rule)` installs: asserts the guard admitted the caller under `rule`,
    then holds the model the request names to the site's access policy."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    async def __call__(self, request: Request) -> None:
        state = request.scope.get("state", {})
        if state.get(RULE_STATE_KEY, "unset") != self.rule or CALLER_STATE_KEY not in state:
            raise GuardMismatch(
                f"{request.url.path}: route wants {self.rule!r}, the guard applied {state.get(RULE_STATE_KEY)!r}"
            )
        model = await _requested_model(request)
        if model is not None:
            access: AccessPolicy = request.app.state.access
            access.require_model(request, state[CALLER_STATE_KEY], model)  # a refusal is audited there


async def _requested_model(request: Request) -> str | None:
    """The `model` a JSON request body names. FastAPI parsed the body before dependencies run
    (within the guard's size limit) and `request.json()` returns that parse; a body that is not a
    JSON object naming a model string names none (the route's own validation answers it)."""
    if request.method != "POST" or request.scope["path"].startswith("/internal/"):
        return None
    try:
        body = await request.json()
    except ValueError:
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def caller(rule: Rule) -> Any:
    """A route dependency asserting its caller was admitted under `rule` (node/access.py).

    The check itself runs earlier, before the body is read (node.api.guard.RequestGuard, which
    FastAPI's dependencies cannot: FastAPI parses the body first); this keeps each route's
    declared rule and the guard's table in step, failing closed if they ever differ.
    """
    return Depends(Admitted(rule))


def current_caller(request: Request) -> Caller:
    who: Caller = request.scope["state"][CALLER_STATE_KEY]
    return who


def serving_of(request: Request) -> Serving:
    """The serving engine, or Loading (503) while the model loads."""
    get: GetServing = request.app.state.get_serving
    serving = get()
    if serving is None:
        raise Loading("the model is still loading; retry shortly")
    return serving


def node_of(request: Request) -> NodeService:
    service: NodeService = request.app.state.service
    return service


def explanations_of(request: Request) -> Explanations:
    explanations: Explanations = request.app.state.explanations
    return explanations
