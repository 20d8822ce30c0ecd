"""FedAvg over LoRA arrays that validates every update and records each global version.

It talks only to Flower's abstract `Grid`, so tests drive it with an in-memory grid.
With `ffa=True` (FFA-LoRA) it averages the B factors only: every site trains against the same
seeded A, so the mean of the sites' B A products is (mean B) A exactly. The A factors arrive
once, in the first round's replies; after that train and evaluate messages and replies carry
B only, and each reply's A digest must be the run's.

Every update is validated before it is combined: the run's tensor layout, every value finite, and
its size (distance from the round's starting adapter) within `update-norm-ratio` times the median
of the other updates' (`_bounded`); a refused one is recorded in the round's `rejected` with a
one-line reason and logged. The accepted ones are combined as `aggregation` says: weighted FedAvg,
or a coordinate-wise trimmed mean or median (coordinator/aggregate.py).

A round costs the sites budget, so it starts only when it can succeed: before training, a `query`
message asks every connected site whether it is alive and can train the round within its budget
(the node plans it from its ledger and charges nothing); the train messages go to the sites that
said yes, and only if at least `min-nodes` did. A round that makes no global adapter ends the run
(`RunFailed`): later rounds would spend more budget for a run that already failed. Either way the
error names the sites that dropped or declined, and those that were charged for nothing.

With a `witness` (`coordinator.witness.LedgerWitness`, as every real run has) each readiness answer
and each update must carry the site's signed ledger head, extending the head this coordinator last
witnessed for that site; an update's head must also have advanced past the one the site showed
before the round (the round was charged). A site whose ledger was reset, rolled back or re-chained
is left out of the round at readiness (nothing charged), or its update is rejected (nothing
aggregated from it), with a one-line reason in the round record and the coordinator's audit trail.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coordinator import aggregate
from coordinator.aggregate import weighted_average as weighted_average  # re-export: the mean lives Flower-free
from coordinator.registry import AdapterRegistry, Manifest, SiteLineage
from coordinator.server_opt import ServerOpt, ServerState
from coordinator.witness import HeadClaim, LedgerWitness, WitnessRefused
from federation.errors import FedSeekError, Unavailable
from federation.protocol import records, wire
from federation.protocol.round_settings import RunSettings, TrainInstruction
from federation.protocol.versions import highest_global_version, version_number

log = logging.getLogger("fedseek.coordinator")

READY_TIMEOUT_S = 120.0
"""At most this long for the readiness answers (a ledger read at each site; bounded by the round timeout)."""
CONNECT_POLL_S = 1.0


def _line(reason: object, limit: int = 300) -> str:
    """A site's refusal or Flower's error as one short line (the run's error is one line for the operator)."""
    text = " ".join(str(reason).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _by_destination(sent: Iterable[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """Each reply under the node its instruction went to. The SuperLink answers for a node that went
    offline itself (source: the SuperLink), so the source of a reply does not say whose it is."""
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}  # ids: set by the grid on sending
    return {dst.get(r.metadata.reply_to_message_id, r.metadata.src_node_id): r for r in replies}


_NO_ANSWER = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})
"""Errors the SuperLink gives for a site that did not answer (gone, or its reply lost): no refusal of the site's."""


class RunFailed(Unavailable, RuntimeError):
    """A round made no global adapter, or could not start; the message names the sites (one line)."""


@dataclass
class RoundRecord:
    round: int
    version: str | None = None
    sha256: str | None = None
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    eval_loss: dict[str, float] = field(default_factory=dict)
    update_bytes: dict[str, int] = field(default_factory=dict)
    """Array bytes each accepted site sent (about half the adapter's under FFA-LoRA)."""
    not_ready: dict[str, str] = field(default_factory=dict)
    """Sites (or `node-ID`s) that did not answer the readiness query with yes, and why: not sent the round."""
    update_norms: dict[str, float] = field(default_factory=dict)
    """Each well-formed update's distance from the round's start (`coordinator.aggregate.round_start`),
    refused ones too: what `update-norm-ratio` bounds, for an operator to see how far apart the sites are."""
    release: dict[str, str] = field(default_factory=dict)
    """Each site's gray release of the round's version (node/release.py): `candidate`, `stable`, or `retired`
    when its evaluation there was worse than the site's stable version's and it was rolled back at once."""
    deploy_refused: dict[str, str] = field(default_factory=dict)
    """Sites whose node refused to install the round's version, and why (one line each); if every site
    that answered refused it, the version is deployed nowhere and the run fails."""
    started_at: float = field(default_factory=time.time)
    """When the round began (Unix time): its readiness query was about to be sent."""
    duration_s: float | None = None
    """From `started_at` to the end of its evaluation (None: the round did not finish); coordinator/metrics.py."""


Parsed = tuple[Message, wire.AdapterUpdate, wire.PrivacyReport]
Shaped = tuple[Message, wire.AdapterUpdate, wire.PrivacyReport, wire.Arrays]
"""A parsed reply and its averaged part (all of it, or FFA-LoRA's B), checked finite and of the run's layout."""


def _layout(arrays: wire.Arrays) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((name, tuple(value.shape)) for name, value in arrays.items()))


