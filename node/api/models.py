"""`/v1/models`: the base model and every adapter version, with lineage and release status
(`/metrics` is node/api/metrics.py).

At a node each card also says where the version stands in the site's gray release
(node/release.py): `status` stable, candidate or retired, and its `share` of default traffic
(requests naming no model, or `latest`). `fedseek serve` has no release: those fields are absent.
The list holds only the models the site policy lets the caller use (on chat or completions), as
OpenAI lists a key's models: a version the policy denies it is not named to it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from node.access import AccessPolicy
from node.api.deps import caller, current_caller, serving_of
from node.api.protocol import ModelCard, ModelList

router = APIRouter(dependencies=[caller("application")])


@router.get("/v1/models", response_model=ModelList)
def models(request: Request) -> ModelList:
    access: AccessPolicy = request.app.state.access
    who = current_caller(request)
    cards = [card for card in serving_of(request).models() if access.may_use(who, card["id"])]
    return ModelList(data=[ModelCard.model_validate(card) for card in cards])
