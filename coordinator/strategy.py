"""FedAvg over LoRA arrays that validates every update and records each global version.

It talks only to Flower's abstract `Grid`, so tests drive it with an in-memory grid.
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
from federation import records, wire

log = logging.getLogger("fedseek.coordinator")


@dataclass
class RoundRecord:
    round: int
    version: str | None = None
    sha256: str | None = None
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    eval_loss: dict[str, float] = field(default_factory=dict)


def _layout(arrays: wire.Arrays) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((name, tuple(value.shape)) for name, value in arrays.items()))


class LoraFedAvg(FedAvg):
    """FedAvg whose aggregate is saved to the registry with lineage before it is sent out."""

    def __init__(
        self,
        *,
        registry: AdapterRegistry,
        run_name: str,
        min_nodes: int,
        parent: str | None = None,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
        self.on_round = on_round
        self.registry = registry
        self.run_name = run_name
        self.parent = parent
        self.rounds: list[RoundRecord] = []
        self.latest: Manifest | None = None
        self.global_arrays: wire.Arrays | None = registry.load(parent)[0] if parent else None

    @staticmethod
    def _reject(rec: RoundRecord, msg: Message, exc: Exception) -> None:
        rec.rejected[f"node-{msg.metadata.src_node_id}"] = str(exc)
        log.warning("round %d: rejected update from node %s: %s", rec.round, msg.metadata.src_node_id, exc)

    def _parse_reply(self, msg: Message) -> tuple[wire.Arrays, wire.PrivacyReport]:
        content = msg.content
        arrays = records.from_array_record(content.array_records[records.ARRAYS])
        report = records.config_to_report(content.config_records[records.PRIVACY])
        if report.num_examples <= 0:
            raise wire.WireError("update reports no training examples")
        return arrays, report

    def _reference_layout(self, candidates: list[wire.Arrays]) -> wire.Arrays | None:
        """Tensor names and shapes every update must have: the current global adapter's, or in
        the first round the layout most sites agree on (none on a tie: the round is refused)."""
        if self.global_arrays is not None:
            return self.global_arrays
        layouts = Counter(_layout(a) for a in candidates)
        ranked = layouts.most_common(2)
        if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
            return None
        winner = ranked[0][0]
        return next(a for a in candidates if _layout(a) == winner)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        rec = RoundRecord(round=server_round)
        self.rounds.append(rec)
        for msg in errors:
            rec.rejected[f"node-{msg.metadata.src_node_id}"] = str(msg.error.reason)
        parsed: list[tuple[Message, wire.Arrays, wire.PrivacyReport]] = []
        for msg in valid:
            try:
                parsed.append((msg, *self._parse_reply(msg)))
            except (wire.WireError, KeyError, TypeError) as exc:
                self._reject(rec, msg, exc)
        reference = self._reference_layout([a for _, a, _ in parsed])
        updates: list[tuple[wire.Arrays, wire.PrivacyReport]] = []
        for msg, arrays, report in parsed:
            try:
                if reference is None:
                    raise wire.WireError("sites disagree on the adapter layout; no majority")
                updates.append((wire.validate_arrays(arrays, like=reference), report))
                rec.accepted.append(report.site)
            except wire.WireError as exc:
                self._reject(rec, msg, exc)
        if len(updates) < self.min_train_nodes:
            log.error(
                "round %d: only %d valid updates (need %d); global adapter unchanged",
                server_round,
                len(updates),
                self.min_train_nodes,
            )
            return None, None
        averaged = weighted_average([(a, float(r.num_examples)) for a, r in updates])
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
