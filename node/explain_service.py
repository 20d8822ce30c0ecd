"""Explanations at the site: SHAP attributions of an answer to the words of its prompt.

The scorer teacher-forces the fixed answer under each masked prompt and gathers only the
answer tokens' log-probs (never full-vocabulary logits on the host). The explanation is
bound to the adapter version and its sha256, and recorded in the audit trail first, so the
report can cite its audit record.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explain.attribution import explain_text
from explain.report import ReportContext, write_report

if TYPE_CHECKING:
    from node.service import NodeService

MAX_EVALS_LIMIT = 2000


class ExplainMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str = Field(max_length=20_000)


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ExplainMessage] | None = None
    prompt: str | None = None
    response: str | None = None
    max_tokens: int = Field(default=8, ge=1, le=256)
    max_evals: int = Field(default=200, ge=10, le=MAX_EVALS_LIMIT)


def _messages(req: ExplainRequest) -> list[dict[str, str]]:
    if req.messages:
        msgs = [m.model_dump() for m in req.messages]
    elif req.prompt is not None:
        msgs = [{"role": "user", "content": req.prompt}]
    else:
        raise ValueError("give `messages` or `prompt`")
    if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        raise ValueError("the last message must be a non-empty user message")
    return msgs


def explain(service: NodeService, req: ExplainRequest, *, requested_by: str) -> dict[str, Any]:
    host = service.host
    msgs = _messages(req)
    name = host.resolve(req.model)
    served = host.model_name if name == "base" else name
    info = host.adapters.get(name)
    if req.response is None:
        gen = host.generate(msgs, model=name, max_tokens=req.max_tokens)
        response_ids = gen.output_ids
    else:
        response_ids = host.tokenizer(req.response, add_special_tokens=False).input_ids
    if not response_ids:
        raise ValueError("the response to explain is empty")
    response_text = host.tokenizer.decode(response_ids, skip_special_tokens=True)
    prefix, question = msgs[:-1], msgs[-1]["content"]

    def score(texts: Sequence[str]) -> np.ndarray:
        prompts = [[*prefix, {"role": "user", "content": t}] for t in texts]
        return host.response_logprobs(prompts, response_ids, model=name)

    started = time.perf_counter()
    output_tokens = [host.tokenizer.decode([t]) for t in response_ids]
    attribution = explain_text(score, host.tokenizer, question, output_tokens=output_tokens, max_evals=req.max_evals)
    explanation_id = f"expl-{uuid.uuid4().hex[:16]}"
    record = service.audit.append(
        actor=requested_by,
        action="explain",
        resource=served,
        details={
            "explanation_id": explanation_id,
            "adapter_sha256": info.sha256 if info else None,
            "prompt_sha256": _sha(json.dumps(msgs, sort_keys=True)),
            "response_sha256": _sha(response_text),
            "max_evals": req.max_evals,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    out_dir = service.reports_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = ReportContext(
        model=host.model_name,
        adapter_version=served,
        adapter_sha256=info.sha256 if info else "",
        requested_by=requested_by,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        audit_record=f"{record.seq}:{record.hash}",
        response=response_text,
    )
    html = write_report(
        attribution, ctx, html_path=out_dir / f"{explanation_id}.html", png_path=out_dir / f"{explanation_id}.png"
    )
    return {
        "id": explanation_id,
        "object": "explanation",
        "model": served,
        "adapter_sha256": ctx.adapter_sha256,
        "response": response_text,
        "audit_record": {"seq": record.seq, "hash": record.hash},
        "attribution": attribution.to_json(),
        "top_tokens": [tok for tok, _ in attribution.top_features(5)],
        "html": str(html),
    }


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
