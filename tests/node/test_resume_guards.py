"""What a node refuses when a coordinator resumes after a crash: a (run, round) charged already, and a
version number reused for other weights. Both before anything is charged or installed, and audited."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation.protocol import wire
from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.service import AlreadyCharged, NodeService, VersionReused
from tests.node.tiny_service import tiny_service

N_TRAIN = 8


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeService:
    return tiny_service(tiny_model_dir, site_data_dir, tmp_path_factory.mktemp("resume"), n_train=N_TRAIN, n_eval=2)


def _config(server_round: int, *, run_id: str, run_key: str = "") -> dict[str, Any]:
    run = RunSettings(num_rounds=3, batch_size=N_TRAIN, learning_rate=1e-2, budget_share=1.0)
    return dict(TrainInstruction(run=run, server_round=server_round, run_id=run_id, run_key=run_key).to_config_record())


def _actions(service: NodeService) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.audit.path.read_text().splitlines()]


def test_a_resumed_run_is_charged_under_its_run_key_and_never_twice_for_one_round(service: NodeService) -> None:
    service.train(None, _config(2, run_id="1001", run_key="1000"))  # the crashed submission's round 2
    (entry,) = [e for e in service.ledger.entries() if e.kind == "round"]
    assert (entry.run_id, entry.round) == ("1000", 2)  # the run's key, not the submission's Flower run id
    # the resumed submission (a new Flower run id) asks for round 2 again: "no" at readiness, refused at train
    answer = service.readiness(_config(2, run_id="1002", run_key="1000"))
    assert not answer.ready and "charged here already" in answer.reason
    with pytest.raises(AlreadyCharged, match="round 2 of run 1000 was charged here already"):
        service.train(None, _config(2, run_id="1002", run_key="1000"))
    assert len([e for e in service.ledger.entries() if e.kind == "round"]) == 1  # nothing charged
    refused = [r for r in _actions(service) if r["action"] == "train.refused"]
    assert [r["details"].get("stage") for r in refused[-2:]] == ["readiness", None]
    assert service.readiness(_config(3, run_id="1002", run_key="1000")).ready  # the next round is fine


def test_a_version_number_is_never_reinstalled_with_other_weights(service: NodeService) -> None:
    rng = np.random.default_rng(5)
    like = service.host.initial_arrays()
    first = {k: rng.normal(0.0, 0.01, v.shape).astype(np.float32) for k, v in like.items()}
    other = {k: rng.normal(0.0, 0.01, v.shape).astype(np.float32) for k, v in like.items()}
    service.deploy("global-v0007", wire.sha256_of(first), first)
    again = service.deploy("global-v0007", wire.sha256_of(first), first)  # the same weights: idempotent
    assert again["sha256"] == wire.sha256_of(first)
    with pytest.raises(VersionReused, match="installed here with sha256"):
        service.deploy("global-v0007", wire.sha256_of(other), other)
    assert service.host.adapters["global-v0007"].sha256 == wire.sha256_of(first)
    assert _actions(service)[-1]["action"] == "deploy.refused"
