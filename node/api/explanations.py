"""`/v1/explanations`: token/word attributions of a served answer, for reviewers.

A request is validated synchronously, so a refusal writes nothing to the audit trail; it is
then explained at once or, with `background`, queued and fetched later by id. The service's
refusals are FedSeekErrors that carry their answer (an unknown model 404 `model_not_found`, a
full queue 429, an unknown id 404, non-finite scores 500), given by the app's shared handler.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from federation.security.refusals import error_response
from node.api.deps import caller, current_caller, explanations_of
from node.explain_service import ExplainRequest

router = APIRouter(dependencies=[caller("reviewer")])


@router.post("/v1/explanations", response_model=None)
def explain(req: ExplainRequest, request: Request) -> dict[str, Any] | JSONResponse:
    explanations = explanations_of(request)
    try:
        job = explanations.validate(req, requested_by=current_caller(request).actor)
        if req.background:
            return JSONResponse(status_code=202, content=explanations.submit(job))
        return explanations.run(job)
    except ValueError as exc:  # beyond the site's limits, or nothing to explain (an empty answer)
        return error_response(400, str(exc))


@router.get("/v1/explanations/{explanation_id}", response_model=None)
def explanation(explanation_id: str, request: Request) -> dict[str, Any]:
    return explanations_of(request).get(explanation_id)
