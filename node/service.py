"""The node agent's behaviour: serving, training, deploying, all audited.

Everything the HTTP layer (node/api/) does goes through `NodeService` (or its `Serving`),
so the same logic is tested without sockets and every model call lands in the audit trail.
A `NodeService` is handed its parts (`NodeParts`) already built: `node/build.py` builds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import math
import threading
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch

from federation.errors import Conflict, FedSeekError, Unavailable
from federation.ops.layout import NodeLayout
from federation.protocol import wire
from federation.protocol.config import NodeConfig
from federation.protocol.names import LATEST_ALIAS, InvalidNameError
from federation.protocol.round_settings import TrainInstruction
from federation.protocol.versions import highest_global_version
from node import adapter_store
from node.data import TokenizedExample, collate
from node.engine import BASE, TRAIN_ADAPTER, Generation, ModelHost
from node.metrics import ServingMetrics
from node.release import Release
from node.serving import (
    Engine,
    Event,
    FastRunner,
    HFRunner,
    QueueFull,
    Runner,
    SamplingParams,
    UnknownAdapter,
    lora_from_peft,
    make_runner,
    supports,
)
from node.site_keys import SiteKeys
from node.trainer import (
    RoundResult,
    TrainingError,
    TrainSettings,
    evaluate_loss,
    per_sample_loss,
    plan_round,
    start_arrays,
    train_round,
    with_seeded_lora_a,
)
from node.upstream import VllmBackend, open_backend
from node.witness_statements import node_key_path, round_statements
from privacy.audit import AuditError, AuditRecord, AuditTrail
from privacy.ledger import ROUND, LedgerError, PrivacyLedger

TRAIN_YIELD_S = 0.05
"""How long a training round waits, after each DP step, while requests are in flight (see Serving)."""


@dataclass
class NodeState:
    eval_loss_before: float
    eval_loss_after: dict[str, float] = field(default_factory=dict)
    rounds_trained: int = 0


class AlreadyCharged(Conflict):
    """A train or readiness request for a (run, round) this site's ledger has charged already (409)."""

    default_code = "round_already_charged"


class VersionReused(Conflict):
    """A deployment names an installed version with other weights (409): numbers are never reused."""

    default_code = "version_reused"


class Loading(Unavailable):
    """The model is still loading (the HTTP layer answers 503)."""

    default_code = "model_loading"


@dataclass(frozen=True)
class Prepared:
    """A request resolved before it is queued: token ids, the engine's adapter, the model id to report."""

    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    served: str
    prompt_hmac: str  # HMAC-SHA256 under the site's key: a plain hash of clinical text is a dictionary away from it


def _sampling_record(params: SamplingParams) -> dict[str, Any]:
    """How a request sampled, for its audit record; a response format by kind and digest (a schema can
    be long, and its text is the caller's)."""
    out = asdict(replace(params, constraint=None))
    if (c := params.constraint) is not None:
        out["constraint"] = {"kind": c.kind, "sha256": hashlib.sha256(c.spec.encode()).hexdigest()}
    return out


def serving_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same model as new module objects over the very same parameter and buffer tensors.

    A DP round patches forwards, registers hooks and flips train/eval on the host's peft model for
    its whole length; serving through its own module tree is untouched by that, so it runs
    concurrently with training while holding no second copy of the weights.
    """
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    served: torch.nn.Module = copy.deepcopy(model, memo)
    return served.eval()


class NoLocalEngine(Unavailable):
    """The node serves through the site's vLLM (`serving_backend: "vllm"`) and runs no engine of its own."""


