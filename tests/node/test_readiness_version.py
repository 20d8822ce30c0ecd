"""A node's readiness answer names the highest global version it installed, so that a coordinator restored from
an older backup numbers its next version past it rather than reusing one (coordinator/registry.py); then over
the Flower record the ClientApp relays, as the coordinator reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict

from federation.protocol import records, wire
from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.service import NodeService
from tests.node.tiny_service import tiny_service

N_TRAIN = 8


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeService:
    return tiny_service(tiny_model_dir, site_data_dir, tmp_path_factory.mktemp("latest"), n_train=N_TRAIN, n_eval=2)


def _config() -> dict[str, Any]:
    run = RunSettings(num_rounds=1, batch_size=N_TRAIN, learning_rate=1e-2)
    return dict(TrainInstruction(run=run, server_round=1, run_id="r").to_config_record())


def _deploy(service: NodeService, version: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrays = {k: rng.normal(0.0, 0.01, v.shape).astype(np.float32) for k, v in service.host.initial_arrays().items()}
    service.deploy(version, wire.sha256_of(arrays), arrays)


def test_the_readiness_answer_names_the_highest_installed_global_version(service: NodeService) -> None:
    assert service.readiness(_config()).latest_version == ""  # nothing installed yet
    _deploy(service, "global-v0002", 1)
    assert service.readiness(_config()).latest_version == "global-v0002"
    for version, seed in (("global-v0010", 2), ("global-v0009", 3), ("hotfix", 4)):  # out of order; not global
        _deploy(service, version, seed)
    answer = service.readiness(_config())
    assert answer.ready and answer.latest_version == "global-v0010"  # by number, not the last one installed
    relayed = RecordDict({records.READINESS: records.readiness_to_config(answer)})  # node/client_app.py's reply
    assert records.readiness_from_content(relayed).latest_version == "global-v0010"
