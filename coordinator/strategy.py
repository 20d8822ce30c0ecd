"""FedAvg over LoRA arrays that validates every update and records each global version.

It talks only to Flower's abstract `Grid`, so tests drive it with an in-memory grid.
With `ffa=True` (FFA-LoRA) it averages the B factors only: every site trains against the same
seeded A, so the mean of the sites' B A products is (mean B) A exactly. The A factors arrive
once, in the first round's replies; after that train and evaluate messages and replies carry
B only, and each reply's A digest must be the run's.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coordinator.aggregate import weighted_average as weighted_average  # re-export: the mean lives Flower-free
from coordinator.registry import AdapterRegistry, Manifest, SiteLineage
from federation.protocol import records, wire
from federation.protocol.round_settings import RunSettings, TrainInstruction

log = logging.getLogger("fedseek.coordinator")


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


Parsed = tuple[Message, wire.AdapterUpdate, wire.PrivacyReport]


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
    ) -> None:
        nodes = settings.min_nodes
        super().__init__(min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes)
        self.settings = settings
        self.on_round = on_round
        self.registry = registry
        self.run_name = settings.run_name
        self.parent = parent
        self.rounds: list[RoundRecord] = []
        self.latest: Manifest | None = None
        self.global_arrays: wire.Arrays | None = registry.load(parent)[0] if parent else None
        self.ffa = settings.ffa_lora  # FFA-LoRA: A frozen at the shared seeded init, B-only traffic

    @staticmethod
    def _reject(rec: RoundRecord, msg: Message, exc: Exception) -> None:
        rec.rejected[f"node-{msg.metadata.src_node_id}"] = str(exc)
        log.warning("round %d: rejected update from node %s: %s", rec.round, msg.metadata.src_node_id, exc)

    def _parse_reply(self, msg: Message) -> tuple[wire.AdapterUpdate, wire.PrivacyReport]:
        content = msg.content
        update = records.update_from_content(content)
        report = records.config_to_report(content.config_records[records.PRIVACY])
        if report.num_examples <= 0:
            raise wire.WireError("update reports no training examples")
        return update, report

    def _averaged(self, arrays: wire.Arrays) -> wire.Arrays:
        """The part of an adapter that is averaged: all of it, or under FFA-LoRA its B factors."""
        return wire.lora_b(arrays) if self.ffa else arrays

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

    def _instruction(self, server_round: int) -> TrainInstruction:
        """What this round's train messages tell the nodes. Under FFA-LoRA: send B only, naming A's
        digest, once the coordinator knows A; until then ask for the whole adapter."""
        if not self.ffa or self.global_arrays is None:
            return TrainInstruction(run=self.settings, server_round=server_round)
        digest = wire.lora_a_sha256(self.global_arrays)
        return TrainInstruction(run=self.settings, server_round=server_round, reply_factors="B", lora_a_sha256=digest)

    @staticmethod
    def _sent_arrays(arrays: ArrayRecord, instruction: TrainInstruction) -> ArrayRecord:
        """The global adapter as a message carries it: without lora_A when the nodes are told B only."""
        if instruction.reply_factors == "AB":
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if wire.factor_of(k) != "A"})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every train message's config is this round's TrainInstruction, built from the run's settings.

        `config` (what `start` was given, stamped with the round by FedAvg) is not used: the one
        source of a round's settings is `self.settings`.
        """
        instruction = self._instruction(server_round)
        sent = self._sent_arrays(arrays, instruction)
        return super().configure_train(server_round, sent, instruction.to_config_record(), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        rec = RoundRecord(round=server_round)
        self.rounds.append(rec)
        for msg in errors:
            rec.rejected[f"node-{msg.metadata.src_node_id}"] = str(msg.error.reason)
        parsed: list[Parsed] = []
        for msg in valid:
            try:
                parsed.append((msg, *self._parse_reply(msg)))
            except (wire.WireError, KeyError, TypeError) as exc:
                self._reject(rec, msg, exc)
        run_a: wire.Arrays | None = None
        if self.ffa:
            parsed, run_a = self._run_lora_a(rec, parsed)
        reference = self._reference_layout([self._averaged(u.arrays) for _, u, _ in parsed])
        updates: list[tuple[wire.Arrays, wire.PrivacyReport]] = []
        for msg, update, report in parsed:
            try:
                if reference is None:
                    raise wire.WireError("sites disagree on the adapter layout; no majority")
                updates.append((wire.validate_arrays(self._averaged(update.arrays), like=reference), report))
                rec.accepted.append(report.site)
                rec.update_bytes[report.site] = sum(int(v.nbytes) for v in update.arrays.values())
            except wire.WireError as exc:
                self._reject(rec, msg, exc)
        if self.ffa and run_a is None and updates:
            log.error("round %d: FFA-LoRA, but no site sent its lora_A; global adapter unchanged", server_round)
            return None, None
        if len(updates) < self.min_train_nodes:
            log.error(
                "round %d: only %d valid updates (need %d); global adapter unchanged",
                server_round,
                len(updates),
                self.min_train_nodes,
            )
            return None, None
        averaged = weighted_average([(a, float(r.num_examples)) for a, r in updates])
        if run_a is not None:  # FFA-LoRA: the one A every site trained against, as it is
            averaged = wire.with_lora_a(averaged, run_a)
        lineage = [
            SiteLineage(r.site, r.epsilon, r.delta, r.num_examples, r.steps, r.noise_multiplier) for _, r in updates
        ]
        parent = self.latest.version if self.latest else self.parent
        self.latest = self.registry.save(averaged, run=self.run_name, round=server_round, sites=lineage, parent=parent)
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
        return super().configure_evaluate(server_round, arrays, cfg, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        rec = self.rounds[-1] if self.rounds and self.rounds[-1].round == server_round else None
        wellformed = []
        for msg in replies:
            if msg.has_error():
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
        result = super().aggregate_evaluate(server_round, wellformed)
        if self.on_round:
            self.on_round()
        return result