class Serving:
    """The OpenAI serving side of a node: one continuous-batching `Engine` over the host's model.

    Qwen2/Llama models get the fast runner (its own forward over the shared weights, adapters in
    its LoRA bank), DeepSeek-V2/V3 its MLA + MoE subclass; any other model the generic runner over
    `serving_copy` of the peft model. Either way serving never takes `host.lock`, which a training
    round holds from start to end: see "Serving" in docs/ARCHITECTURE.md. Every request is audited when it ends.

    With `local_engine=False` (a node that serves through vLLM) no runner or engine is built: no KV cache,
    no CUDA graphs, no engine thread on a GPU that vLLM may share. What needs no engine stays: model
    resolution and the gray release, `/v1/models`, the site's keyed digests. `engine` then raises NoLocalEngine.
    """

    def __init__(
        self,
        host: ModelHost,
        audit: AuditTrail,
        *,
        owner: str,
        max_slots: int = 8,
        max_queue: int = 64,
        max_model_len: int = 4096,
        max_adapters: int = 8,
        keys: SiteKeys | None = None,
        local_engine: bool = True,
    ) -> None:
        self.host = host
        self.audit = audit
        self.owner = owner
        # Prompts reach the audit trail only as an HMAC under the site's key (node/site_keys.py).
        self.keys = keys if keys is not None else SiteKeys.ephemeral()
        self.max_adapters = max_adapters
        max_len = min(max_model_len, host.context_length)
        self._fast = supports(host.peft)
        self._engine: Engine | None = None
        self._metrics: ServingMetrics | None = None
        self._loaded: dict[str, str] = {}  # adapter version -> sha256 the runner serves
        self.release: Release | None = None
        """The site's gray release (node/release.py), set by `NodeService`: which version default traffic
        gets, and each version's request and error counts. None (`fedseek serve`): the newest version."""
        if not local_engine:
            return
        with host.lock:
            self.runner: Runner = (
                make_runner(host.peft, max_slots=max_slots, max_len=max_len, max_adapters=max_adapters)
                if self._fast
                else HFRunner(serving_copy(host.peft), max_slots=max_slots, max_len=max_len)
            )
        self._engine = Engine(self.runner, host.tokenizer, max_queue=max_queue).start()
        self._metrics = ServingMetrics(self._engine, model_name=host.model_name, max_lora=max_adapters)
        self.sync_adapters()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NoLocalEngine("this node serves through the site's vLLM and runs no engine of its own")
        return self._engine

    @property
    def metrics(self) -> ServingMetrics:
        """The engine's metrics under vLLM's names (NoLocalEngine without an engine: vLLM publishes its own)."""
        if self._metrics is None:
            raise NoLocalEngine("this node serves through the site's vLLM: its metrics are on vLLM's /metrics")
        return self._metrics

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()

    # ---- adapters -----------------------------------------------------------------------
    def sync_adapters(self) -> None:
        """Serve what the host has installed (call after every `ModelHost.install`); without an engine,
        nothing to do (vLLM's copies follow the release: node/upstream/vllm.py)."""
        if self._engine is None:
            return
        with self.host.lock:
            wanted = {v: a.sha256 for v, a in self.host.adapters.items()}
            if wanted == self._loaded:
                return
            if self._fast:
                keep = list(wanted)[-self.max_adapters :]  # the bank is bounded: the newest versions stay
                fresh = {v: lora_from_peft(self.host.peft, v) for v in keep if self._loaded.get(v) != wanted[v]}
            else:
                model = serving_copy(self.host.peft)
        if self._fast:
            self.engine.call(lambda: self._load_fast(keep, fresh))
            self._loaded = {v: wanted[v] for v in keep}
        else:
            self.engine.call(lambda: setattr(self.runner, "model", model))  # between two engine steps
            self._loaded = wanted

    def _load_fast(self, keep: list[str], fresh: dict[str, Any]) -> None:
        runner = self.runner
        assert isinstance(runner, FastRunner)
        runner.sync_adapters(keep, fresh)  # also captures the new live set's decode graphs

    # ---- requests -----------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        """The base model and every version; under gray release each with its `status` (stable,
        candidate or retired) and `share` of default traffic."""
        base = {"id": self.host.model_name, "object": "model", "created": 0, "owned_by": self.owner, "parent": None}
        versions = [
            {
                "id": a.version,
                "object": "model",
                "created": a.created,
                "owned_by": "consortium",
                "parent": a.parent or self.host.model_name,
                "sha256": a.sha256,
            }
            for a in self.host.adapters.values()
        ]
        if self.release is not None:
            for card, version in zip([base, *versions], [None, *self.host.adapters], strict=True):
                card["status"], card["share"] = self.release.status_of(version), self.release.share_of(version)
        return [base, *versions]

    def prepare(self, prompt: list[dict[str, str]] | str | list[int], model: str | None) -> Prepared:
        """Chat messages, text or token ids; raises UnknownModel for a model not served here.

        Default traffic (no model, or `latest`) goes where the gray release routes it: the stable
        version, or the candidate for its share (node/release.py)."""
        if self.release is not None and model in (None, "", LATEST_ALIAS):
            model = self.release.route() or BASE
        name = self.host.resolve(model)
        if isinstance(prompt, str):
            ids = [int(i) for i in self.host.tokenizer(prompt, add_special_tokens=True).input_ids]
        elif prompt and isinstance(prompt[0], dict):
            ids = self.host.prompt_ids(prompt)  # type: ignore[arg-type]
        else:
            ids = [int(i) for i in prompt]  # type: ignore[arg-type]
            vocab = int(getattr(self.host.peft.get_base_model().config, "vocab_size", 0)) or 2**31
            if any(not 0 <= i < vocab for i in ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")  # else one bad row fails the batch
        served = self.host.model_name if name == BASE else name
        digest = self.keys.digest(json.dumps(prompt, sort_keys=True))
        return Prepared(ids, None if name == BASE else name, served, digest)

    async def generate(
        self, prep: Prepared, params: SamplingParams, *, actor: str, receipt: dict[str, str] | None = None
    ) -> AsyncGenerator[Event, None]:
        """The request's events, audited at the end (`receipt["audit_hash"]` then holds the record's hash).

        The first `anext` queues it, so QueueFull, ValueError (too long for the context) and
        UnknownAdapter come before any output; closing it early cancels the request at once. A
        response format is compiled first, off the event loop (GrammarError: 400, GrammarBusy: 429).
        """
        if params.constraint is not None:  # compiled in the grammar's own process; a cache hit after the first
            await asyncio.wrap_future(self.engine.grammars.submit(params.constraint))
        track = self.metrics.request(prep.adapter)
        stream = cast(AsyncGenerator[Event, None], self.engine.astream(prep.prompt_ids, params, adapter=prep.adapter))
        last: Event | None = None
        refused = False
        failed = True  # until the stream ends without an exception
        pieces: list[str] = []  # the output, for its keyed digest in the audit record
        try:
            async for ev in stream:
                track.event(ev)
                last = ev
                pieces.append(ev.text)
                yield ev
            failed = False
        except (QueueFull, ValueError, UnknownAdapter):
            refused = last is None  # refused by `submit`: nothing ran
            raise
        except (GeneratorExit, asyncio.CancelledError):  # the client went away: not the model's failure
            failed = False
            raise
        finally:
            await stream.aclose()  # no await inside: the engine's cancel runs even in a cancelled task
            track.done(not refused)
            if self.release is not None and not refused:  # the release judges a candidate by its error rate
                self.release.served(prep.adapter, ok=not failed and (last is None or last.finish_reason != "error"))
            if not refused:
                tokens = last.completion_tokens if last else 0
                rec = self._audit(prep, params, actor, tokens, last, track.elapsed(), output="".join(pieces))
                if receipt is not None:
                    receipt["audit_hash"] = rec.hash

    def complete(self, prep: Prepared, params: SamplingParams, *, actor: str) -> tuple[Generation, str]:
        """Blocking: run to the end; returns the generation and its audit record hash."""
        started = time.perf_counter()
        try:
            out = self.engine.complete(prep.prompt_ids, params, adapter=prep.adapter)
        except (QueueFull, ValueError, UnknownAdapter):
            raise  # refused before anything ran
        except Exception:
            if self.release is not None:
                self.release.served(prep.adapter, ok=False)
            raise
        if self.release is not None:
            self.release.served(prep.adapter, ok=out.finish_reason != "error")
        gen = Generation(out.text, out.prompt_tokens, out.completion_tokens, out.finish_reason, out.token_ids)
        self.metrics.completed(out)
        elapsed = time.perf_counter() - started
        rec = self._audit(prep, params, actor, out.completion_tokens, out.finish_reason, elapsed, output=out.text)
        return gen, rec.hash

    def _audit(
        self,
        prep: Prepared,
        params: SamplingParams,
        actor: str,
        completion_tokens: int,
        finish: Event | str | None,
        latency_s: float,
        *,
        output: str,
    ) -> AuditRecord:
        """One `serve` record per request, cancelled ones too (the model ran): which adapter (by sha256),
        how it sampled, and the prompt and output only as digests keyed by the site's secret."""
        if isinstance(finish, Event) or finish is None:
            finish = finish.finish_reason if finish is not None else None
        adapter = self.host.adapters.get(prep.adapter) if prep.adapter is not None else None
        return self.audit.append(
            actor=actor,
            action="serve",
            resource=prep.served,
            details={
                "prompt_hmac": prep.prompt_hmac,
                "response_hmac": self.keys.digest(output),
                "adapter_sha256": adapter.sha256 if adapter is not None else None,
                "sampling": _sampling_record(params),
                "prompt_tokens": len(prep.prompt_ids),
                "completion_tokens": completion_tokens,
                "finish_reason": finish or "cancelled",
                "latency_s": round(latency_s, 4),
            },
        )

    def yield_to_requests(self, max_wait_s: float) -> float:
        """Between two training steps: wait while requests are in flight, at most `max_wait_s` (not at all
        without an engine: vLLM's requests run on its own GPUs)."""
        start = time.perf_counter()
        while self._engine is not None and time.perf_counter() - start < max_wait_s:
            stats = self._engine.stats()
            if not (stats["running"] or stats["waiting"]):
                break
            time.sleep(0.002)
        return time.perf_counter() - start


