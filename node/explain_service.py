"""Explanations at the site: SHAP attributions of an answer to the features of its prompt.

The scorer teacher-forces the fixed answer under each masked prompt and gathers only the
answer tokens' log-probs (never full-vocabulary logits on the host). The explanation is
bound to the adapter version and its sha256, and recorded in the audit trail first, so the
report can cite its audit record. Nothing leaves the site: the result, its HTML report and
plot are stored as ``<reports_dir>/<id>.{json,html,png}.sealed`` and served back by id to
reviewers (`GET /v1/explanations/{id}`, `.../report.html`, `.../plot.png`).

Direct identifiers (names, record and phone numbers: `privacy.redact`) are redacted from the
prompt and the response before anything is explained or stored: the attribution is of the
redacted text, and the audit record counts what was redacted. The prompt HMAC is of the text
as sent, so it still matches the request's `serve` record.

An explanation quotes its prompt token by token (a patient's age, sex, postcode), and the
reviewer API must return it later, so the files are encrypted at rest, AES-256-GCM under the
site's key (node/site_keys.py), each bound to its id and kind; the audit trail holds only
HMACs of the prompt and response under the site's other key, never a plain hash.

A contrastive request (`contrast`: "why this response rather than that one?") explains
`log p(response) - log p(contrast)` instead, one game, so its attributions sum to that difference's
change (explain/contrast.py). Every explanation also carries its faithfulness checks: deletion and
insertion curves and comprehensiveness/sufficiency at the top features, scored with the same scorer
(explain/faithfulness.py). The report names the adapter's lineage (the contributing sites and each
one's epsilon) from what the deployment carried (`adapter.json`, node/adapter_store.py).

A request is validated completely before any model call, so a refusal writes nothing: no
report, no JSON, no audit record. Background jobs run one at a time on a worker thread
(the model lock serialises them anyway) and are polled by id.
"""

from __future__ import annotations

import copy
import json
import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explain.attribution import Attribution, Method, count_features, explain_text, prompt_masker, resolve_method
from explain.contrast import Contrast, explain_contrast
from explain.faithfulness import measure_faithfulness, preference_of, probability_of
from explain.granularity import Granularity, feature_labels
from explain.report import AdapterLineage, ReportContext, render_report, summary_text
from federation.errors import Busy, NotFound
from federation.ops.atomic import write_atomic
from node import adapter_store
from node.site_keys import SiteKeys
from privacy.redact import redact, redact_text

if TYPE_CHECKING:
    from node.service import NodeService

MAX_EVALS_LIMIT = 2000
"""Site policy: the most model evaluations one explanation may spend."""
MIN_EVALS = 10
MAX_QUEUED = 8
"""Background jobs waiting beyond this are refused (429) rather than queued for hours."""
TOP_K = 5
SCORE_BATCH = 256
"""Masked prompts per scoring call. The engine packs a call's prompts into as few forwards as its
token budget allows and keeps the shared prefix's KV cache between calls, so larger calls cost
no more; progress (background jobs) advances once per call."""

_ID = re.compile(r"expl-[0-9a-f]{32}")
Kind = Literal["json", "html", "png"]
Progress = Callable[[int, int], None]


class ExplanationNotFound(NotFound):
    """No explanation with this id at this site."""

    default_code = "explanation_not_found"


class QueueFull(Busy):
    """Too many background explanations are waiting; try again later."""

    default_code = "explanation_queue_full"


class ExplainMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20_000)


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ExplainMessage] | None = Field(default=None, max_length=256)
    prompt: str | None = Field(default=None, max_length=20_000)
    response: str | None = None
    # "why `response` rather than this?": attributions of log p(response) - log p(contrast)
    contrast: str | None = Field(default=None, max_length=20_000)
    granularity: Granularity = "word"  # what a reviewer reads; "token" shows the model's word pieces
    method: Method = "auto"
    max_tokens: int = Field(default=8, ge=1, le=256)
    # No schema bound: the site's limit is policy, checked in code so the message names it. 500: on the demo's
    # pretrained model KernelSHAP at 200 ranked 26-32 words at Spearman 0.41-0.80 against a high-sample
    # reference, at 500 0.56-0.96 (tests/explain/test_kernelshap_agreement.py); the GPU benchmark times 500.
    max_evals: int = 500
    background: bool = False


