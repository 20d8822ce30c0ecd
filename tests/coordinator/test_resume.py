"""`fedseek run --resume`: a run whose coordinator crashed mid-round continues from the registry's last
version, after the last round it sent to sites, under the same ledger run key; no version is reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message, MessageType

from coordinator.registry import AdapterRegistry
from coordinator.runs import Continuation, resume_plan
from coordinator.server_app import run_federation
from federation.errors import Conflict, NotFound
from federation.ops.layout import CoordinatorLayout
from federation.protocol import records
from federation.protocol.round_settings import RunConfig, RunSettings, TrainInstruction
from tests.coordinator.test_strategy import RUN_ID, FakeSite, InProcessGrid, _sites, serverapp_identity

__all__ = ["serverapp_identity"]  # autouse: the ServerApp's task identity, as in test_strategy


class Crash(BaseException):
    """The ServerApp process dies (SIGKILL): no `except Exception` runs."""


class CrashingSite:
    """A site that trains (is charged for) round `crash_round`, after which the coordinator dies."""

    def __init__(self, site: FakeSite, crash_round: int) -> None:
        self.site, self.crash_round = site, crash_round

    @property
    def alive(self) -> bool:
        return self.site.alive

    def __call__(self, msg: Message) -> Message | None:
        reply = self.site(msg)
        config = msg.content.config_records[records.CONFIG]
        if msg.metadata.message_type == MessageType.TRAIN and int(config["server-round"]) == self.crash_round:  # type: ignore[arg-type]
            raise Crash
        return reply


def _coordinator(tmp_path: Path) -> Path:
    """A coordinator state whose endpoints file names the registry (what `fedseek run` reads)."""
    state = tmp_path / "coord"
    state.mkdir()
    CoordinatorLayout(state).endpoints.write_text(json.dumps({"registry": str(tmp_path / "registry")}))
    return state


def _config(tmp_path: Path, settings: RunSettings, cont: Continuation | None = None) -> dict[str, Any]:
    cont = cont or Continuation()
    return RunConfig(
        settings,
        registry_dir=str(tmp_path / "registry"),
        parent_version=cont.parent,
        start_round=cont.start_round,
        run_key=cont.run_key,
    ).to_run_config()


SETTINGS = RunSettings(run_name="long", num_rounds=3, round_timeout=30.0, learning_rate=0.01)


@pytest.fixture
def crashed(tmp_path: Path) -> tuple[Path, dict[int, FakeSite]]:
    sites = _sites()
    grid = InProcessGrid({n: CrashingSite(s, crash_round=2) for n, s in sites.items()})
    with pytest.raises(Crash):
        run_federation(grid, _config(tmp_path, SETTINGS), flower_run_id=str(RUN_ID))
    return _coordinator(tmp_path), sites


def test_resume_continues_after_the_crashed_round_from_the_last_version(
    tmp_path: Path, crashed: tuple[Path, dict[int, FakeSite]]
) -> None:
    state, sites = crashed
    registry = AdapterRegistry(tmp_path / "registry")
    assert registry.versions() == ["global-v0001"] and registry.last_started("long") == 2
    settings, cont = resume_plan(state, "long")
    assert cont == Continuation(parent="global-v0001", start_round=3, run_key=str(RUN_ID))
    assert settings == SETTINGS  # the run's recorded settings

    grid = InProcessGrid(dict(sites))
    summary = run_federation(grid, _config(tmp_path, settings, cont), flower_run_id="5151")
    assert summary["status"] == "finished", summary.get("error")
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert [r["version"] for r in summary["rounds"]] == ["global-v0001", None, "global-v0002"]
    assert summary["run_key"] == str(RUN_ID)
    assert [s["flower_run_id"] for s in summary["submissions"]] == [str(RUN_ID), "5151"]
    # the new version is numbered on, made in round 3 from the crashed run's last version
    assert registry.versions() == ["global-v0001", "global-v0002"]
    manifest = registry.manifest("global-v0002")
    assert (manifest.round, manifest.parent, manifest.run) == (3, "global-v0001", "long")
    # the resumed train messages start from global-v0001, name the run's round and its ledger key
    train = grid.sent(MessageType.TRAIN)
    v1, _ = registry.load("global-v0001")
    for msg in train:
        instruction = TrainInstruction.from_config_record(msg.content.config_records[records.CONFIG])
        assert (instruction.server_round, instruction.run_key) == (3, str(RUN_ID))
        sent = records.from_array_record(msg.content.array_records[records.ARRAYS])
        assert set(sent) == set(v1)
    # no site trained one round twice: round 2 (charged before the crash) is never sent again
    trained = [site.trained for site in sites.values()]
    assert trained[0] == [1, 2, 3]  # charged for round 2 before the coordinator died
    assert trained[1:] == [[1, 3], [1, 3]]  # the crash came before their round-2 messages


def test_nothing_left_to_resume_is_refused(tmp_path: Path, crashed: tuple[Path, dict[int, FakeSite]]) -> None:
    state, sites = crashed
    settings, cont = resume_plan(state, "long")
    run_federation(InProcessGrid(dict(sites)), _config(tmp_path, settings, cont), flower_run_id="5151")
    with pytest.raises(Conflict, match="add --rounds"):
        resume_plan(state, "long")
    more, again = resume_plan(state, "long", more_rounds=2)  # two more rounds than were started
    assert (more.num_rounds, again.start_round, again.parent) == (5, 4, "global-v0002")
    with pytest.raises(NotFound):
        resume_plan(state, "never-ran")


def test_two_writers_never_publish_one_version_number(tmp_path: Path) -> None:
    """A version directory that appeared behind the registry's back (an older coordinator) is skipped."""
    registry = AdapterRegistry(tmp_path / "registry")
    arrays = {"w": __import__("numpy").ones((2, 2), "float32")}
    registry.save(arrays, run="r", round=1, sites=[], parent=None)
    (registry.root / "global-v0002").mkdir()
    (registry.root / "global-v0002" / "manifest.json").write_text("{}")  # published by someone else
    registry._next_version = lambda: "global-v0002"  # type: ignore[method-assign]  # the race: both chose 2
    calls: list[str] = []
    original = registry._publish

    def publish(*args: Any, **kwargs: Any) -> Any:
        calls.append("try")
        if len(calls) > 1:
            registry._next_version = lambda: "global-v0003"  # type: ignore[method-assign]
        return original(*args, **kwargs)

    registry._publish = publish  # type: ignore[method-assign]
    manifest = registry.save(arrays, run="r", round=2, sites=[], parent="global-v0001")
    assert manifest.version == "global-v0003" and len(calls) == 2
    assert json.loads((registry.root / "global-v0002" / "manifest.json").read_text()) == {}  # untouched


def test_parent_starts_a_new_run_from_any_version(tmp_path: Path, crashed: tuple[Path, dict[int, FakeSite]]) -> None:
    """`fedseek run --parent VERSION`: a new run (its own ledger key) whose first round trains from VERSION."""
    _, sites = crashed
    registry = AdapterRegistry(tmp_path / "registry")
    fresh = RunSettings(run_name="branch", num_rounds=1, round_timeout=30.0, learning_rate=0.01)
    grid = InProcessGrid(dict(sites))
    summary = run_federation(grid, _config(tmp_path, fresh, Continuation(parent="global-v0001")), flower_run_id="77")
    assert summary["status"] == "finished" and summary["run_key"] == "77"
    made = registry.manifest(summary["global_adapter"]["version"])
    assert (made.version, made.parent, made.round, made.run) == ("global-v0002", "global-v0001", 1, "branch")
    v1, _ = registry.load("global-v0001")
    for msg in grid.sent(MessageType.TRAIN):
        sent = records.from_array_record(msg.content.array_records[records.ARRAYS])
        assert {k: v.tobytes() for k, v in sent.items()} == {k: v.tobytes() for k, v in v1.items()}
