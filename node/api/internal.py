"""`/internal/train`, `/internal/ready` and `/internal/deploy`: the federation's calls, from this site's
own ClientApp only.

Bodies are safetensors (federation.protocol.wire), the round's settings a JSON header. Any
FedSeekError a round raises (an unknown setting is InvalidInput) reaches the app's shared
handler, which answers its status; the privacy and training refusals below keep the code
they always had, their class name, for the ClientApp to report.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from federation.protocol import wire
from federation.security.refusals import error_response
from node.api.deps import caller, node_of
from node.client_app import CONFIG_HEADER, REPORT_HEADER
from node.trainer import TrainingError
from privacy.ledger import BudgetExceeded, LedgerError

router = APIRouter(dependencies=[caller("self")])


def _config(request: Request) -> dict[str, Any]:
    config = json.loads(request.headers.get(CONFIG_HEADER, "{}"))
    if not isinstance(config, dict):
        raise json.JSONDecodeError("the config header must hold a JSON object", "", 0)
    return config


async def _body(request: Request) -> tuple[wire.Arrays | None, dict[str, Any]]:
    config = _config(request)
    raw = await request.body()
    return (wire.decode(raw) if raw else None), config


@router.post("/internal/train", response_model=None)
async def internal_train(request: Request) -> Response:
    try:
        arrays, config = await _body(request)
        result = await run_in_threadpool(node_of(request).train, arrays, config)
    except (wire.WireError, json.JSONDecodeError) as exc:
        return error_response(400, str(exc))
    except (BudgetExceeded, LedgerError, TrainingError) as exc:
        return error_response(409, str(exc), code=type(exc).__name__)
    return Response(
        content=wire.encode_update(result.update()),  # FFA-LoRA: B only, with A's digest
        media_type="application/octet-stream",
        headers={REPORT_HEADER: json.dumps(result.report.to_dict())},
    )


@router.post("/internal/ready", response_model=None)
async def internal_ready(request: Request) -> dict[str, Any] | JSONResponse:
    """The coordinator's readiness query before a round: could this site train it? Nothing is charged."""
    try:
        config = _config(request)
    except json.JSONDecodeError as exc:
        return error_response(400, str(exc))
    answer = await run_in_threadpool(node_of(request).readiness, config)
    return answer.to_dict()


@router.post("/internal/deploy", response_model=None)
async def internal_deploy(request: Request) -> dict[str, Any] | JSONResponse:
    try:
        config = _config(request)
        if "adapter-version" not in config:
            return error_response(400, "deploy needs adapter arrays and an adapter-version")
        # The version names a directory: refuse a path-like or reserved one before the body is read.
        version = node_of(request).check_deploy_version(config["adapter-version"])
        arrays, _ = await _body(request)
        if not arrays:
            return error_response(400, "deploy needs adapter arrays and an adapter-version")
        # The registry's lineage (run, round, parent, sites and their epsilon), kept for explanation reports.
        raw = config.get("adapter-lineage")
        lineage = json.loads(raw) if isinstance(raw, str) else None
        return await run_in_threadpool(
            partial(node_of(request).deploy, lineage=lineage if isinstance(lineage, dict) else None),
            version,
            str(config["adapter-sha256"]),
            arrays,
        )
    except KeyError as exc:
        return error_response(400, f"deploy config is missing {exc}")
    except (wire.WireError, json.JSONDecodeError) as exc:
        return error_response(400, str(exc))
