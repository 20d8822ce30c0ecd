"""`/v1/explanations`: word (or token, sentence) attributions of a served answer, for reviewers, with
the HTML report (`/v1/explanations/{id}/report.html`) and its plot (`.../plot.png`).

A request names the answer to explain (`response`, supplied by the reviewer) or lets the model
generate it; with `contrast` it asks "why this answer rather than that one?" and gets attributions
of `log p(response) - log p(contrast)`. Every result carries a plain-language `summary`, the
probabilities with and without the prompt, its faithfulness checks (deletion/insertion curves,
comprehensiveness and sufficiency) and the adapter's `lineage` (node/explain_service.py).

A request is validated synchronously, so a refusal writes nothing to the audit trail; it is
then explained at once or, with `background`, queued and fetched later by id. The service's
refusals are FedSeekErrors that carry their answer (an unknown model 404 `model_not_found`, a
full queue 429, an unknown id 404, non-finite scores 500), given by the app's shared handler.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from federation.security.refusals import error_response
from node.api.deps import caller, current_caller, explanations_of
from node.explain_service import ExplainRequest

router = APIRouter(dependencies=[caller("reviewer")])

# Reports quote clinical text: never cached, and the page may load nothing (its plot is inlined).
PRIVATE = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
}


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


# The report and its plot are sealed at rest (node/explain_service.py): reviewers read them here.
@router.get("/v1/explanations/{explanation_id}/report.html", response_model=None)
def report(explanation_id: str, request: Request) -> Response:
    page = explanations_of(request).report(explanation_id, "html")
    return Response(page, media_type="text/html; charset=utf-8", headers=PRIVATE)


@router.get("/v1/explanations/{explanation_id}/plot.png", response_model=None)
def plot(explanation_id: str, request: Request) -> Response:
    return Response(explanations_of(request).report(explanation_id, "png"), media_type="image/png", headers=PRIVATE)