@dataclass(frozen=True)
class ExplainJob:
    """A request that passed every check, bound to the adapter it will run on."""

    id: str
    messages: list[dict[str, str]]
    adapter: str
    served: str
    adapter_sha256: str
    response_ids: list[int] | None
    max_tokens: int
    max_evals: int
    granularity: Granularity
    method: Method
    requested_by: str
    prompt_hmac: str  # of the messages as sent, under the site's key (node/site_keys.py)
    redacted: dict[str, int]  # direct identifiers taken out of the messages and response, by kind
    response_hmac: str | None  # of the response to explain as sent; None: the model's answer, digested when made
    contrast_ids: list[int] | None = None  # the alternative response of a contrastive question (redacted)
    contrast_hmac: str | None = None  # of the contrast as sent


class Explanations:
    """Validates, runs, stores and serves one node's explanations."""

    def __init__(self, service: NodeService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}  # running or failed; completed ones are on disk
        self._queue: queue.Queue[ExplainJob] = queue.Queue(maxsize=MAX_QUEUED)
        self._worker: threading.Thread | None = None
        self.keys: SiteKeys = service.serving.keys

    @property
    def reports_dir(self) -> Path:
        return self.service.layout.explanations

    # ---- validation ---------------------------------------------------------------------
    def validate(self, req: ExplainRequest, *, requested_by: str) -> ExplainJob:
        """Every check that needs no model call; raises UnknownModel or ValueError."""
        host = self.service.host
        sent = _messages(req)
        msgs, redacted = _redacted(sent)
        if req.max_evals > MAX_EVALS_LIMIT:
            raise ValueError(
                f"max_evals {req.max_evals} is over this site's limit of {MAX_EVALS_LIMIT} model evaluations "
                "(MAX_EVALS_LIMIT); ask for fewer"
            )
        if req.max_evals < MIN_EVALS:
            raise ValueError(f"max_evals {req.max_evals} is too small: SHAP needs at least {MIN_EVALS} evaluations")
        adapter = host.resolve(self.service.stable_model(req.model))  # the default: the stable version
        info = host.adapters.get(adapter)
        response_ids = None
        if req.response is not None:
            response = redact(req.response)
            redacted.update(response.counts)
            response_ids = [int(t) for t in host.tokenizer(response.text, add_special_tokens=False).input_ids]
            if not response_ids:
                raise ValueError("the response to explain is empty")
        contrast_ids = None
        if req.contrast is not None:
            foil = redact(req.contrast)
            redacted.update(foil.counts)
            contrast_ids = [int(t) for t in host.tokenizer(foil.text, add_special_tokens=False).input_ids]
            if not contrast_ids:
                raise ValueError("the contrast response is empty: name the alternative to compare with")
            if contrast_ids == response_ids:
                raise ValueError("the contrast is the same text as the response: nothing to contrast")
        n_features = count_features(host.tokenizer, msgs[-1]["content"], granularity=req.granularity)
        resolve_method(req.method, n_features=n_features, max_evals=req.max_evals)
        prompt_tokens = len(host.prompt_ids(msgs))
        answer_tokens = len(response_ids) if response_ids is not None else req.max_tokens
        answer_tokens = max(answer_tokens, len(contrast_ids or []))
        if prompt_tokens + answer_tokens > host.context_length:
            raise ValueError(
                f"prompt of {prompt_tokens} tokens plus a response of {answer_tokens} tokens "
                f"exceeds the model's context of {host.context_length} tokens"
            )
        return ExplainJob(
            id=f"expl-{uuid.uuid4().hex}",
            messages=msgs,
            adapter=adapter,
            served=host.model_name if info is None else adapter,
            adapter_sha256=info.sha256 if info else "",
            response_ids=response_ids,
            max_tokens=req.max_tokens,
            max_evals=req.max_evals,
            granularity=req.granularity,
            method=req.method,
            requested_by=requested_by,
            prompt_hmac=self.keys.digest(json.dumps(sent, sort_keys=True)),
            redacted=dict(redacted),
            response_hmac=None if req.response is None else self.keys.digest(req.response),
            contrast_ids=contrast_ids,
            contrast_hmac=None if req.contrast is None else self.keys.digest(req.contrast),
        )

    # ---- running ------------------------------------------------------------------------
    def run(self, job: ExplainJob, *, progress: Progress | None = None) -> dict[str, Any]:
        """Explain now; a failure after validation is itself audited, then re-raised."""
        started = time.perf_counter()
        try:
            return self._run(job, progress=progress, started=started)
        except Exception as exc:
            self.service.audit.append(
                actor=job.requested_by,
                action="explain.failed",
                resource=job.served,
                details={
                    "explanation_id": job.id,
                    "prompt_hmac": job.prompt_hmac,
                    "error": type(exc).__name__,  # the message may quote the prompt
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
            raise

    def _run(self, job: ExplainJob, *, progress: Progress | None, started: float) -> dict[str, Any]:
        host = self.service.host
        response_ids = job.response_ids
        if response_ids is None:
            response_ids = host.generate(job.messages, model=job.adapter, max_tokens=job.max_tokens).output_ids
            if not response_ids:
                raise ValueError("the model's answer is empty: nothing to explain")
        response_text = host.tokenizer.decode(response_ids, skip_special_tokens=True)
        response_hmac = job.response_hmac or self.keys.digest(response_text)  # before redaction, as `serve` has it
        redacted = Counter(job.redacted)
        generated = redact(response_text)
        if generated.counts:  # explain (and store) the redacted answer, never the identifier
            redacted.update(generated.counts)
            response_text = generated.text
            response_ids = [int(t) for t in host.tokenizer(response_text, add_special_tokens=False).input_ids]
        prefix, question = job.messages[:-1], job.messages[-1]["content"]

        def scorer(ids: list[int]) -> Callable[[Sequence[str]], np.ndarray]:
            def score(texts: Sequence[str]) -> np.ndarray:
                prompts = [[*prefix, {"role": "user", "content": t}] for t in texts]
                return host.response_logprobs(prompts, ids, model=job.adapter)

            return score

        contrast: Contrast | None = None
        if job.contrast_ids is None:
            attribution = explain_text(
                scorer(response_ids),
                host.tokenizer,
                question,
                output_tokens=[host.tokenizer.decode([t]) for t in response_ids],
                max_evals=job.max_evals,
                batch_size=SCORE_BATCH,
                progress=progress,
                granularity=job.granularity,
                method=job.method,
            )
            single = scorer(response_ids)

            def total(texts: Sequence[str]) -> np.ndarray:
                return np.asarray(single(texts), dtype=np.float64).sum(axis=1)

            quantity = f"p({response_text.strip()!r})"
            to_probability: Callable[[np.ndarray], np.ndarray] = probability_of
        else:
            foil_text = host.tokenizer.decode(job.contrast_ids, skip_special_tokens=True)
            attribution, contrast, difference = explain_contrast(
                scorer(response_ids),
                scorer(job.contrast_ids),
                host.tokenizer,
                question,
                response=response_text,
                foil=foil_text,
                max_evals=job.max_evals,
                batch_size=SCORE_BATCH,
                progress=progress,
                granularity=job.granularity,
                method=job.method,
            )

            def total(texts: Sequence[str]) -> np.ndarray:
                return np.asarray(difference(texts), dtype=np.float64).reshape(-1)

            quantity = f"p({response_text.strip()!r} | it or {foil_text.strip()!r})"
            to_probability = preference_of
        # The same scorer and masking as the attribution, so the curves test the claim it makes.
        faithfulness = measure_faithfulness(
            total,
            prompt_masker(host.tokenizer, question, granularity=job.granularity),
            attribution.total,
            quantity=quantity,
            to_probability=to_probability,
            top_k=TOP_K,
            batch_size=SCORE_BATCH,
        )
        lineage = self._lineage(job)
        record = self.service.audit.append(
            actor=job.requested_by,
            action="explain",
            resource=job.served,
            details={
                "explanation_id": job.id,
                "adapter_sha256": job.adapter_sha256 or None,
                "prompt_hmac": job.prompt_hmac,
                "response_hmac": response_hmac,
                "contrast_hmac": job.contrast_hmac,
                "response_source": "generated" if job.response_ids is None else "supplied",
                "redacted": dict(redacted),
                "granularity": job.granularity,
                "method": attribution.method,
                "max_evals": job.max_evals,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        self.reports_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ctx = ReportContext(
            model=host.model_name,
            adapter_version=job.served,
            adapter_sha256=job.adapter_sha256,
            requested_by=job.requested_by,
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            audit_record=f"{record.seq}:{record.hash}",
            response=response_text,
            granularity=job.granularity,
            response_source="generated" if job.response_ids is None else "supplied",
            lineage=lineage,
        )
        report = render_report(attribution, ctx, faithfulness=faithfulness, contrast=contrast)
        result = {
            "id": job.id,
            "object": "explanation",
            "status": "completed",
            "created_at": ctx.created_at,
            "model": job.served,
            "adapter_sha256": job.adapter_sha256,
            "granularity": job.granularity,
            "max_evals": job.max_evals,
            "response": response_text,
            "response_source": ctx.response_source,
            "summary": summary_text(attribution, ctx, contrast=contrast),
            **attribution.to_json(),
            **_top_json(attribution, job.granularity),
            "probabilities": _probabilities(attribution, contrast),
            "contrast": None if contrast is None else contrast.to_json(),
            "faithfulness": faithfulness.to_json(),
            "lineage": None if lineage is None else lineage.to_json(),
            "audit_record": {"seq": record.seq, "hash": record.hash},
            # the report and plot, for reviewers, from this API (the files at the site are sealed)
            "html": f"/v1/explanations/{job.id}/report.html",
            "png": f"/v1/explanations/{job.id}/plot.png",
        }
        if report.png is not None:
            self._store(job.id, "png", report.png)
        self._store(job.id, "html", report.html.encode("utf-8"))
        self._store(job.id, "json", json.dumps(result).encode("utf-8"))  # last: its presence means done
        return result

    def _lineage(self, job: ExplainJob) -> AdapterLineage | None:
        """What the deployment said of this adapter (registry lineage), or None (base model, older deploy)."""
        if not job.adapter_sha256:
            return None
        data = adapter_store.read_lineage(self.service.layout.adapters, job.adapter)
        if data is None:  # the report says so, and still names the version and its sha256
            return None
        return AdapterLineage.from_json({**data, "version": job.served, "sha256": job.adapter_sha256})

    # ---- background jobs ----------------------------------------------------------------
    def submit(self, job: ExplainJob) -> dict[str, Any]:
        """Queue ``job`` for the worker thread; returns its running state (the 202 body)."""
        state = _state(job.id, status="running", progress={"done": 0, "total": job.max_evals})
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"{MAX_QUEUED} explanations are already waiting at this site; retry later") from None
            self._pending[job.id] = state
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="explain-worker", daemon=True)
                self._worker.start()
            return dict(state)

    def _work(self) -> None:
        while True:
            job = self._queue.get()

            def progress(done: int, total: int, job_id: str = job.id) -> None:
                with self._lock:
                    self._pending[job_id]["progress"] = {"done": done, "total": total}

            try:
                self.run(job, progress=progress)
            except Exception as exc:
                with self._lock:
                    self._pending[job.id] = _state(
                        job.id, status="failed", error=redact_text(str(exc)) or type(exc).__name__
                    )
            else:
                with self._lock:
                    del self._pending[job.id]  # the stored JSON answers from now on

    # ---- reading ------------------------------------------------------------------------
    def get(self, explanation_id: str) -> dict[str, Any]:
        """The stored result, or the state of a job still running or failed."""
        _check_id(explanation_id)
        with self._lock:
            pending = self._pending.get(explanation_id)
            if pending is not None:
                return copy.deepcopy(pending)  # the worker keeps updating the original
        data: dict[str, Any] = json.loads(self._load(explanation_id, "json"))
        return data

    def report(self, explanation_id: str, kind: Literal["html", "png"]) -> bytes:
        """A completed explanation's HTML report or plot, opened for a reviewer."""
        _check_id(explanation_id)
        return self._load(explanation_id, kind)

    # ---- sealed files -------------------------------------------------------------------
    def _path(self, explanation_id: str, kind: Kind) -> Path:
        return self.reports_dir / f"{explanation_id}.{kind}.sealed"

    def _store(self, explanation_id: str, kind: Kind, data: bytes) -> None:
        sealed = self.keys.seal(data, label=f"{explanation_id}/{kind}")
        write_atomic(self._path(explanation_id, kind), sealed, mode=0o600)

    def _load(self, explanation_id: str, kind: Kind) -> bytes:
        try:
            blob = self._path(explanation_id, kind).read_bytes()
        except FileNotFoundError:
            raise ExplanationNotFound(f"no explanation {explanation_id!r} at this site") from None
        return self.keys.unseal(blob, label=f"{explanation_id}/{kind}")


def _check_id(explanation_id: str) -> None:
    if not _ID.fullmatch(explanation_id):  # also keeps ids from naming paths
        raise ExplanationNotFound(f"no explanation {explanation_id!r} at this site")


def _state(explanation_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": explanation_id, "object": "explanation", **fields}


def _messages(req: ExplainRequest) -> list[dict[str, str]]:
    if req.messages and req.prompt is not None:
        raise ValueError("give `messages` or `prompt`, not both")
    if req.messages:
        msgs = [m.model_dump() for m in req.messages]
    elif req.prompt is not None:
        msgs = [{"role": "user", "content": req.prompt}]
    else:
        raise ValueError("give `messages` or `prompt`")
    if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        raise ValueError("the prompt is empty: the last message must be a non-empty user message")
    return msgs


def _top_json(attribution: Attribution, granularity: Granularity) -> dict[str, Any]:
    """The top features by |attribution|, each with its position (repeated words told apart)."""
    labels = feature_labels(attribution.features, granularity)
    total = attribution.total
    order = sorted(range(len(total)), key=lambda i: -abs(float(total[i])))
    top = [i for i in order if attribution.features[i].strip()][:TOP_K]
    return {
        "top_tokens": [attribution.features[i].strip() for i in top],
        "top_features": [
            {"feature": attribution.features[i].strip(), "value": float(total[i]), "index": i, "label": labels[i]}
            for i in top
        ],
    }


def _probabilities(attribution: Attribution, contrast: Contrast | None) -> dict[str, float]:
    """The explained response's probability with the prompt and with it fully masked (and the contrast's)."""
    if contrast is None:
        full, masked = float(attribution.full_values.sum()), float(attribution.base_values.sum())
        return {"response": float(np.exp(min(full, 0.0))), "response_masked": float(np.exp(min(masked, 0.0)))}
    return {
        "response": float(np.exp(min(contrast.response_logprob, 0.0))),
        "response_masked": float(np.exp(min(contrast.response_logprob_masked, 0.0))),
        "contrast": float(np.exp(min(contrast.foil_logprob, 0.0))),
        "contrast_masked": float(np.exp(min(contrast.foil_logprob_masked, 0.0))),
    }


def _redacted(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], Counter[str]]:
    """The messages with direct identifiers redacted, and how many of each kind."""
    counts: Counter[str] = Counter()
    out = []
    for message in messages:
        result = redact(message["content"])
        counts.update(result.counts)
        out.append({**message, "content": result.text})
    return out, counts
