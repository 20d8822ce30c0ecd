"""A coordinator restored from a backup older than its last round never reuses a version number the sites hold.

The sites here answer as a node agent does (node/service.py): their readiness answer names the highest
global version they installed, and a deployment that names an installed version with other weights is
refused (`VersionReused`, 409, relayed by the ClientApp as an error reply). The registry numbers past
what the sites report, and a round whose version every answering site refused fails the run.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from coordinator.registry import AdapterRegistry
from coordinator.server_app import run_federation
from federation.protocol import records, wire
from federation.protocol.names import InvalidNameError
from federation.protocol.versions import highest_global_version
from tests.coordinator.test_strategy import FakeSite, InProcessGrid, _run_config, _sites, serverapp_identity

__all__ = ["serverapp_identity"]  # autouse: the ServerApp's task identity, as in test_strategy


def _adapter(seed: int) -> wire.Arrays:
    return {"q.lora_A": np.full((2, 4), seed, np.float32), "q.lora_B": np.full((4, 2), seed, np.float32)}


# -- the registry ---------------------------------------------------------------------


def test_the_registry_numbers_past_a_version_the_sites_hold(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "registry")
    assert registry.save(_adapter(1), run="r", round=1, sites=[], parent=None).version == "global-v0001"
    registry.reserve_past("global-v0004")  # what a site reports holding, made after this registry's backup
    assert registry.save(_adapter(2), run="r", round=2, sites=[], parent=None).version == "global-v0005"
    registry.reserve_past("global-v0003")  # lower than what the registry holds: changes nothing
    assert registry.save(_adapter(3), run="r", round=3, sites=[], parent=None).version == "global-v0006"
    assert registry.versions() == ["global-v0001", "global-v0005", "global-v0006"]


def test_a_reported_version_is_compared_by_number_not_text(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "registry")
    for n in range(1, 10):
        (registry.root / f"global-v{n:04d}").mkdir()
    registry.reserve_past("global-v10000")  # more than four digits sorts before global-v0009 as text
    assert registry.save(_adapter(1), run="r", round=1, sites=[], parent=None).version == "global-v10001"
    assert highest_global_version(["global-v0009", "global-v10000", "site_local", "global-v0010"]) == "global-v10000"


@pytest.mark.parametrize("version", ["../global-v0009", "global-v9", "latest", "global-v0009\n"])
def test_a_reported_version_that_is_no_registry_version_is_refused(tmp_path: Path, version: str) -> None:
    registry = AdapterRegistry(tmp_path / "registry")
    with pytest.raises(InvalidNameError):
        registry.reserve_past(version)
    assert registry.save(_adapter(1), run="r", round=1, sites=[], parent=None).version == "global-v0001"


def test_the_readiness_answer_carries_the_sites_latest_version_over_flower() -> None:
    answer = wire.Readiness(site="site-a", ready=True, latest_version="global-v0002")
    content = RecordDict({records.READINESS: records.readiness_to_config(answer)})
    assert records.readiness_from_content(content).latest_version == "global-v0002"
    old_node = {"site": "site-a", "ready": True}  # a node from before this field: says nothing
    assert wire.Readiness.from_dict(old_node).latest_version == ""
    with pytest.raises(wire.WireError, match="latest_version"):
        wire.Readiness.from_dict({**old_node, "latest_version": "../../etc"})


# -- the strategy over the in-process grid --------------------------------------------


@dataclass
class InstallingSite(FakeSite):
    """A site that keeps what it deploys, as a node agent does: `installed` is version -> sha256.

    It names its highest installed version in its readiness answer (unless `reports_latest` is off: a
    node from before that field) and refuses a deployment that reuses an installed number for other weights.
    """

    reports_latest: bool = True
    installed: dict[str, str] = field(default_factory=dict)
    run: str = ""  # the run it last trained for

    def query(self, msg: Message, server_round: int) -> Message:
        reply = super().query(msg, server_round)
        if self.reports_latest:
            latest = highest_global_version(self.installed) or ""
            reply.content.config_records[records.READINESS]["latest_version"] = latest
        return reply

    def evaluate(self, msg: Message, server_round: int) -> Message:
        config = msg.content.config_records[records.CONFIG]
        version, sha256 = str(config["adapter-version"]), str(config["adapter-sha256"])
        known = self.installed.get(version)
        if known is not None and known != sha256:  # node/service.py's VersionReused, relayed by the ClientApp
            reason = (
                "<class 'RuntimeError'>:<'node agent refused /internal/deploy: 409 "
                f'{{"error": {{"message": "version {version} is installed here with sha256 {known[:12]}, '
                f'not {sha256[:12]}", "code": "version_reused"}}}}\'>'
            )
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        self.installed[version] = sha256
        return super().evaluate(msg, server_round)

    def update_for(self, server_round: int) -> wire.Arrays:
        """Other weights in every run: the run's name is in the seed (a restored coordinator trains anew)."""
        arrays = super().update_for(server_round)
        salt = int(hashlib.sha256(self.run.encode()).hexdigest()[:6], 16) / 2**24
        return {k: v + np.float32(salt) for k, v in arrays.items()}

    def train(self, msg: Message, server_round: int) -> Message:
        self.run = str(msg.content.config_records[records.CONFIG]["run-name"])
        return super().train(msg, server_round)