class LoraFedAvg(FedAvg):
    """FedAvg whose aggregate is saved to the registry with lineage before it is sent out."""

    def __init__(
        self,
        *,
        registry: AdapterRegistry,
        settings: RunSettings,
        parent: str | None = None,
        on_round: Callable[[], None] | None = None,
        witness: LedgerWitness | None = None,
        first_round: int = 1,
        run_key: str = "",
    ) -> None:
        nodes = settings.min_nodes
        super().__init__(min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes)
        self.settings = settings
        self.on_round = on_round
        self.registry = registry
        self.run_name = settings.run_name
        self.parent = parent
        # A resumed run (`fedseek run --resume`): Flower counts this submission's rounds from 1, the run
        # from `first_round`; nodes, the registry and the round records see the run's round. `run_key`
        # names the run in every site's ledger across its submissions ("": Flower's run id, the ClientApp's).
        self.first_round = first_round
        self.run_key = run_key
        self.rounds: list[RoundRecord] = []
        self.latest: Manifest | None = None
        self.global_arrays: wire.Arrays | None = registry.load(parent)[0] if parent else None
        self.ffa = settings.ffa_lora  # FFA-LoRA: A frozen at the shared seeded init, B-only traffic
        self.server = ServerState(ServerOpt.of(settings), frozen_a=self.ffa)
        self.site_names: dict[int, str] = {}  # node id -> the site it answered for (readiness, privacy report)
        self._train_messages: list[Message] = []  # this round's, their ids set when Flower sends them
        self.witness = witness
        self._heads_before: dict[int, HeadClaim] = {}  # node id -> the ledger head it showed at this round's readiness

    @staticmethod
    def _reject(rec: RoundRecord, msg: Message, exc: Exception) -> None:
        rec.rejected[f"node-{msg.metadata.src_node_id}"] = _line(exc)
        log.warning("round %d: rejected update from node %s: %s", rec.round, msg.metadata.src_node_id, exc)

    def _parse_reply(self, msg: Message) -> tuple[wire.AdapterUpdate, wire.PrivacyReport]:
        content = msg.content
        update = records.update_from_content(content)
        report = records.report_from_content(content)
        if report.num_examples <= 0:
            raise wire.WireError("update reports no training examples")
        return update, report

    def _witness_update(self, server_round: int, msg: Message, report: wire.PrivacyReport) -> None:
        """WitnessRefused unless the update's signed ledger head extends the witnessed one and advanced
        past the head its site showed at this round's readiness (nothing charged: nothing to aggregate)."""
        if self.witness is None:
            return
        node = msg.metadata.src_node_id
        answered = self.site_names.get(node)
        if answered is not None and report.site != answered:
            raise WitnessRefused(f"node-{node} answered the readiness query as {answered} but reports {report.site}")
        before = self._heads_before.get(node)
        if before is None:
            raise WitnessRefused(f"{report.site}: no ledger head witnessed at this round's readiness query")
        context = {"round": server_round, "node_id": node, "run": self.run_name}
        self.witness.witness(report.site, report.witness, stage="update", after=before, context=context)

    def _witness_ready(self, rec: RoundRecord, node: int, answer: wire.Readiness) -> str | None:
        """Why the site's signed ledger head at readiness is refused (one line), or None once witnessed."""
        if self.witness is None or not (answer.ready or answer.witness):
            return None  # a site that says no without a head keeps its own reason
        context = {"round": rec.round, "node_id": node, "run": self.run_name}
        try:
            self._heads_before[node] = self.witness.witness(
                answer.site, answer.witness, stage="readiness", context=context
            )
        except FedSeekError as exc:  # WitnessRefused, a bad site name, an unreadable witness store
            return _line(exc.one_line())
        return None

    def _averaged(self, arrays: wire.Arrays) -> wire.Arrays:
        """The part of an adapter that is averaged: all of it, or under FFA-LoRA its B factors."""
        return wire.lora_b(arrays) if self.ffa else arrays

    def _server_step(self, combined: wire.Arrays) -> wire.Arrays:
        """The next global adapter's averaged part: the server optimizer's step (RunSettings `server-opt`)
        from the current global adapter by the round's combined update."""
        previous = self._averaged(self.global_arrays) if self.global_arrays is not None else None
        return self.server.step(previous, combined)

    def _reference_layout(self, candidates: list[wire.Arrays]) -> wire.Arrays | None:
        """Tensor names and shapes every update must have: the current global adapter's, or in
        the first round the layout most sites agree on (none on a tie: the round is refused)."""
        if self.global_arrays is not None:
            return self._averaged(self.global_arrays)
        layouts = Counter(_layout(a) for a in candidates)
        ranked = layouts.most_common(2)
        if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
            return None
        winner = ranked[0][0]
        return next(a for a in candidates if _layout(a) == winner)

    def _bounded(self, rec: RoundRecord, shaped: list[Shaped]) -> list[tuple[wire.Arrays, wire.PrivacyReport]]:
        """The well-formed updates within `update-norm-ratio` of the others (`coordinator.aggregate.outsized`),
        accepted; the rest rejected as outsized. Sizes are distances from the round's start: the global
        adapter's averaged part, or in a run's first round an estimate of the sites' shared init."""
        start = self._averaged(self.global_arrays) if self.global_arrays is not None else None
        origin = aggregate.round_start([a for *_, a in shaped], start)
        sizes = [aggregate.distance(a, origin) for *_, a in shaped]
        refused = aggregate.outsized(sizes, ratio=self.settings.update_norm_ratio)
        kept: list[tuple[wire.Arrays, wire.PrivacyReport]] = []
        for i, (msg, update, report, arrays) in enumerate(shaped):
            rec.update_norms[report.site] = sizes[i]
            if i in refused:
                self._reject(rec, msg, wire.WireError(refused[i]))
                continue
            kept.append((arrays, report))
            rec.accepted.append(report.site)
            rec.update_bytes[report.site] = sum(int(v.nbytes) for v in update.arrays.values())
        return kept

    def _run_lora_a(self, rec: RoundRecord, parsed: list[Parsed]) -> tuple[list[Parsed], wire.Arrays | None]:
        """FFA-LoRA: keep the replies trained against the run's A, and return that A.

        The run's A is the global adapter's, or in the first round the A digest most sites
        report (none on a tie). A whole-adapter reply must also hold exactly one A per B, so the
        A taken from it completes the averaged B factors.
        """
        known = self.global_arrays
        expected = wire.lora_a_sha256(known) if known is not None else None
        if expected is None:
            ranked = Counter(u.lora_a_sha256 for _, u, _ in parsed if u.lora_a_sha256).most_common(2)
            if ranked and not (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
                expected = ranked[0][0]
        kept: list[Parsed] = []
        for msg, update, report in parsed:
            try:
                if expected is None:
                    raise wire.WireError("FFA-LoRA: sites disagree on the lora_A factors; no majority")
                if update.lora_a_sha256 != expected:
                    got = update.lora_a_sha256[:12] or "missing"
                    raise wire.WireError(f"FFA-LoRA: lora_A sha256 {got} is not the run's {expected[:12]}")
                if update.factors == "AB":
                    wire.with_lora_a(wire.lora_b(update.arrays), wire.lora_a(update.arrays))
                kept.append((msg, update, report))
            except wire.WireError as exc:
                self._reject(rec, msg, exc)
        sources = [wire.lora_a(u.arrays) for _, u, _ in kept if u.factors == "AB"]
        return kept, (wire.lora_a(known) if known is not None else next(iter(sources), None))

    def run_round(self, server_round: int) -> int:
        """The run's round number of this submission's Flower round `server_round`."""
        return server_round + self.first_round - 1

    def _instruction(self, server_round: int) -> TrainInstruction:
        """What this round's train messages tell the nodes. Under FFA-LoRA: send B only, naming A's
        digest, once the coordinator knows A; until then ask for the whole adapter."""
        at = TrainInstruction(run=self.settings, server_round=self.run_round(server_round), run_key=self.run_key)
        if not self.ffa or self.global_arrays is None:
            return at
        return replace(at, reply_factors="B", lora_a_sha256=wire.lora_a_sha256(self.global_arrays))

    @staticmethod
    def _sent_arrays(arrays: ArrayRecord, instruction: TrainInstruction) -> ArrayRecord:
        """The global adapter as a message carries it: without lora_A when the nodes are told B only."""
        if instruction.reply_factors == "AB":
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if wire.factor_of(k) != "A"})

    def _name(self, node_id: int) -> str:
        site = self.site_names.get(node_id)
        return f"{site} (node-{node_id})" if site else f"node-{node_id}"

    def _connected(self, grid: Grid) -> list[int]:
        """The connected nodes, once `min-nodes` are, or whoever is connected after the round timeout
        (Flower's own sampling would wait forever for a site that is gone)."""
        deadline = time.monotonic() + self.settings.round_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes and time.monotonic() < deadline:
            log.info("waiting for sites: %d connected, %d needed", len(nodes), self.min_available_nodes)
            time.sleep(CONNECT_POLL_S)
        return nodes

    def _ready_nodes(self, rec: RoundRecord, instruction: TrainInstruction, grid: Grid) -> list[int]:
        """The connected sites that say they can train this round; RunFailed if fewer than `min-nodes` do.

        The query carries the round's train config, so each node plans exactly this round from its
        ledger (this run's share of its budget, its rounds left) without charging anything.
        """
        nodes = self._connected(grid)
        timeout = min(READY_TIMEOUT_S, self.settings.round_timeout)
        content = RecordDict({records.CONFIG: instruction.to_config_record()})
        queries = [Message(content, node, MessageType.QUERY, ttl=timeout) for node in nodes]
        replies = _by_destination(queries, grid.send_and_receive(queries, timeout=timeout))
        self._heads_before = {}
        ready: list[int] = []
        held: list[str] = []  # the highest global version each answering site has installed
        for node in nodes:
            reply = replies.get(node)
            if reply is None:
                rec.not_ready[self._name(node)] = f"no answer within {timeout:g}s"
                continue
            if reply.has_error():
                rec.not_ready[self._name(node)] = _line(reply.error.reason)
                continue
            try:
                answer = records.readiness_from_content(reply.content)
            except wire.WireError as exc:
                rec.not_ready[self._name(node)] = _line(exc)
                continue
            self.site_names[node] = answer.site
            if answer.latest_version:  # every answering site gets the round's version, ready or not
                held.append(answer.latest_version)
            if (refused := self._witness_ready(rec, node, answer)) is not None:
                rec.not_ready[self._name(node)] = refused
            elif answer.ready:
                ready.append(node)
            else:
                rec.not_ready[self._name(node)] = _line(answer.reason)
        self._number_past(held)
        here = {self.site_names[n] for n in nodes if n in self.site_names}
        gone = sorted({name for node, name in self.site_names.items() if node not in nodes} - here)
        rec.not_ready.update({name: "not connected" for name in gone})
        if len(ready) < self.min_train_nodes:
            reasons = "; ".join(f"{who}: {why}" for who, why in sorted(rec.not_ready.items()))
            raise RunFailed(
                f"round {rec.round} not started, nothing trained or charged: {len(ready)} of "
                f"{len(nodes)} connected sites ready, min-nodes {self.min_train_nodes}"
                + (f"; {reasons}" if reasons else "")
            )
        return ready

    def _number_past(self, held: list[str]) -> None:
        """Have the registry number this round's version past every version a site holds: a coordinator
        restored from a backup older than its last round would otherwise give that round's number again,
        to other weights, and every site would refuse the deployment (`VersionReused`)."""
        highest = highest_global_version(held)
        if highest is None:
            return
        known = self.registry.latest()
        if known is None or (version_number(highest) or 0) > (version_number(known) or 0):
            log.warning(
                "sites hold %s, past this registry's latest %s (restored from an older backup?): "
                "the next version is numbered after it",
                highest,
                known or "(none)",
            )
        self.registry.reserve_past(highest)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every train message's config is this round's TrainInstruction, built from the run's settings;
        it goes to the sites that said they can train it (`_ready_nodes`), or to none.

        `config` (what `start` was given) is not used: the one source of a round's settings is
        `self.settings`. A train message lives only as long as the coordinator waits for its
        reply: a site that comes back later must not train (and spend) for a round already over.
        """
        instruction = self._instruction(server_round)
        rec = RoundRecord(round=self.run_round(server_round))
        self.rounds.append(rec)
        ready = self._ready_nodes(rec, instruction, grid)  # RunFailed: the ServerApp's summary shows `rec`
        # Before any site is charged: a resumed run starts after this round, never trains it again.
        self.registry.round_started(self.run_name, rec.round)
        sent = self._sent_arrays(arrays, instruction)
        content = RecordDict({self.arrayrecord_key: sent, self.configrecord_key: instruction.to_config_record()})
        log.info("round %d: training at %s", server_round, [self._name(n) for n in ready])
        self._train_messages = [
            Message(content, node, MessageType.TRAIN, ttl=self.settings.round_timeout) for node in ready
        ]
        return self._train_messages

    def _fail(self, rec: RoundRecord, charged: list[str], why: str) -> RunFailed:
        """The run ends at a round that made no adapter: name who dropped and who was charged for nothing
        (every site that sent a trained update, accepted or not)."""
        parts = [f"round {rec.round} made no global adapter ({why})"]
        if rec.rejected:
            who = {k: self._name(int(k.removeprefix("node-"))) if k.startswith("node-") else k for k in rec.rejected}
            dropped = "; ".join(f"{who[k]}: {v}" for k, v in sorted(rec.rejected.items()))
            parts.append(f"dropped or rejected: {dropped}")
        if charged:
            parts.append(f"charged for this round with no adapter made: {', '.join(sorted(charged))}")
        parts.append("later rounds not started")
        return RunFailed("; ".join(parts))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not self.rounds or self.rounds[-1].round != self.run_round(server_round):  # configure_train made it
            self.rounds.append(RoundRecord(round=self.run_round(server_round)))
        rec = self.rounds[-1]
        by_node = _by_destination(self._train_messages, replies)
        for node, msg in by_node.items():
            if msg.has_error():  # the site's own error, or the SuperLink's "node unavailable" for it
                rec.rejected[f"node-{node}"] = _line(msg.error.reason)
        for node in (m.metadata.dst_node_id for m in self._train_messages):
            if node not in by_node:
                rec.rejected[f"node-{node}"] = f"no reply within {self.settings.round_timeout:g}s"
        parsed: list[Parsed] = []
        for msg in valid:
            try:
                update, report = self._parse_reply(msg)
                self._witness_update(server_round, msg, report)  # a reset, rolled back or forked ledger: rejected
                parsed.append((msg, update, report))
                self.site_names[msg.metadata.src_node_id] = report.site
            except (wire.WireError, KeyError, TypeError, FedSeekError) as exc:
                self._reject(rec, msg, exc)
        epsilon = {m.metadata.src_node_id: r.epsilon for m, _, r in parsed}  # each site's total after the round
        run_a: wire.Arrays | None = None
        if self.ffa:
            parsed, run_a = self._run_lora_a(rec, parsed)
        reference = self._reference_layout([self._averaged(u.arrays) for _, u, _ in parsed])
        shaped: list[Shaped] = []
        for msg, update, report in parsed:
            try:
                if reference is None:
                    raise wire.WireError("sites disagree on the adapter layout; no majority")
                shaped.append(
                    (msg, update, report, wire.validate_arrays(self._averaged(update.arrays), like=reference))
                )
            except wire.WireError as exc:
                self._reject(rec, msg, exc)
        updates = self._bounded(rec, shaped)
        charged = [  # every site that sent a trained update, accepted or not, spent budget on this round
            self._name(n) + (f" epsilon {epsilon[n]:.3f}" if n in epsilon else "")
            for n in (m.metadata.src_node_id for m in valid)
        ]
        if self.ffa and run_a is None and updates:
            raise self._fail(rec, charged, "FFA-LoRA, but no site sent its lora_A")
        if len(updates) < self.min_train_nodes:
            raise self._fail(rec, charged, f"{len(updates)} valid updates, min-nodes {self.min_train_nodes}")
        averaged = aggregate.combine(
            [(a, float(r.num_examples)) for a, r in updates],
            method=self.settings.aggregation,
            trim_fraction=self.settings.trim_fraction,
        )
        averaged = self._server_step(averaged)
        if run_a is not None:  # FFA-LoRA: the one A every site trained against, as it is
            averaged = wire.with_lora_a(averaged, run_a)
        lineage = [
            SiteLineage(r.site, r.epsilon, r.delta, r.num_examples, r.steps, r.noise_multiplier) for _, r in updates
        ]
        parent = self.latest.version if self.latest else self.parent
        self.latest = self.registry.save(
            averaged, run=self.run_name, round=self.run_round(server_round), sites=lineage, parent=parent
        )
        self.global_arrays = averaged
        rec.version = self.latest.version
        rec.sha256 = self.latest.sha256
        log.info("round %d: saved %s sha256=%s from %s", server_round, rec.version, rec.sha256[:12], rec.accepted)
        total = sum(r.num_examples for _, r in updates)
        metrics = MetricRecord(
            {
                "num-examples": total,
                "train-loss": sum(r.train_loss * r.num_examples for _, r in updates) / total,
                "max-epsilon": max(r.epsilon for _, r in updates),
            }
        )
        return records.to_array_record(averaged), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation doubles as deployment: nodes install the version named here, then score it."""
        if self.latest is None:
            return []
        cfg = ConfigRecord(dict(config))
        if self.ffa:  # B only: the node adds its seeded A and checks the whole adapter's sha256
            instruction = self._instruction(server_round)
            arrays = self._sent_arrays(arrays, instruction)
            ffa_keys = ("ffa-lora", "reply-factors", "lora-a-sha256")
            cfg.update({k: v for k, v in instruction.to_config_record().items() if k in ffa_keys})
        cfg["adapter-version"] = self.latest.version
        cfg["adapter-sha256"] = self.latest.sha256
        cfg["server-round"] = self.run_round(server_round)
        # Kept by each node with the version (adapter.json) for its explanation reports: who trained it and
        # each site's epsilon after the round. One JSON string: a ConfigRecord holds scalars only.
        cfg["adapter-lineage"] = json.dumps(
            {
                "parent": self.latest.parent,
                "run": self.latest.run,
                "round": self.latest.round,
                "sites": [{"site": s.site, "epsilon": s.epsilon, "delta": s.delta} for s in self.latest.sites],
            }
        )
        # Every connected site deploys, one that could not train (budget spent) too; no waiting for
        # `min-nodes` here: a site gone since training must not stall the run (Flower's sampling would).
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
        return self._construct_messages(record, sorted(grid.get_node_ids()), MessageType.EVALUATE)

    def _deployed_nowhere(self, server_round: int, refused: dict[str, str]) -> RunFailed:
        """The run ends at a round whose version every site that answered refused to install: it made a
        version (kept in the registry) that serves nowhere, and later rounds would train from it."""
        made = f"{self.latest.version} (sha256 {self.latest.sha256[:12]})" if self.latest else "its version"
        why = "; ".join(f"{who}: {reason}" for who, reason in sorted(refused.items()))
        return RunFailed(
            f"round {self.run_round(server_round)} made {made} but every site that answered refused to deploy it: "
            f"{why}; later rounds not started"
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        rec = self.rounds[-1] if self.rounds and self.rounds[-1].round == self.run_round(server_round) else None
        wellformed = []
        refused: dict[str, str] = {}
        answered = [m for m in replies if not (m.has_error() and m.error.code in _NO_ANSWER)]
        for msg in replies:
            if msg.has_error():
                if msg.error.code not in _NO_ANSWER:  # the site answered: its node refused the version
                    refused[self._name(msg.metadata.src_node_id)] = _line(msg.error.reason, 200)
                continue
            try:
                site = str(msg.content.config_records[records.SITE]["name"])
                loss = float(msg.content.metric_records[records.METRICS]["eval-loss"])  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "round %d: malformed evaluation reply from node %s: %s", server_round, msg.metadata.src_node_id, exc
                )
                continue
            wellformed.append(msg)
            if rec is not None:
                rec.eval_loss[site] = loss
                release = msg.content.config_records[records.SITE].get("release")
                if release:  # a node from before gray release says nothing
                    rec.release[site] = str(release)
        if rec is not None:
            rec.deploy_refused.update(refused)
        if answered and all(m.has_error() for m in answered):
            raise self._deployed_nowhere(server_round, refused)
        if rec is not None:
            rec.duration_s = round(time.time() - rec.started_at, 3)
        result = super().aggregate_evaluate(server_round, wellformed)
        if self.on_round:
            self.on_round()
        return result
