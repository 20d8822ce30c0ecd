"""`/v1/explanations`: token/word attributions of a served answer, for reviewers.

A request is validated synchronously, so a refusal writes nothing to the audit trail; it is
then explained at once or, with `background`, queued and fetched later by id.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from explain.attribution import NonFiniteScores
from federation.security.refusals import error_response
from node.api.deps import caller, current_caller, explanations_of
from node.engine import UnknownModel
from node.explain_service import ExplainRequest, ExplanationNotFound
from node.explain_service import QueueFull as ExplanationQueueFull

router = APIRouter(dependencies=[caller("reviewer")])


@router.post("/v1/explanations", response_model=None)
def explain(req: ExplainRequest, request: Request) -> dict[str, Any] | JSONResponse:
    explanations = explanations_of(request)
    try:
        job = explanations.validate(req, requested_by=current_caller(request).actor)
        if req.background:
            return JSONResponse(status_code=202, content=explanations.submit(job))
        return explanations.run(job)
    except UnknownModel as exc:
        return error_response(404, str(exc), code="model_not_found")
    except ExplanationQueueFull as exc:
        return error_response(429, str(exc), type_="rate_limit_error", code="explanation_queue_full")
    except ValueError as exc:
        return error_response(400, str(exc))
    except NonFiniteScores as exc:
        return error_response(500, str(exc), type_="server_error", code="non_finite_scores")


@router.get("/v1/explanations/{explanation_id}", response_model=None)
def explanation(explanation_id: str, request: Request) -> dict[str, Any] | JSONResponse:
    try:
        return explanations_of(request).get(explanation_id)
    except ExplanationNotFound as exc:
        return error_response(404, str(exc), code="explanation_not_found")
