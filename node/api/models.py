"""`/v1/models`: the base model and every adapter version, with lineage and release status
(`/metrics` is node/api/metrics.py).

At a node each card also says where the version stands in the site's gray release
(node/release.py): `status` stable, candidate or retired, and its `share` of default traffic
(requests naming no model, or `latest`). `fedseek serve` has no release: those fields are absent.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from node.api.deps import caller, serving_of
from node.api.protocol import ModelCard, ModelList

router = APIRouter(dependencies=[caller("application")])


@router.get("/v1/models", response_model=ModelList)
def models(request: Request) -> ModelList:
    return ModelList(data=[ModelCard.model_validate(card) for card in serving_of(request).models()])
