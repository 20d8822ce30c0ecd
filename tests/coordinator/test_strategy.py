"""Tests for LoRA FedAvg and the ServerApp's round loop, driven through an in-process Flower Grid.

The grid implements Flower's abstract `Grid`: every message is deflated to Flower's wire objects
and inflated again on delivery (as the SuperLink does), and each node is a Python callable that
answers like `node/client_app.py` does, so `run_federation` runs unmodified.
"""

from __future__ import annotations

import copy
import json
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from coordinator.registry import AdapterRegistry
from coordinator.runs import wait_run
from coordinator.server_app import run_federation
from coordinator.service import CoordinatorError
from coordinator.strategy import weighted_average
from federation.ops.layout import CoordinatorLayout
from federation.protocol import records, wire
from federation.protocol.round_settings import (
    RoundSettingsError,
    RunConfig,
    RunSettings,
    Scalar,
    TrainInstruction,
)

RUN_ID = 4242
SHAPES = {"layers.0.q_proj.lora_A": (2, 8), "layers.0.q_proj.lora_B": (8, 2), "layers.1.v_proj.lora_A": (2, 8)}

Node = Callable[[Message], Message | None]
"""A site: its reply, or None when it never answers (a site that died)."""


# -- in-process grid ------------------------------------------------------------------


def _over_the_wire(msg: Message) -> Message:
    """A copy of `msg` as the receiver would see it after Flower's object transport."""
    metadata = copy.deepcopy(msg.metadata)
    if msg.has_error():
        return Message(error=copy.deepcopy(msg.error), metadata=metadata)
    content = msg.content
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    inflated = inflate_object_from_contents(content.object_id, contents)
    assert isinstance(inflated, RecordDict)
    return Message(content=inflated, metadata=metadata)


def _serialized_size(msg: Message) -> int:
    return 0 if msg.has_error() else records.serialized_size(msg.content)


class InProcessGrid(Grid):
    """A Grid whose nodes are callables; replies come back in `reply_order` (default: node id order)."""

    def __init__(self, nodes: dict[int, Node], *, reply_order: list[int] | None = None) -> None:
        self.nodes = nodes
        self.reply_order = reply_order or sorted(nodes)
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}
        self.delivered: list[Message] = []
        self.reply_bytes: list[tuple[Message, int]] = []  # (instruction, serialized size of its reply)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes: a site that died (`alive` False) is no longer one, as the SuperLink marks it offline."""
        return [n for n, node in self.nodes.items() if getattr(node, "alive", True)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for msg in messages:
            node = self.nodes[msg.metadata.dst_node_id]
            assert msg.metadata.reply_to_message_id == "", "only instructions are pushed"
            msg_id = uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id  # what the SuperLink assigns
            delivered = _over_the_wire(msg)
            self.delivered.append(delivered)
            reply = node(delivered)
            ids.append(msg_id)
            if reply is None:  # died: no reply ever comes
                if getattr(node, "mode", "") == "offline":  # the SuperLink saw its heartbeat stop: it answers
                    self._replies[msg_id] = create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
                continue
            assert reply.metadata.reply_to_message_id == msg_id
            assert reply.metadata.src_node_id == msg.metadata.dst_node_id
            self._replies[msg_id] = _over_the_wire(reply)
            self.reply_bytes.append((delivered, _serialized_size(reply)))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._replies.pop(i) for i in message_ids if i in self._replies]
        order = {node: i for i, node in enumerate(self.reply_order)}
        return sorted(out, key=lambda m: order.get(m.metadata.src_node_id, len(order)))  # the SuperLink's last

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def sent(self, message_type: str) -> list[Message]:
        return [m for m in self.delivered if m.metadata.message_type == message_type]


# -- fake sites answering like node/client_app.py -------------------------------------