def _installing(**flags: Any) -> dict[int, InstallingSite]:
    return {n: InstallingSite(**{**vars(s), **flags}) for n, s in _sites().items()}


def _restored_from_an_old_backup(tmp_path: Path, sites: dict[int, InstallingSite]) -> AdapterRegistry:
    """Two rounds deployed everywhere, then the registry goes back to a backup taken after the first."""
    first = run_federation(InProcessGrid(dict(sites)), _run_config(tmp_path, run_name="first"))
    assert first["status"] == "finished" and [r["version"] for r in first["rounds"]] == ["global-v0001", "global-v0002"]
    assert all(set(s.installed) == {"global-v0001", "global-v0002"} for s in sites.values())
    registry = AdapterRegistry(tmp_path / "registry")
    shutil.rmtree(registry.root / "global-v0002")  # made after the backup: lost with the primary
    return registry


def test_a_restored_registry_numbers_past_the_sites_latest_version_and_every_site_deploys(tmp_path: Path) -> None:
    sites = _installing()
    registry = _restored_from_an_old_backup(tmp_path, sites)
    lost_sha = {s.installed["global-v0002"] for s in sites.values()}

    summary = run_federation(InProcessGrid(dict(sites)), _run_config(tmp_path, run_name="second", num_rounds=1))
    assert summary["status"] == "finished", summary.get("error")
    (rec,) = summary["rounds"]
    assert rec["version"] == "global-v0003" and rec["deploy_refused"] == {}
    assert rec["eval_loss"] == {s.name: s.eval_loss for s in sites.values()}
    assert registry.versions() == ["global-v0001", "global-v0003"]  # global-v0002 never comes back
    for site in sites.values():
        assert site.installed["global-v0003"] == rec["sha256"]
        assert {site.installed["global-v0002"]} == lost_sha  # the lost round's version untouched at every site


def test_a_round_whose_version_every_site_refuses_fails_the_run(tmp_path: Path) -> None:
    """Sites that do not report their latest version (older nodes): the restored registry reuses a number,
    every site refuses it, and the run fails naming them instead of finishing with no eval loss."""
    sites = _installing(reports_latest=False)
    _restored_from_an_old_backup(tmp_path, sites)

    summary = run_federation(InProcessGrid(dict(sites)), _run_config(tmp_path, run_name="second", num_rounds=2))
    assert summary["status"] == "failed"
    error = summary["error"]
    assert "\n" not in error
    assert (
        error.startswith("round 1 made global-v0002 (sha256 ")
        and "every site that answered refused to deploy it" in error
    )
    for node, site in sites.items():
        assert f"{site.name} (node-{node}): " in error
    assert error.count("is installed here with sha256") == 3 and error.endswith("later rounds not started")
    (rec,) = summary["rounds"]  # round 2 never started: nothing trained or charged for it
    assert rec["eval_loss"] == {} and sorted(rec["deploy_refused"]) == [
        f"{s.name} (node-{n})" for n, s in sites.items()
    ]
    assert all(s.trained == [1, 2, 1] for s in sites.values())


def test_one_site_refusing_the_version_does_not_fail_the_run(tmp_path: Path) -> None:
    sites = _installing()
    sites[22].installed["global-v0001"] = "0" * 64  # site-b holds global-v0001 with other weights (and says so)
    sites[22].reports_latest = False
    summary = run_federation(InProcessGrid(dict(sites)), _run_config(tmp_path, num_rounds=1))
    assert summary["status"] == "finished"
    (rec,) = summary["rounds"]
    assert rec["version"] == "global-v0001" and list(rec["deploy_refused"]) == ["site-b (node-22)"]
    assert "version_reused" in rec["deploy_refused"]["site-b (node-22)"]
    assert rec["eval_loss"] == {"site-a": 1.25, "site-c": 1.75}


def test_sites_gone_at_deployment_are_not_counted_as_refusing(tmp_path: Path) -> None:
    """A site that went offline after training (the SuperLink answers for it) refused nothing: the one site
    that answered and deployed carries the round."""
    sites = _installing()
    sites[22].installed["global-v0001"] = "0" * 64
    sites[22].reports_latest = False

    def gone(msg: Message, server_round: int) -> None:
        sites[33].alive = False  # no reply, and the SuperLink answers NODE_UNAVAILABLE for it (mode offline)

    sites[33].mode = "offline"
    sites[33].bad_rounds = set()  # trains like a good site
    sites[33].evaluate = gone  # type: ignore[assignment, method-assign]
    summary = run_federation(InProcessGrid(dict(sites)), _run_config(tmp_path, num_rounds=1, min_nodes=2))
    assert summary["status"] == "finished", summary.get("error")
    assert list(summary["rounds"][0]["deploy_refused"]) == ["site-b (node-22)"]
    assert summary["rounds"][0]["eval_loss"] == {"site-a": 1.25}
