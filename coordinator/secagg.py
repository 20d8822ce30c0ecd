"""Secure aggregation (`fedseek run --secagg`): the coordinator learns only the sum of the sites' updates.

Flower 1.42 implements SecAgg+ only for its legacy API: `flwr.server.workflow.SecAggPlusWorkflow`
(server) and `flwr.client.mod.secaggplus_mod` (client); the Message API (`flwr.serverapp`, `Grid`)
has no secure-aggregation strategy. The workflow's four stages each take `(grid, LegacyContext, state)`
and talk to the nodes through `grid.send_and_receive` only, so `SecAggLoraFedAvg` drives them itself
on the run's own Grid, round by round, inside the Message-API strategy loop:

1. `configure_train` runs the readiness query (LoraFedAvg's) and refuses the round, before anything
   is trained or charged, with fewer than 3 ready sites; it sends nothing itself.
2. `aggregate_train` runs setup, share-keys, collect-masked-vectors (where each site's ClientApp
   trains through `node/secagg.py`) and unmask, and gets back the weighted mean of the updates
   of the sites whose masked vectors were accepted, and those sites' clear metadata.

What the coordinator checks per site, before its masked vector enters the sum (a site that fails is
handled by the protocol as a dropout: its pairwise masks are removed with its neighbours' shares, and
its private mask is never reconstructed): the privacy report, the signed ledger head (LoraFedAvg's
witness), FFA-LoRA's A digest, and the declared tensor names and shapes. It cannot check values: a
site's update is masked, so NaN checks, `update-norm-ratio` and the robust aggregations, which need
single updates, are the sites' own (honest sites refuse NaNs and clipped values); `--secagg` needs
`aggregation = fedavg`.

Fixed point: SecAgg+ sums integers mod 2**32. Each site sends `x * n/M` quantised to Q levels over
[-C, C] (stochastic rounding), with its weight `n/M` (M: the largest example count the ready sites
announced, so every ratio is <= 1 and the largest site's is 1); the server divides the sum by the
sum of the weights. The error of one aggregated value is below `k * 2C/Q / sum(n/M)` for k summed
sites: with C = 4, Q = 2**30 and three equal sites 7.5e-9 (2.2e-8 if the largest site held nearly
all examples), about float32's resolution for LoRA values near 0.1 and far under DP-SGD's noise.
Every site also masks a constant (`secagg_masks.CHECK_VALUE`): if its mean does not come back within
the bound, the masks did not cancel and the round is refused rather than saving noise. Q is the
largest power of two <= 2**30 with k*Q < 2**32, so the sum of k sites cannot wrap.

Masks: Flower's generator keeps 32 bits of each 256-bit seed; both ends here draw them from the
whole seed instead (`federation.protocol.secagg_masks`, installed at import).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from flwr.serverapp import Grid

from coordinator.grid_meter import MeteredGrid
from coordinator.registry import SiteLineage
from coordinator.strategy import LoraFedAvg, RoundRecord, RunFailed, _line
from federation.errors import FedSeekError
from federation.protocol import records, wire
from federation.protocol.round_settings import RoundSettingsError, RunSettings
from federation.protocol.secagg_masks import CHECK_VALUE, MIN_SITES, harden

# By name: the package re-exports a function under the module's own name.
flower_secaggplus = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

log = logging.getLogger("fedseek.coordinator")
harden(flower_secaggplus)  # masks from the whole 256-bit seed, as the sites' mod draws them

CLIPPING_RANGE = 4.0
"""|x * n/M| above it would be clipped: sites refuse such an update instead (node/secagg.py). LoRA values
(kaiming-uniform A, B grown from zero under DP-SGD) stay far below it."""
MODULUS = 2**32
SECAGG = "secagg"  # the clear metadata record of a masked reply (node/secagg.py)


def quantization_range(sites: int) -> int:
    """The largest power of two <= 2**30 (Flower rounds to int32) with sites * Q < 2**32 (no wrap-around)."""
    q = 2**30
    while sites * q >= MODULUS:
        q //= 2
    return q


def error_bound(*, sites: int, weight_sum: float, q: int, clipping_range: float = CLIPPING_RANGE) -> float:
    """Largest absolute error of one aggregated value: one quantum (2C/Q) per site, over the summed weights."""
    return sites * (2 * clipping_range / q) / weight_sum


@dataclass
class SecAggRoundRecord(RoundRecord):
    """A secure round: which sites are in the sum, the protocol's parameters and what it cost."""

    secagg: dict[str, Any] = field(default_factory=dict)