@dataclass
class FakeSite:
    name: str
    num_examples: int
    epsilon: float
    eval_loss: float
    mode: str = "good"  # good | nan | shape | error | no-privacy | zero-examples | no-site-record
    # | dies (killed while training; no reply) | offline (the same, and the SuperLink answers for it, as from itself)
    # | leaves (gone after deploying) | no-budget (answers the readiness query: no)
    bad_rounds: set[int] | None = None  # None: misbehave in every round
    updates: dict[int, wire.Arrays] = field(default_factory=dict)
    alive: bool = True  # "dies": killed while training a bad round, never answers again
    trained: list[int] = field(default_factory=list)  # rounds this site trained (was charged for)

    def _bad(self, server_round: int) -> bool:
        return self.mode != "good" and (self.bad_rounds is None or server_round in self.bad_rounds)

    def update_for(self, server_round: int) -> wire.Arrays:
        rng = np.random.default_rng([zlib.crc32(self.name.encode()), server_round])
        return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}

    def __call__(self, msg: Message) -> Message | None:
        if not self.alive:
            return None
        config = msg.content.config_records[records.CONFIG]
        server_round = int(config["server-round"])  # type: ignore[arg-type]
        if msg.metadata.message_type == MessageType.QUERY:
            return self.query(msg, server_round)
        if msg.metadata.message_type == MessageType.TRAIN:
            if self._bad(server_round) and self.mode in ("dies", "offline"):
                self.trained.append(server_round)  # charged, then killed before replying
                self.alive = False
                return None
            if self.mode == "no-budget":  # what the node agent answers: 409, nothing charged
                reason = "node agent refused /internal/train: 409 privacy budget exhausted"
                return Message(Error(code=0, reason=reason), reply_to=msg)
            self.trained.append(server_round)
            return self.train(msg, server_round)
        assert msg.metadata.message_type == MessageType.EVALUATE
        return self.evaluate(msg, server_round)

    def query(self, msg: Message, server_round: int) -> Message:
        """The readiness answer node/client_app.py relays from the agent's /internal/ready."""
        TrainInstruction.from_config_record(msg.content.config_records[records.CONFIG])  # the round's train config
        no_budget = self.mode == "no-budget"
        reason = "privacy budget exhausted for this site: spent 1.00 of 1.00 (delta 1e-05); refusing round"
        answer = wire.Readiness(
            site=self.name,
            ready=not no_budget,
            reason=reason if no_budget else "",
            epsilon_spent=1.0 if no_budget else 0.0,
            epsilon_remaining=0.0 if no_budget else 1.0,
        )
        return Message(RecordDict({records.READINESS: records.readiness_to_config(answer)}), reply_to=msg)

    def report(self, server_round: int) -> wire.PrivacyReport:
        zero = self._bad(server_round) and self.mode == "zero-examples"
        return wire.PrivacyReport(
            site=self.name,
            epsilon=self.epsilon,
            delta=1e-5,
            steps=5 * server_round,
            sample_rate=0.25,
            noise_multiplier=1.1,
            max_grad_norm=1.0,
            accountant="rdp",
            num_examples=0 if zero else self.num_examples,
            train_loss=2.0 + self.eval_loss,
            extra={"clip-fraction": 0.5},
        )

    def train(self, msg: Message, server_round: int) -> Message:
        bad = self._bad(server_round)
        if bad and self.mode == "error":
            return Message(Error(code=0, reason=f"{self.name}: node agent refused /internal/train"), reply_to=msg)
        arrays = self.update_for(server_round)
        if bad and self.mode == "nan":
            arrays["layers.0.q_proj.lora_B"][1, 1] = np.nan
        if bad and self.mode == "shape":
            arrays["layers.0.q_proj.lora_A"] = np.ones((4, 8), np.float32)
        self.updates[server_round] = arrays
        report = self.report(server_round)
        # built directly (not via records.to_array_record), so NaN is not caught on the site side
        content: dict[str, Any] = {
            records.ARRAYS: ArrayRecord({k: _array(v) for k, v in arrays.items()}),
            records.METRICS: records.report_metrics(report),
            records.PRIVACY: records.report_to_config(report),
        }
        if bad and self.mode == "no-privacy":
            del content[records.PRIVACY]
        return Message(RecordDict(content), reply_to=msg)

    def evaluate(self, msg: Message, server_round: int) -> Message:
        if self._bad(server_round) and self.mode == "leaves":
            self.alive = False  # deploys this round's adapter, then its host goes down
        config = msg.content.config_records[records.CONFIG]
        content: dict[str, Any] = {
            records.METRICS: MetricRecord({"num-examples": self.num_examples // 4, "eval-loss": self.eval_loss}),
            records.SITE: ConfigRecord({"name": self.name, "version": str(config["adapter-version"])}),
        }
        if self.mode == "no-site-record":
            del content[records.SITE]
        return Message(RecordDict(content), reply_to=msg)


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


def _sites(**modes: str) -> dict[int, FakeSite]:
    specs = [("site-a", 20, 0.5, 1.25), ("site-b", 50, 0.8, 1.5), ("site-c", 130, 0.3, 1.75)]
    return {
        node_id: FakeSite(name, n, eps, loss, mode=modes.get(name.replace("-", "_"), "good"))
        for node_id, (name, n, eps, loss) in zip((11, 22, 33), specs, strict=True)
    }


def _expected_average(sites: Iterable[FakeSite], server_round: int) -> dict[str, np.ndarray]:
    sites = list(sites)
    weights = np.array([s.num_examples for s in sites], dtype=np.float64)
    return {
        name: np.tensordot(
            weights / weights.sum(), np.stack([s.updates[server_round][name].astype(np.float64) for s in sites]), 1
        )
        for name in SHAPES
    }


def _assert_arrays_close(actual: wire.Arrays, expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].dtype == np.float32
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-7)


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets up in a ServerApp process before `main` runs (see flwr.server.compat.app)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def _run_config(tmp_path: Path, **settings: Any) -> dict[str, Scalar]:
    """Flower's run config of a unit run, as `fedseek run` submits it; `settings` override RunSettings fields."""
    run = RunSettings(
        **{
            "run_name": "unit-run",
            "round_timeout": 30.0,
            "learning_rate": 0.01,
            "num_rounds": 2,
            "server_opt": "fedavg",
            **settings,
        }
    )
    return RunConfig(run, registry_dir=str(tmp_path / "registry")).to_run_config()


# -- weighted_average -----------------------------------------------------------------


def test_weighted_average_weights_by_examples() -> None:
    a = {"w": np.array([0.0, 4.0], np.float32), "b": np.array([[1.0]], np.float32)}
    b = {"w": np.array([8.0, 0.0], np.float32), "b": np.array([[5.0]], np.float32)}
    out = weighted_average([(a, 1.0), (b, 3.0)])
    np.testing.assert_allclose(out["w"], [6.0, 1.0])
    np.testing.assert_allclose(out["b"], [[4.0]])
    assert all(v.dtype == np.float32 for v in out.values())
    assert out["b"].shape == (1, 1)


def test_weighted_average_is_scale_invariant_and_identity_for_one_update() -> None:
    rng = np.random.default_rng(0)
    a = {"w": rng.standard_normal((3, 3)).astype(np.float32)}
    b = {"w": rng.standard_normal((3, 3)).astype(np.float32)}
    np.testing.assert_allclose(weighted_average([(a, 2), (b, 6)])["w"], weighted_average([(a, 1), (b, 3)])["w"])
    np.testing.assert_array_equal(weighted_average([(a, 17.0)])["w"], a["w"])


def test_weighted_average_does_not_modify_inputs() -> None:
    a = {"w": np.ones(3, np.float32)}
    before = a["w"].copy()
    weighted_average([(a, 1.0), ({"w": np.zeros(3, np.float32)}, 1.0)])
    np.testing.assert_array_equal(a["w"], before)


def test_weighted_average_accumulates_in_float64() -> None:
    big, small = np.float32(2.0**24), np.float32(1.0)
    updates = [({"w": np.array([big], np.float32)}, 1.0)] + [({"w": np.array([small], np.float32)}, 1.0)] * 4
    # float32 accumulation of these terms loses the small contributions; float64 keeps them
    expected = (2.0**24 + 4.0) / 5.0
    assert weighted_average(updates)["w"][0] == np.float32(expected)


@pytest.mark.parametrize("weights", [(0.0, 0.0), (1.0, -1.0), (-2.0, 1.0)])
def test_weighted_average_rejects_non_positive_total(weights: tuple[float, float]) -> None:
    a = {"w": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="positive"):
        weighted_average([(a, weights[0]), (a, weights[1])])


def test_weighted_average_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        weighted_average([])


# -- full rounds through run_federation -----------------------------------------------


@pytest.fixture
def happy_run(tmp_path: Path) -> tuple[dict[str, Any], InProcessGrid, dict[int, FakeSite], AdapterRegistry]:
    sites = _sites()
    grid = InProcessGrid(dict(sites))
    summary = run_federation(grid, _run_config(tmp_path))
    return summary, grid, sites, AdapterRegistry(tmp_path / "registry")


def test_two_rounds_finish_and_save_two_versions(happy_run: Any) -> None:
    summary, _, _, registry = happy_run
    assert summary["status"] == "finished"
    assert summary["rounds_planned"] == 2
    assert summary["rounds_completed"] == 2
    assert registry.versions() == ["global-v0001", "global-v0002"]
    assert [r["version"] for r in summary["rounds"]] == ["global-v0001", "global-v0002"]
    assert summary["global_adapter"]["version"] == "global-v0002"
    assert Path(summary["global_adapter"]["path"]) == registry.path("global-v0002")
    assert all(r["rejected"] == {} for r in summary["rounds"])
    assert all(sorted(r["accepted"]) == ["site-a", "site-b", "site-c"] for r in summary["rounds"])


def test_summary_file_matches_returned_summary(happy_run: Any) -> None:
    summary, _, _, registry = happy_run
    on_disk = json.loads((registry.root / "runs" / "unit-run.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert not list((registry.root / "runs").glob("*.tmp"))


def test_global_adapter_is_num_examples_weighted_average(happy_run: Any) -> None:
    _, _, sites, registry = happy_run
    for server_round, version in ((1, "global-v0001"), (2, "global-v0002")):
        arrays, manifest = registry.load(version)
        expected = _expected_average(sites.values(), server_round)
        _assert_arrays_close(arrays, expected)
        assert manifest.round == server_round
        assert manifest.sha256 == wire.sha256_of(arrays)
    # the weighting matters: an unweighted mean would be far from the stored adapter
    arrays, _ = registry.load("global-v0002")
    plain = np.mean([s.updates[2]["layers.0.q_proj.lora_A"] for s in sites.values()], axis=0)
    assert not np.allclose(arrays["layers.0.q_proj.lora_A"], plain, atol=1e-3)


def test_manifests_record_lineage_and_parent_chain(happy_run: Any) -> None:
    _, _, sites, registry = happy_run
    first, second = registry.manifest("global-v0001"), registry.manifest("global-v0002")
    assert first.parent is None
    assert second.parent == "global-v0001"
    assert first.run == second.run == "unit-run"
    for manifest in (first, second):
        lineage = {s.site: s for s in manifest.sites}
        assert set(lineage) == {"site-a", "site-b", "site-c"}
        for site in sites.values():
            assert lineage[site.name].epsilon == pytest.approx(site.epsilon)
            assert lineage[site.name].num_examples == site.num_examples
            assert lineage[site.name].delta == pytest.approx(1e-5)
            assert lineage[site.name].steps == 5 * manifest.round


def test_train_messages_carry_config_and_the_current_global_adapter(happy_run: Any) -> None:
    _, grid, _, registry = happy_run
    train = grid.sent(MessageType.TRAIN)
    assert len(train) == 6
    by_round: dict[int, list[Message]] = {}
    run = RunSettings(run_name="unit-run", round_timeout=30.0, learning_rate=0.01, num_rounds=2, server_opt="fedavg")
    for msg in train:  # each carries the run's settings and its round, as a node parses them
        instruction = TrainInstruction.from_config_record(msg.content.config_records[records.CONFIG])
        assert instruction.run == run and (instruction.reply_factors, instruction.run_id) == ("AB", "")
        by_round.setdefault(instruction.server_round, []).append(msg)
    assert sorted(by_round) == [1, 2]
    assert sorted(m.metadata.dst_node_id for m in by_round[1]) == [11, 22, 33]
    # round 1 starts from the sites' own seeded LoRA init; round 2 from global-v0001
    assert all(len(m.content.array_records[records.ARRAYS]) == 0 for m in by_round[1])
    v1, _ = registry.load("global-v0001")
    for msg in by_round[2]:
        sent = records.from_array_record(msg.content.array_records[records.ARRAYS])
        assert wire.sha256_of(sent) == wire.sha256_of(v1)


def test_evaluate_messages_name_and_carry_the_new_version(happy_run: Any) -> None:
    _, grid, _, registry = happy_run
    evaluate = grid.sent(MessageType.EVALUATE)
    assert len(evaluate) == 6
    seen: set[tuple[int, int]] = set()
    for msg in evaluate:
        cfg = msg.content.config_records[records.CONFIG]
        server_round = int(cfg["server-round"])  # type: ignore[arg-type]
        version = f"global-v{server_round:04d}"
        assert cfg["adapter-version"] == version
        assert cfg["adapter-sha256"] == registry.manifest(version).sha256
        assert cfg["run-name"] == "unit-run"
        carried = records.from_array_record(msg.content.array_records[records.ARRAYS])
        assert wire.sha256_of(carried) == cfg["adapter-sha256"]
        seen.add((server_round, msg.metadata.dst_node_id))
    assert seen == {(r, n) for r in (1, 2) for n in (11, 22, 33)}


def test_a_typo_in_the_run_config_is_refused_before_any_round(tmp_path: Path) -> None:
    grid = InProcessGrid(dict(_sites()))
    with pytest.raises(RoundSettingsError, match="unknown run config key 'learning_rate'"):
        run_federation(grid, {**_run_config(tmp_path), "learning_rate": 0.5})
    assert grid.delivered == [] and not (tmp_path / "registry").exists()


def test_eval_loss_is_recorded_per_site_and_round(happy_run: Any) -> None:
    summary, _, sites, _ = happy_run
    expected = {s.name: s.eval_loss for s in sites.values()}
    assert [r["eval_loss"] for r in summary["rounds"]] == [expected, expected]


def _single_round(tmp_path: Path, sites: dict[int, FakeSite], **cfg: Any) -> tuple[dict[str, Any], InProcessGrid]:
    reply_order = cfg.pop("reply_order", None)
    grid = InProcessGrid(dict(sites), reply_order=reply_order)
    return run_federation(grid, _run_config(tmp_path, **{"num_rounds": 1, **cfg})), grid


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("nan", r"layers\.0\.q_proj\.lora_B.*NaN"),
        ("shape", r"layers\.0\.q_proj\.lora_A.*shape"),
        ("error", "node agent refused"),
        ("no-privacy", "privacy"),
        ("zero-examples", "no training examples"),
    ],
)
def test_bad_update_is_rejected_and_average_uses_the_others(tmp_path: Path, mode: str, reason: str) -> None:
    sites = _sites(site_b=mode)
    # the bad site answers last, so the good updates define the expected tensor set
    summary, _ = _single_round(tmp_path, sites, reply_order=[11, 33, 22])
    (rec,) = summary["rounds"]
    assert set(rec["rejected"]) == {"node-22"}
    assert re.search(reason, rec["rejected"]["node-22"]), rec["rejected"]["node-22"]
    assert sorted(rec["accepted"]) == ["site-a", "site-c"]
    registry = AdapterRegistry(tmp_path / "registry")
    arrays, manifest = registry.load("global-v0001")
    _assert_arrays_close(arrays, _expected_average([sites[11], sites[33]], 1))
    assert sorted(s.site for s in manifest.sites) == ["site-a", "site-c"]
    assert summary["rounds_completed"] == 1


def test_wrongly_shaped_update_is_rejected_even_when_it_arrives_first(tmp_path: Path) -> None:
    sites = _sites(site_b="shape")
    summary, _ = _single_round(tmp_path, sites, reply_order=[22, 11, 33])
    (rec,) = summary["rounds"]
    assert set(rec["rejected"]) == {"node-22"}
    assert sorted(rec["accepted"]) == ["site-a", "site-c"]
    assert rec["version"] == "global-v0001"


def test_round_two_updates_must_match_the_current_global_adapter(tmp_path: Path) -> None:
    sites = _sites(site_b="shape")
    sites[22].bad_rounds = {2}
    grid = InProcessGrid(dict(sites), reply_order=[22, 11, 33])
    summary = run_federation(grid, _run_config(tmp_path))
    first, second = summary["rounds"]
    assert first["rejected"] == {}
    assert set(second["rejected"]) == {"node-22"}
    assert second["version"] == "global-v0002"


def test_too_few_valid_updates_saves_no_version(tmp_path: Path) -> None:
    sites = _sites(site_b="nan", site_c="shape")
    summary, grid = _single_round(tmp_path, sites, min_nodes=3)
    (rec,) = summary["rounds"]
    assert summary["status"] == "failed"
    assert summary["error"].startswith("round 1 made no global adapter (0 valid updates, min-nodes 3)")
    assert "site-b (node-22): adapter tensor" in summary["error"]
    # every site trained and was charged, though no adapter came of it: the error says so
    assert "charged for this round with no adapter made: site-a (node-11) epsilon 0.500" in summary["error"]
    assert "site-b (node-22)" in summary["error"].split("charged for this round")[1]
    assert rec["version"] is None and rec["sha256"] is None
    # site-b sent NaN; site-a and site-c disagree on the layout with no majority: both refused
    assert set(rec["rejected"]) == {"node-11", "node-22", "node-33"}
    assert "no majority" in rec["rejected"]["node-11"]
    assert rec["accepted"] == []
    assert summary["rounds_completed"] == 0
    assert summary["global_adapter"] is None
    assert AdapterRegistry(tmp_path / "registry").versions() == []
    # nothing to deploy, so no evaluate messages go out
    assert grid.sent(MessageType.EVALUATE) == []


def test_failed_round_ends_the_run_and_keeps_the_previous_version(tmp_path: Path) -> None:
    sites = _sites(site_b="nan")
    sites[22].bad_rounds = {2}
    grid = InProcessGrid(dict(sites))
    summary = run_federation(grid, _run_config(tmp_path, min_nodes=3, num_rounds=3))
    first, second = summary["rounds"]  # round 3 never starts: it would spend budget for a failed run
    assert first["version"] == "global-v0001"
    assert second["version"] is None
    assert set(second["rejected"]) == {"node-22"}
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1 and summary["rounds_planned"] == 3
    assert summary["error"].startswith("round 2 made no global adapter (2 valid updates, min-nodes 3)")
    assert summary["error"].endswith("later rounds not started")
    assert summary["global_adapter"]["version"] == "global-v0001"
    assert AdapterRegistry(tmp_path / "registry").versions() == ["global-v0001"]
    assert all(site.trained == [1, 2] for site in sites.values())
    assert {m.content.config_records[records.CONFIG]["server-round"] for m in grid.sent(MessageType.TRAIN)} == {1, 2}
    assert {m.content.config_records[records.CONFIG]["server-round"] for m in grid.sent(MessageType.EVALUATE)} == {1}


# -- issue 14, finding 4: a round starts only if it can succeed; a failed one ends the run, named ---------


def _round_of(msg: Message) -> int:
    return int(msg.content.config_records[records.CONFIG]["server-round"])  # type: ignore[arg-type]


def _trained_rounds(grid: InProcessGrid) -> dict[int, list[int]]:
    """Node id -> the rounds whose train message reached it."""
    out: dict[int, list[int]] = {}
    for m in grid.sent(MessageType.TRAIN):
        out.setdefault(m.metadata.dst_node_id, []).append(_round_of(m))
    return out


def test_site_killed_mid_round_fails_the_run_and_names_it(tmp_path: Path) -> None:
    """Finding 4: `--min-nodes 3`, one site killed mid-round: no adapter was made, yet the run
    reported `finished`. Now the run fails, naming the site that dropped and those charged for nothing."""
    sites = _sites(site_c="dies")
    sites[33].bad_rounds = {1}
    grid = InProcessGrid(dict(sites))
    summary = run_federation(grid, _run_config(tmp_path, min_nodes=3, num_rounds=2))
    assert summary["status"] == "failed"
    assert summary["rounds_completed"] == 0 and summary["global_adapter"] is None
    error = summary["error"]
    assert error.startswith("round 1 made no global adapter (2 valid updates, min-nodes 3)")
    assert "site-c (node-33): no reply within 30s" in error
    assert "charged for this round with no adapter made: site-a (node-11) epsilon 0.500, site-b (node-22)" in error
    assert "\n" not in error
    # round 2 never starts: the survivors spend nothing more, and nothing is deployed
    assert _trained_rounds(grid) == {11: [1], 22: [1], 33: [1]}
    assert grid.sent(MessageType.EVALUATE) == []
    assert AdapterRegistry(tmp_path / "registry").versions() == []
    on_disk = json.loads((tmp_path / "registry" / "runs" / "unit-run.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["error"] == error


def test_the_superlinks_node_unavailable_reply_is_charged_to_the_site_it_stands_for(tmp_path: Path) -> None:
    """The SuperLink answers for a node whose heartbeat stopped, from its own node id: the error
    must name the site the train message went to, not the SuperLink."""
    sites = _sites(site_c="offline")
    sites[33].bad_rounds = {1}
    summary, _ = _single_round(tmp_path, sites, min_nodes=3)
    (rec,) = summary["rounds"]
    assert set(rec["rejected"]) == {"node-33"} and "Node Unavailable" in rec["rejected"]["node-33"]
    assert f"node-{SUPERLINK_NODE_ID}:" not in summary["error"] and f"node-{SUPERLINK_NODE_ID})" not in summary["error"]
    assert "dropped or rejected: site-c (node-33): Error: Node Unavailable" in summary["error"]
    assert summary["status"] == "failed"


def test_round_refused_before_anyone_trains_when_a_site_is_gone(tmp_path: Path) -> None:
    sites = _sites(site_c="leaves")
    sites[33].bad_rounds = {1}  # deploys round 1's adapter, then goes down
    grid = InProcessGrid(dict(sites))
    summary = run_federation(grid, _run_config(tmp_path, min_nodes=3, num_rounds=2, round_timeout=1.0))
    first, second = summary["rounds"]
    assert first["version"] == "global-v0001"
    assert second["version"] is None and second["accepted"] == []
    assert second["not_ready"] == {"site-c": "not connected"}
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    assert summary["error"] == (
        "round 2 not started, nothing trained or charged: 2 of 2 connected sites ready, min-nodes 3; "
        "site-c: not connected"
    )
    assert _trained_rounds(grid) == {11: [1], 22: [1], 33: [1]}  # no site trained (or was charged) for round 2
    assert [s.trained for s in sites.values()] == [[1], [1], [1]]


def test_site_without_budget_refuses_the_round_before_anyone_is_charged(tmp_path: Path) -> None:
    sites = _sites(site_b="no-budget")
    summary, grid = _single_round(tmp_path, sites, min_nodes=3)
    (rec,) = summary["rounds"]
    assert rec["not_ready"] == {
        "site-b (node-22)": "privacy budget exhausted for this site: spent 1.00 of 1.00 (delta 1e-05); refusing round"
    }
    assert summary["status"] == "failed"
    assert summary["error"].startswith(
        "round 1 not started, nothing trained or charged: 2 of 3 connected sites ready, min-nodes 3; "
        "site-b (node-22): privacy budget exhausted for this site"
    )
    assert grid.sent(MessageType.TRAIN) == [] and all(s.trained == [] for s in sites.values())
    assert len(grid.sent(MessageType.QUERY)) == 3


def test_site_without_budget_is_left_out_and_still_gets_the_adapter(tmp_path: Path) -> None:
    sites = _sites(site_b="no-budget")
    grid = InProcessGrid(dict(sites))
    summary = run_federation(grid, _run_config(tmp_path, min_nodes=2))
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert "error" not in summary
    assert _trained_rounds(grid) == {11: [1, 2], 33: [1, 2]}  # never sent a round it would refuse
    assert all(set(r["not_ready"]) == {"site-b (node-22)"} for r in summary["rounds"])
    assert all(sorted(r["accepted"]) == ["site-a", "site-c"] for r in summary["rounds"])
    # it serves the consortium's adapter all the same: deployment goes to every connected site
    deployed = {(_round_of(m), m.metadata.dst_node_id) for m in grid.sent(MessageType.EVALUATE)}
    assert deployed == {(r, n) for r in (1, 2) for n in (11, 22, 33)}


def test_readiness_query_carries_the_rounds_train_config(tmp_path: Path) -> None:
    sites = _sites()
    grid = InProcessGrid(dict(sites))
    run_federation(grid, _run_config(tmp_path, budget_share=0.25))
    queries = grid.sent(MessageType.QUERY)
    assert sorted((m.metadata.dst_node_id, _round_of(m)) for m in queries) == [
        (n, r) for n in (11, 22, 33) for r in (1, 2)
    ]
    for query in queries:  # the node plans exactly the round it would train: same instruction
        instruction = TrainInstruction.from_config_record(query.content.config_records[records.CONFIG])
        assert instruction.run.budget_share == 0.25 and instruction.run.num_rounds == 2
        assert len(query.content.array_records) == 0  # no adapter travels with the question
    # a train message lives only as long as the coordinator waits: a site back after the round must not train
    assert {m.metadata.ttl for m in grid.sent(MessageType.TRAIN)} == {30.0}
    # and each round's queries precede its training
    order = [
        (m.metadata.message_type, m.content.config_records[records.CONFIG]["server-round"]) for m in grid.delivered
    ]
    for r in (1, 2):
        assert max(i for i, o in enumerate(order) if o == (MessageType.QUERY, r)) < order.index((MessageType.TRAIN, r))


def test_malformed_readiness_answer_leaves_the_site_out(tmp_path: Path) -> None:
    sites = _sites()
    sites[22].query = lambda msg, r: Message(RecordDict({}), reply_to=msg)  # type: ignore[method-assign]
    summary, grid = _single_round(tmp_path, sites, min_nodes=2)
    assert summary["status"] == "finished"
    assert summary["rounds"][0]["not_ready"] == {"node-22": "query reply holds no readiness record"}
    assert sorted(m.metadata.dst_node_id for m in grid.sent(MessageType.TRAIN)) == [11, 33]


def _killed_run(tmp_path: Path) -> Path:
    """A coordinator state whose run `unit-run` failed as finding 4's did; returns the state dir."""
    sites = _sites(site_c="dies")
    sites[33].bad_rounds = {1}
    state = tmp_path / "coord"
    summary = run_federation(InProcessGrid(dict(sites)), _run_config(state, min_nodes=3))
    assert summary["status"] == "failed"
    endpoints = CoordinatorLayout(state).endpoints
    endpoints.parent.mkdir(parents=True, exist_ok=True)
    endpoints.write_text(json.dumps({"registry": str(state / "registry")}))
    return state


def test_wait_run_raises_the_failed_runs_error(tmp_path: Path) -> None:
    state = _killed_run(tmp_path)
    seen: list[dict[str, Any]] = []
    with pytest.raises(CoordinatorError) as failed:
        wait_run(state, run_name="unit-run", timeout=10, progress=seen.append)
    line = failed.value.one_line()
    assert line.startswith("run unit-run failed: round 1 made no global adapter (2 valid updates, min-nodes 3)")
    assert "site-c (node-33): no reply within 30s" in line and line == str(failed.value)
    assert [r["round"] for r in seen] == [1]  # the failed round is reported before the error


def test_malformed_evaluate_reply_does_not_abort_the_run(tmp_path: Path) -> None:
    sites = _sites(site_b="no-site-record")
    summary, _ = _single_round(tmp_path, sites)
    assert summary["status"] == "finished"
    assert summary["rounds"][0]["eval_loss"] == {"site-a": 1.25, "site-c": 1.75}


# -- FFA-LoRA: A frozen at the shared seeded init, B-only traffic ------------------------

FFA_SHAPES = {  # peft names, rank 8 over a 64-wide model: A is r x in, B is out x r
    f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{f}.weight": (8, 64) if f == "A" else (64, 8)
    for i in range(2)
    for p in ("q_proj", "v_proj")
    for f in "AB"
}


@dataclass
class FfaSite(FakeSite):
    """Answers like a node agent: A from a shared seed (the seeded LoRA init), B its own.

    It follows the FFA keys of the train config, refuses a run whose A is not its own, and on
    deployment adds its A to a B-only adapter and checks the whole adapter's sha256.
    """

    a_seed: int = 1234
    deployed: dict[int, str] = field(default_factory=dict)

    def lora_a(self) -> wire.Arrays:
        rng = np.random.default_rng(self.a_seed)
        return {k: rng.standard_normal(s).astype(np.float32) for k, s in FFA_SHAPES.items() if ".lora_A." in k}

    def update_for(self, server_round: int) -> wire.Arrays:
        rng = np.random.default_rng([zlib.crc32(self.name.encode()), server_round])
        b = {k: rng.standard_normal(s).astype(np.float32) for k, s in FFA_SHAPES.items() if ".lora_B." in k}
        return {**self.lora_a(), **b}

    def train(self, msg: Message, server_round: int) -> Message:
        instruction = TrainInstruction.from_config_record(msg.content.config_records[records.CONFIG])
        own = wire.lora_a_sha256(self.lora_a())
        if instruction.run.ffa_lora and instruction.lora_a_sha256 not in ("", own):
            return Message(Error(code=0, reason=f"{self.name}: the run's lora_A is not mine"), reply_to=msg)
        full = self.update_for(server_round)
        self.updates[server_round] = full
        factors: wire.Factors = "B" if instruction.run.ffa_lora and instruction.reply_factors == "B" else "AB"
        report = self.report(server_round)
        content = {
            **records.update_records(wire.AdapterUpdate.of(full, factors)),
            records.METRICS: records.report_metrics(report),
            records.PRIVACY: records.report_to_config(report),
        }
        return Message(RecordDict(content), reply_to=msg)

    def evaluate(self, msg: Message, server_round: int) -> Message:
        cfg = msg.content.config_records[records.CONFIG]
        carried = records.from_array_record(msg.content.array_records[records.ARRAYS])
        whole = carried if wire.lora_a(carried) else wire.with_lora_a(carried, self.lora_a())
        if wire.sha256_of(whole) != cfg["adapter-sha256"]:  # what ModelHost.install refuses
            return Message(Error(code=0, reason=f"{self.name}: adapter sha256 mismatch"), reply_to=msg)
        self.deployed[server_round] = str(cfg["adapter-version"])
        return super().evaluate(msg, server_round)


def _ffa_sites(**a_seeds: int) -> dict[int, FfaSite]:
    return {
        node_id: FfaSite(s.name, s.num_examples, s.epsilon, s.eval_loss, a_seed=a_seeds.get(s.name, 1234))
        for node_id, s in _sites().items()
    }


def _ffa_run(tmp_path: Path, sites: dict[int, FfaSite], **cfg: Any) -> tuple[dict[str, Any], InProcessGrid]:
    grid = InProcessGrid(dict(sites))
    return run_federation(grid, _run_config(tmp_path, **cfg)), grid


def test_ffa_round_gives_full_fedavg_of_b_with_the_shared_a(tmp_path: Path) -> None:
    sites = _ffa_sites()
    summary, _ = _ffa_run(tmp_path, sites, ffa_lora=True)
    assert summary["status"] == "finished" and summary["ffa_lora"] is True
    registry = AdapterRegistry(tmp_path / "registry")
    shared_a = sites[11].lora_a()
    for server_round, version in ((1, "global-v0001"), (2, "global-v0002")):
        stored, manifest = registry.load(version)  # the registry keeps whole adapters, sha256-checked
        assert manifest.sha256 == wire.sha256_of(stored) and stored.keys() == FFA_SHAPES.keys()
        fedavg = weighted_average([(s.updates[server_round], float(s.num_examples)) for s in sites.values()])
        for name, value in stored.items():
            if ".lora_B." in name:
                np.testing.assert_array_equal(value, fedavg[name], err_msg=name)
            else:  # A is the one every site shares, as it is (full FedAvg gives it back up to rounding)
                np.testing.assert_array_equal(value, shared_a[name], err_msg=name)
                np.testing.assert_allclose(fedavg[name], value, rtol=1e-6, atol=1e-6)
        # exact averaging: the mean of the sites' B A products is the stored B times A
        for name in (n for n in stored if ".lora_B." in n):
            a = shared_a[name.replace(".lora_B.", ".lora_A.")].astype(np.float64)
            total = sum(s.num_examples for s in sites.values())
            mean_delta = sum(s.num_examples / total * (s.updates[server_round][name] @ a) for s in sites.values())
            np.testing.assert_allclose(stored[name].astype(np.float64) @ a, mean_delta, rtol=1e-5, atol=1e-5)


def test_ffa_messages_carry_a_once_and_b_after(tmp_path: Path) -> None:
    sites = _ffa_sites()
    summary, grid = _ffa_run(tmp_path, sites, ffa_lora=True)
    digest = wire.lora_a_sha256(sites[11].lora_a())
    b_names = sorted(k for k in FFA_SHAPES if ".lora_B." in k)
    for msg in grid.sent(MessageType.TRAIN):
        cfg = msg.content.config_records[records.CONFIG]
        assert cfg["ffa-lora"] is True
        if cfg["server-round"] == 1:  # the coordinator has no A yet: it asks for it
            assert cfg["reply-factors"] == "AB" and "lora-a-sha256" not in cfg
            assert len(msg.content.array_records[records.ARRAYS]) == 0
        else:
            assert cfg["reply-factors"] == "B" and cfg["lora-a-sha256"] == digest
            assert sorted(msg.content.array_records[records.ARRAYS].keys()) == b_names
    for msg in grid.sent(MessageType.EVALUATE):
        assert sorted(msg.content.array_records[records.ARRAYS].keys()) == b_names
    for site in sites.values():
        assert site.deployed == {1: "global-v0001", 2: "global-v0002"}
    first, second = summary["rounds"]
    whole = sum(4 * int(np.prod(s)) for s in FFA_SHAPES.values())
    assert set(first["update_bytes"].values()) == {whole}
    assert set(second["update_bytes"].values()) == {whole // 2}


def test_ffa_reply_is_about_half_the_bytes_of_a_full_reply(tmp_path: Path) -> None:
    _, ffa = _ffa_run(tmp_path / "ffa", _ffa_sites(), ffa_lora=True)
    _, full = _ffa_run(tmp_path / "full", _ffa_sites())

    def round_two_train_replies(grid: InProcessGrid) -> list[int]:
        return [
            size
            for m, size in grid.reply_bytes
            if m.metadata.message_type == MessageType.TRAIN
            and m.content.config_records[records.CONFIG]["server-round"] == 2
        ]

    ffa_sizes, full_sizes = round_two_train_replies(ffa), round_two_train_replies(full)
    assert len(ffa_sizes) == len(full_sizes) == 3
    assert max(ffa_sizes) < 0.6 * min(full_sizes)
    assert min(ffa_sizes) > 0.4 * max(full_sizes)  # B is half the adapter here, not less
    # and the training message back to the sites is B only as well
    ffa_train = [
        m for m in ffa.sent(MessageType.TRAIN) if m.content.config_records[records.CONFIG]["server-round"] == 2
    ]
    full_train = [
        m for m in full.sent(MessageType.TRAIN) if m.content.config_records[records.CONFIG]["server-round"] == 2
    ]
    assert _serialized_size(ffa_train[0]) < 0.6 * _serialized_size(full_train[0])


def test_ffa_reply_trained_against_another_a_is_refused(tmp_path: Path) -> None:
    sites = _ffa_sites(**{"site-b": 99})
    summary, _ = _ffa_run(tmp_path, sites, ffa_lora=True, num_rounds=1)
    (rec,) = summary["rounds"]
    assert set(rec["rejected"]) == {"node-22"}
    assert "is not the run's" in rec["rejected"]["node-22"]
    stored, _ = AdapterRegistry(tmp_path / "registry").load("global-v0001")
    kept = [sites[11], sites[33]]
    fedavg = weighted_average([(s.updates[1], float(s.num_examples)) for s in kept])
    for name in (n for n in stored if ".lora_B." in n):
        np.testing.assert_array_equal(stored[name], fedavg[name])
    # its B-only deployment completed with its own A is not the stored adapter: it cannot install it
    assert sites[22].deployed == {} and sites[11].deployed == sites[33].deployed == {1: "global-v0001"}


def test_ffa_site_whose_a_changes_after_round_one_is_refused(tmp_path: Path) -> None:
    sites = _ffa_sites()
    original = sites[22].train

    def switch_a(msg: Message, server_round: int) -> Message:
        if server_round == 2:
            sites[22].a_seed = 7  # a B-only reply that names another A digest
            cfg = msg.content.config_records[records.CONFIG]
            del cfg["lora-a-sha256"]  # so the fake site does not refuse the run itself
        return original(msg, server_round)

    sites[22].train = switch_a  # type: ignore[method-assign]
    summary, _ = _ffa_run(tmp_path, sites, ffa_lora=True)
    first, second = summary["rounds"]
    assert first["rejected"] == {}
    assert set(second["rejected"]) == {"node-22"} and "is not the run's" in second["rejected"]["node-22"]
    assert second["version"] == "global-v0002"


def test_ffa_run_refuses_whole_adapter_replies_without_an_a_digest(tmp_path: Path) -> None:
    sites = _sites()  # wire-version-1 sites: whole adapters, no descriptor
    summary, _ = _single_round(tmp_path, sites, ffa_lora=True)
    (rec,) = summary["rounds"]
    assert rec["version"] is None
    assert set(rec["rejected"]) == {"node-11", "node-22", "node-33"}
    assert all("no majority" in reason for reason in rec["rejected"].values())


def test_fedavgm_moves_the_global_adapter_past_the_mean_by_the_velocity(tmp_path: Path) -> None:
    """`server-opt fedavgm`: round 1 keeps the mean (B's velocity starts there, from zero), round 2
    adds momentum x round 1's step to B; A, whose init only the sites hold, is stepped from round 2."""
    sites = _sites()
    summary = run_federation(
        InProcessGrid(dict(sites)), _run_config(tmp_path, server_opt="fedavgm", server_momentum=0.5)
    )
    assert summary["status"] == "finished"
    registry = AdapterRegistry(tmp_path / "registry")
    g1, _ = registry.load("global-v0001")
    g2, _ = registry.load("global-v0002")
    mean1, mean2 = _expected_average(sites.values(), 1), _expected_average(sites.values(), 2)
    _assert_arrays_close(g1, mean1)
    for name in SHAPES:
        # B: g1 + (0.5 v1 + mean2 - g1) with v1 = mean1 - 0; A: round 2's velocity is its own step
        expected = mean2[name] + 0.5 * mean1[name] if wire.factor_of(name) == "B" else mean2[name]
        np.testing.assert_allclose(g2[name], expected, rtol=1e-5, atol=1e-6)