@dataclass(frozen=True)
class NodeParts:
    """What a `NodeService` runs on, built and checked by `node.build` (the policy already enforced)."""

    config: NodeConfig
    layout: NodeLayout
    host: ModelHost  # with the adapters deployed before a restart installed
    serving: Serving
    audit: AuditTrail
    ledger: PrivacyLedger
    agent_token: str
    train: Sequence[TokenizedExample]
    """A `node.data.SiteData` (records by data partition) when built from a data directory."""
    eval_data: list[TokenizedExample]
    training_refusal: FedSeekError | None = None
    """Why, found at start-up, the node serves but never trains: its ledger disagrees with the audit trail
    (`privacy.consistency.LedgerMismatch`) or its data cannot be made k-anonymous (`KAnonymityRefused`,
    node/minimise.py). Every round and readiness query is refused with it, its own status and code."""


class NodeService:
    """What a site runs: one loaded model serving, training and explaining, all audited."""

    def __init__(self, parts: NodeParts) -> None:
        self.config = parts.config
        self.layout = parts.layout
        self.host = parts.host
        self.serving = parts.serving
        self.audit = parts.audit
        self.ledger = parts.ledger
        self.token = parts.agent_token
        self.train_data = parts.train
        self.eval_data = parts.eval_data
        self.training_refusal = parts.training_refusal
        self.node_key = node_key_path(Path(self.config.pki_dir), self.config.name)  # signs the ledger heads
        self.state = NodeState(eval_loss_before=evaluate_loss(self.host, self.eval_data, model="base"))
        self.train_lock = threading.Lock()
        self.release = Release(  # which deployed version default traffic gets (gray release)
            adapter_store.release_path(self.layout.adapters),
            audit=self.audit,
            base_eval_loss=self.state.eval_loss_before,
            installed=list(self.host.adapters),
        )
        self.serving.release = self.release
        # Serving through the site's vLLM (`serving_backend: "vllm"`): the OpenAI routes forward to it
        # (node/api/upstream.py) and it holds the versions the release routes to (node/upstream/vllm.py).
        self.upstream: VllmBackend | None = open_backend(
            self.config, host=self.host, release=self.release, audit=self.audit, state_dir=self.layout.root
        )

    # ---- serving ------------------------------------------------------------------
    def chat(
        self, messages: list[dict[str, str]], *, model: str | None, actor: str, **kwargs: Any
    ) -> tuple[Generation, str, str]:
        """Generate a reply (blocking); returns (generation, served model id, audit record hash)."""
        prep = self.serving.prepare(messages, model)
        gen, audit_hash = self.serving.complete(prep, SamplingParams(**kwargs), actor=actor)
        return gen, prep.served, audit_hash

    def models(self) -> list[dict[str, Any]]:
        return self.serving.models()

    def stable_model(self, model: str | None) -> str | None:
        """`model`, or for the default (none, or `latest`) the stable version (`base` while none is): what
        one-off work such as an explanation uses, never the candidate's random share (node/release.py)."""
        if model in (None, "", LATEST_ALIAS):
            return self.release.stable or BASE
        return model

    # ---- federation ---------------------------------------------------------------
    def train(self, global_arrays: wire.Arrays | None, config: Mapping[str, object]) -> RoundResult:
        """Train one round as a train message's `config` (TrainInstruction keys) asks.

        An unknown key or a wrong type is refused (RoundSettingsError, a 400) before anything is
        charged or audited: a typo must not train with a default instead.
        """
        instruction = TrainInstruction.from_config_record(config)
        run_id = instruction.ledger_run  # the run's key across a resume, else Flower's run id (the ClientApp's)
        server_round = instruction.server_round
        rounds = instruction.run.num_rounds
        settings = TrainSettings.of(instruction, secure_mode=self.config.secure_mode)
        with self.train_lock:
            try:
                self.check_may_train()
                self.check_not_charged(run_id, server_round)  # a resumed run never charges a round twice
                global_arrays = start_arrays(self.host, global_arrays, settings)  # FFA: B-only gets our A
                self._check_finite_start(global_arrays, settings.batch_size)
                result = train_round(
                    self.host,
                    self.ledger,
                    self.train_data,
                    site=self.config.name,
                    run_id=run_id,
                    round=server_round,
                    rounds_left=max(1, rounds - server_round + 1),
                    global_arrays=global_arrays,
                    settings=settings,
                    progress=self._between_steps,
                )
            except Exception as exc:
                self.audit.append(
                    actor="coordinator",
                    action="train.refused",
                    resource=run_id,
                    details={"round": server_round, "error": str(exc)},
                )
                raise
            self.state.rounds_trained += 1
            self.audit.append(
                actor="coordinator",
                action="train",
                resource=run_id,
                details={
                    "round": server_round,
                    **{k: v for k, v in result.report.to_dict().items() if k != "extra"},
                    "update_sha256": wire.sha256_of(result.arrays),
                    "factors_sent": result.factors,
                    "ledger": self.ledger.ref(),  # this round's entry: the next start holds the ledger against it
                },
            )
            # The signed ledger head after the charge: the coordinator takes the update only if it extends
            # the head it witnessed before the round (coordinator.witness).
            return replace(result, report=replace(result.report, witness=self.witness_statements()))

    def witness_statements(self) -> list[dict[str, Any]]:
        """This site's signed statements of its state now (its ledger head, its audit log's checkpoint),
        for the coordinator to witness."""
        statements = round_statements(self.ledger, site=self.config.name, key_path=self.node_key)
        with contextlib.suppress(AuditError):
            self.audit.checkpoint()  # sign up to this round's records now rather than within the second
        checkpoint = self.audit.latest_checkpoint()  # None while the node key cannot sign (privacy.checkpoints)
        return [*statements, checkpoint] if checkpoint is not None else statements

    def check_not_charged(self, run_id: str, server_round: int) -> None:
        """AlreadyCharged (409) if this site's ledger already charged round `server_round` of run `run_id`:
        a coordinator that crashed mid-round and resumed must not make a site pay for one round twice."""
        for entry in self.ledger.entries():
            if entry.kind == ROUND and entry.run_id == run_id and entry.round == server_round:
                raise AlreadyCharged(
                    f"round {server_round} of run {run_id} was charged here already (ledger entry {entry.id}); "
                    "refusing to charge it again"
                )

    @property
    def ledger_refusal(self) -> str | None:
        """The training refusal's message (None: the node may train); what status and metrics show."""
        return str(self.training_refusal) if self.training_refusal is not None else None

    def check_may_train(self) -> None:
        """The start-up training refusal, raised (409: LedgerMismatch, KAnonymityRefused), if there is one:
        no round may train. A fresh copy each time: the stored one is never re-raised with a growing traceback."""
        if self.training_refusal is not None:
            raise copy.copy(self.training_refusal)

    def _between_steps(self, *_: Any) -> None:
        """Serving's priority: after each DP step, let in-flight requests run for up to `TRAIN_YIELD_S`."""
        self.serving.yield_to_requests(TRAIN_YIELD_S)

    def _check_finite_start(self, global_arrays: wire.Arrays | None, batch_size: int) -> None:
        """Refuse, before the ledger is charged, a round whose loss is already NaN or infinite.

        A broken base model or start adapter would only burn budget: this catches it on the first
        records with the round's starting weights. A loss that turns non-finite during training
        is a crash midway, and stays charged.
        """
        if not self.train_data:
            return  # train_round refuses an empty dataset itself
        pad = int(self.host.tokenizer.pad_token_id)
        probe = collate(self.train_data[: max(1, batch_size)], pad_id=pad, left=True)
        with self.host.lock, torch.no_grad():
            self.host.reset_train_adapter(global_arrays)
            self.host.peft.set_adapter(TRAIN_ADAPTER)
            losses = per_sample_loss(self.host.peft, {k: v.to(self.host.device) for k, v in probe.items()})
        if not bool(torch.isfinite(losses).all()):
            raise TrainingError("non-finite loss before training (model or adapter is broken); round refused")

    def readiness(self, config: Mapping[str, object]) -> wire.Readiness:
        """Could this site train the round a train config describes? The ledger's plan of it, nothing charged.

        The coordinator asks before every round (a Flower `query` message), so a site whose budget,
        or this run's share of it, is spent is left out before any site trains and spends. A "no" is
        audited as `train.refused`, as the round itself would have been; an unknown key is refused
        (RoundSettingsError) as `train` refuses it.
        """
        instruction = TrainInstruction.from_config_record(config)
        settings = TrainSettings.of(instruction, secure_mode=self.config.secure_mode)
        rounds_left = max(1, instruction.run.num_rounds - instruction.server_round + 1)
        reason = ""
        run_id = instruction.ledger_run
        try:
            self.check_may_train()  # a ledger at odds with the audit trail, data below k: "no", as `train` says
            self.check_not_charged(run_id, instruction.server_round)
            if not self.train_data:
                raise TrainingError("the site has no training data")
            plan_round(self.ledger, self.train_data, settings, run_id=run_id, rounds_left=rounds_left)
        except FedSeekError as exc:  # BudgetExceeded, LedgerError (a damaged ledger), TrainingError
            reason = exc.one_line()
            self.audit.append(
                actor="coordinator",
                action="train.refused",
                resource=run_id,
                details={"round": instruction.server_round, "error": reason, "stage": "readiness"},
            )
        budget = self.ledger.budget.epsilon
        try:
            spent, remaining = self.ledger.spent(), self.ledger.remaining()  # the most exposed record; the freshest
        except LedgerError:  # a damaged ledger counts as spent; the answer is "no" already
            spent, remaining = budget, 0.0
        return wire.Readiness(
            site=self.config.name,
            ready=not reason,
            reason=reason,
            epsilon_spent=spent,
            epsilon_remaining=remaining,
            witness=self.witness_statements(),  # the ledger head before the round, signed
            num_examples=len(self.train_data),  # secure aggregation scales its fixed-point weights by it
            # The coordinator numbers its next version past it: one restored from an older backup must
            # not give a number this site holds with other weights (`deploy` refuses that: VersionReused).
            latest_version=highest_global_version(self.host.adapters) or "",
        )

    def check_deploy_version(self, version: object) -> str:
        """`version` if a deployment may use it; else InvalidNameError (400), with a `deploy.refused` record.

        Called before anything is read or written: a path-like version would name a directory
        outside the state dir, and `site_local` or the base model's name would replace the training
        adapter or the default served model.
        """
        try:
            return self.host.check_version_name(version)
        except InvalidNameError as exc:
            self.audit.append(
                actor="coordinator", action="deploy.refused", resource="", details={"error": exc.one_line()}
            )
            raise

    def deploy(
        self,
        version: str,
        sha256: str,
        arrays: wire.Arrays,
        *,
        parent: str | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Install a global adapter version, persist it, and score it on local eval data.

        `lineage` (the registry's run, round, parent and contributing sites with their epsilon, as the
        deploy message carries it) is kept in the version's adapter.json for explanation reports.

        An FFA-LoRA deployment carries B only: the seeded A is added before the whole adapter's
        sha256 is checked. A version that is not a plain name, or is reserved, is refused first.
        """
        self.check_deploy_version(version)
        known = self.host.adapters.get(version)
        if known is not None and known.sha256 != sha256:  # a version number is never reused for other weights
            reason = f"version {version} is installed here with sha256 {known.sha256[:12]}, not {sha256[:12]}"
            self.audit.append(actor="coordinator", action="deploy.refused", resource=version, details={"error": reason})
            raise VersionReused(reason + "; a registry restored from an old backup reuses numbers")
        arrays = with_seeded_lora_a(self.host, arrays)
        if parent is None and lineage is not None and isinstance(lineage.get("parent"), str):
            parent = lineage["parent"]
        info = self.host.install(version, arrays, sha256=sha256, parent=parent)
        self.serving.sync_adapters()
        adapter_store.save_version(
            self.layout.adapters, info, arrays, envelope=self.serving.keys.envelope, lineage=lineage
        )  # KEK
        loss = evaluate_loss(self.host, self.eval_data, model=version)
        self.state.eval_loss_after[version] = loss
        shown = loss if math.isfinite(loss) else None  # JSON has no NaN: a broken version's loss is null
        self.audit.append(
            actor="coordinator", action="deploy", resource=version, details={"sha256": sha256, "eval_loss": shown}
        )
        # A candidate, not the default: it serves its share while its eval and error rate are compared
        # with the stable version's, or is rolled back at once if its eval loss is worse (node/release.py).
        release = self.release.offer(version, eval_loss=loss)
        answer: dict[str, Any] = {
            "site": self.config.name,
            "version": version,
            "sha256": sha256,
            "eval_loss": shown,
            "num_examples": len(self.eval_data),
            "release": release,
        }
        if self.upstream is not None:  # into vLLM now if the release routes to it; vLLM down never fails a deploy
            answer["upstream"] = self.upstream.adapters.sync()
        return answer

    def status(self) -> dict[str, Any]:
        stable = self.release.stable  # what default traffic gets (all of it when there is no candidate)
        return {
            "name": self.config.name,
            "model": self.host.model_name,
            "serving": stable or self.host.model_name,
            "candidate": self.release.candidate,
            "rounds_trained": self.state.rounds_trained,
            "eval_loss_before": self.state.eval_loss_before,
            "eval_loss_after": self.state.eval_loss_after.get(stable) if stable else None,
            "privacy": {**self.ledger.to_json(), "training_refused": self.ledger_refusal},
            "audit_log": str(self.audit.path),
            "audit_records": len(self.audit),
        }