class _Proxy:
    """What the legacy workflow needs of a ClientProxy: the node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _LegacyFace:
    """The legacy Strategy the workflow calls: it picks the round's nodes and receives the unmasked mean."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)
        self.aggregate: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: object) -> list[Any]:
        # Empty instructions: the real ones (the train messages) replace them after setup.
        return [(_Proxy(n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]) -> Any:
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


def _stage(msg: Message) -> str:
    config = None if msg.has_error() else msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(config.get(Key.STAGE, "")) if config is not None else ""


@dataclass
class SecureSum:
    """The outcome of one SecAgg+ round: the weighted mean (sorted-name order) and the replies summed."""

    mean: list[np.ndarray]
    contributors: list[Message]


class SecAggLoraFedAvg(LoraFedAvg):
    """LoraFedAvg whose train phase is Flower's SecAgg+: it never holds a single site's update."""

    def __init__(self, *, settings: RunSettings, **kwargs: Any) -> None:
        aggregation = getattr(settings, "aggregation", "fedavg")
        if aggregation != "fedavg":
            raise RoundSettingsError(
                f"--secagg sums the updates: aggregation must be fedavg, not {aggregation} "
                "(a robust aggregate needs single updates)"
            )
        super().__init__(settings=settings, **kwargs)
        self._pending: tuple[Grid, list[Message]] | None = None
        self._examples: dict[int, int] = {}  # node id -> example count its readiness answer announced
        self._vetted: dict[int, tuple[wire.PrivacyReport, dict[str, Any]]] = {}  # node -> report, clear metadata
        self._trained: list[int] = []  # nodes that answered the masking stage: they trained and were charged

    # -- readiness ------------------------------------------------------------------

    def _witness_ready(self, rec: RoundRecord, node: int, answer: wire.Readiness) -> str | None:
        self._examples[node] = answer.num_examples
        return super()._witness_ready(rec, node, answer)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The readiness query and the round's train messages, kept for the SecAgg+ stages: Flower's loop
        sends nothing. Fewer than 3 ready sites: the round is refused before anything is trained."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        rec = self.rounds[-1]
        if not isinstance(rec, SecAggRoundRecord):
            self.rounds[-1] = rec = SecAggRoundRecord(**vars(rec))
        if len(messages) < MIN_SITES:
            reasons = "; ".join(f"{who}: {why}" for who, why in sorted(rec.not_ready.items()))
            raise RunFailed(
                f"round {server_round} not started, nothing trained or charged: secure aggregation needs at "
                f"least {MIN_SITES} ready sites, {len(messages)} ready" + (f"; {reasons}" if reasons else "")
            )
        self._pending = (grid, messages)
        return []

    # -- the secure round -----------------------------------------------------------

    def _vet(self, server_round: int, rec: RoundRecord, replies: list[Message]) -> list[Message]:
        """The collect-masked-vectors replies whose clear metadata passes; the others are dropped here
        (SecAgg+ then treats them as dropouts) and recorded as rejected."""
        parsed: list[tuple[Message, wire.PrivacyReport, dict[str, Any]]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                rec.rejected[f"node-{node}"] = _line(msg.error.reason)
                continue
            try:
                report = records.report_from_content(msg.content)
                if report.num_examples <= 0:
                    raise wire.WireError("update reports no training examples")
                fit_n = msg.content.metric_records["fitres.num_examples"]["num_examples"]
                if int(cast(int, fit_n)) != report.num_examples:
                    raise wire.WireError("the masked update's weight is not the reported example count")
                self._witness_update(server_round, msg, report)
                self.site_names[node] = report.site
                meta = dict(msg.content.config_records[SECAGG])
                desc = dict(msg.content.config_records.get(records.ADAPTER, {}))
                layout = tuple(zip(meta["names"], map(tuple, json.loads(str(meta["shapes"]))), strict=True))  # type: ignore[arg-type]
                parsed.append((msg, report, {"layout": layout, "desc": desc, "lora_a": meta.get("lora-a", b"")}))
            except (wire.WireError, KeyError, TypeError, ValueError, FedSeekError) as exc:
                self._reject(rec, msg, exc)
        parsed = self._vet_ffa(rec, parsed)
        reference = self._secure_reference([p[2]["layout"] for p in parsed])
        kept: list[Message] = []
        for msg, _report, meta in parsed:
            if reference is None or meta["layout"] != reference:
                why = "sites disagree on the adapter layout; no majority" if reference is None else "adapter layout"
                self._reject(rec, msg, wire.WireError(f"{why} differs from the run's"))
                continue
            kept.append(msg)
        self._vetted = {m.metadata.src_node_id: (r, meta) for m, r, meta in parsed if m in kept}
        return kept

    def _secure_reference(self, layouts: list[tuple[Any, ...]]) -> tuple[Any, ...] | None:
        """The names and shapes of the summed tensors: the global adapter's, or the majority's in round 1."""
        if self.global_arrays is not None:
            ref = self._averaged(self.global_arrays)
            return tuple((n, tuple(ref[n].shape)) for n in sorted(ref))
        ranked = Counter(layouts).most_common(2)
        if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
            return None
        return ranked[0][0]

    def _vet_ffa(
        self, rec: RoundRecord, parsed: list[tuple[Message, wire.PrivacyReport, dict[str, Any]]]
    ) -> list[tuple[Message, wire.PrivacyReport, dict[str, Any]]]:
        """FFA-LoRA: keep the sites trained against the run's A (the global adapter's, or the majority
        digest in round 1); a clear A, if sent, must be the one its digest names."""
        if not self.ffa:
            return parsed
        known = self.global_arrays
        expected = wire.lora_a_sha256(known) if known is not None else None
        if expected is None:
            ranked = Counter(str(m["desc"].get("lora-a-sha256", "")) for *_, m in parsed).most_common(2)
            if ranked and ranked[0][0] and not (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
                expected = ranked[0][0]
        kept = []
        for msg, report, meta in parsed:
            try:
                digest = str(meta["desc"].get("lora-a-sha256", ""))
                if expected is None or digest != expected:
                    raise wire.WireError(f"FFA-LoRA: lora_A sha256 {digest[:12] or 'missing'} is not the run's")
                if meta["lora_a"]:
                    clear = wire.decode(bytes(meta["lora_a"]))
                    if wire.lora_a_sha256(clear) != digest:
                        raise wire.WireError("FFA-LoRA: the clear lora_A does not match its digest")
                    meta["lora_a"] = clear
                kept.append((msg, report, meta))
            except wire.WireError as exc:
                self._reject(rec, msg, exc)
        return kept

    def _secure_sum(self, server_round: int, rec: SecAggRoundRecord, grid: Grid, messages: list[Message]) -> SecureSum:
        nodes = [m.metadata.dst_node_id for m in messages]
        k = len(nodes)
        q = quantization_range(k)
        announced = [self._examples.get(n, 0) for n in nodes]
        max_weight = float(max(announced)) if min(announced) > 0 else 65536.0
        threshold = max(2, k - 1)  # one dropout tolerated; k-1 shares to rebuild a key
        timeout = self.settings.round_timeout
        workflow = SecAggPlusWorkflow(
            num_shares=k,
            reconstruction_threshold=threshold,
            max_weight=max_weight,
            clipping_range=CLIPPING_RANGE,
            quantization_range=q,
            modulus_range=MODULUS,
            timeout=timeout,
        )
        face = _LegacyFace(nodes)
        state_records = RecordDict(
            {
                MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                MAIN_PARAMS_RECORD: ArrayRecord(),
            }
        )
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=state_records, run_config={}),
            strategy=cast(Any, face),
        )
        meter = MeteredGrid(grid)
        contributors: list[Message] = []

        def expire(sent: list[Message]) -> None:  # a site back after the round must not train it
            for msg in sent:
                msg.metadata.ttl = timeout

        def vet(sent: list[Message], replies: list[Message]) -> list[Message]:
            if not sent or _stage(sent[0]) != Stage.COLLECT_MASKED_VECTORS:
                return replies
            answered = {r.metadata.src_node_id for r in replies}
            for node in (m.metadata.dst_node_id for m in sent):
                if node not in answered:
                    rec.rejected[f"node-{node}"] = f"no masked update within {timeout:g}s"
            self._trained = sorted(r.metadata.src_node_id for r in replies if not r.has_error())
            kept = self._vet(server_round, rec, replies)
            contributors.extend(kept)
            return kept

        meter.on_send, meter.on_replies = expire, vet
        rec.secagg = {
            "sites": k,
            "reconstruction_threshold": threshold,
            "clipping_range": CLIPPING_RANGE,
            "quantization_range": q,
            "modulus_range": MODULUS,
            "max_weight": max_weight,
        }
        state = WorkflowState()
        stages = ("setup", "share keys", "collect masked vectors", "unmask")
        steps = (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage)
        for name, step in zip(stages, (*steps, workflow.unmask_stage), strict=True):
            ok = step(meter, context, state)
            if name == "setup":
                # The train messages (global adapter, this round's TrainInstruction) replace the empty
                # legacy instructions; each node gets its own RecordDict (the stage adds its key shares).
                state.nid_to_fitins = {m.metadata.dst_node_id: RecordDict(dict(m.content.items())) for m in messages}
            if not ok:
                rec.secagg["traffic"] = meter.summary()
                raise RunFailed(
                    f"secure aggregation halted at its {name} stage: "
                    f"{len(state.active_node_ids)} of {k} sites still active, {threshold} needed"
                )
        rec.secagg["traffic"] = meter.summary()
        if face.aggregate is None or not contributors:
            raise RunFailed("secure aggregation produced no sum")
        weight_sum = sum(self._vetted[m.metadata.src_node_id][0].num_examples for m in contributors) / max_weight
        bound = error_bound(sites=len(contributors), weight_sum=weight_sum, q=q)
        rec.secagg["error_bound"] = bound
        rec.secagg["summed"] = sorted(self._vetted[m.metadata.src_node_id][0].site for m in contributors)
        *mean, check = face.aggregate
        rec.secagg["check_error"] = float(np.abs(check - CHECK_VALUE).max()) if check.size == 1 else math.inf
        if not rec.secagg["check_error"] <= 2 * bound:  # masks that did not cancel leave noise, far above it
            raise RunFailed(
                f"the secure sum's check value came back {check.ravel()[:1]} instead of {CHECK_VALUE}: the masks "
                "did not cancel (a site or the coordinator draws SecAgg+ masks differently); nothing saved"
            )
        return SecureSum(mean, contributors)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run SecAgg+ over the round's train messages; save the unmasked mean as the next global version."""
        assert self._pending is not None, "configure_train keeps the round's train messages"
        grid, messages = self._pending
        self._pending = None
        self._vetted = {}
        self._trained = []
        rec = self.rounds[-1]
        assert isinstance(rec, SecAggRoundRecord)
        self._train_messages = messages
        try:
            secure = self._secure_sum(server_round, rec, grid, messages)
        except RunFailed as exc:
            raise self._fail(rec, [self._name(n) for n in self._trained], str(exc)) from exc
        summed = [self._vetted[m.metadata.src_node_id] for m in secure.contributors]
        reports = [r for r, _ in summed]
        charged = [self._name(n) for n in self._trained]
        if len(reports) < self.min_train_nodes:
            raise self._fail(rec, charged, f"{len(reports)} sites in the sum, min-nodes {self.min_train_nodes}")
        names = [n for n, _ in summed[0][1]["layout"]]
        averaged = wire.validate_arrays(
            {name: value.astype(np.float32) for name, value in zip(names, secure.mean, strict=True)}
        )
        averaged = self._server_step(averaged)  # the step needs only the sum: no single update
        if self.ffa:
            run_a = wire.lora_a(self.global_arrays) if self.global_arrays is not None else None
            clear = [meta["lora_a"] for _, meta in summed if meta["lora_a"]]
            run_a = run_a if run_a is not None else (clear[0] if clear else None)
            if run_a is None:
                raise self._fail(rec, charged, "FFA-LoRA, but no site sent its lora_A")
            averaged = wire.with_lora_a(averaged, run_a)
        for report in reports:
            rec.accepted.append(report.site)
        rec.update_bytes = {}  # no single update reaches the coordinator: see secagg.traffic
        lineage = [
            SiteLineage(r.site, r.epsilon, r.delta, r.num_examples, r.steps, r.noise_multiplier) for r in reports
        ]
        parent = self.latest.version if self.latest else self.parent
        round_ = self.run_round(server_round)  # a resumed run's round, as the base strategy saves it
        self.latest = self.registry.save(averaged, run=self.run_name, round=round_, sites=lineage, parent=parent)
        self.global_arrays = averaged
        rec.version, rec.sha256 = self.latest.version, self.latest.sha256
        log.info("round %d: secure sum of %s saved as %s", server_round, rec.accepted, rec.version)
        total = sum(r.num_examples for r in reports)
        train_loss = sum(r.train_loss * r.num_examples for r in reports) / total
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "num-examples": total,
            "max-epsilon": max(r.epsilon for r in reports),
        }
        if math.isfinite(train_loss):
            metrics["train-loss"] = train_loss
        return records.to_array_record(averaged), MetricRecord(metrics)
