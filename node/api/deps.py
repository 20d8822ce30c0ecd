"""What the node's routes take from their app: the checked caller, the serving engine, the node.

The app factory (node/api/app.py) puts the access policy and the rest on `app.state`; routes,
defined once per module on an `APIRouter`, read them per request through these functions, so
the same route serves `fedseek node` and `fedseek serve` alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request

from node.access import AccessPolicy, Caller, Rule
from node.explain_service import Explanations
from node.service import Loading, NodeService, Serving

GetServing = Callable[[], Serving | None]


def caller(rule: Rule) -> Any:
    """A route dependency checking the caller against `rule` (node/access.py).

    Route dependencies run before the body is parsed, so a refused caller never gets a body
    validated; the route reads who it was with `current_caller`.
    """

    def check(request: Request) -> None:
        policy: AccessPolicy = request.app.state.access
        request.state.caller = policy.require(request, rule)

    return Depends(check)


def current_caller(request: Request) -> Caller:
    who: Caller = request.state.caller
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
