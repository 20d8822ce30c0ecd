"""Issue 16, data minimisation: a node on the real tiny model, with data below k, built as `fedseek node start`
builds one (`node.build.load_site_data`, then `assemble_node`).

The demo's records are unique by age, postcode and sex (k = 1): the node generalises them to the site's k,
trains a round on what is left and audits the report (`data.minimised`). A batch too small to ever reach
k is refused: the node serves, every round is refused (409, `train.refused`) with the reason, and the
records it holds do not show their postcodes either.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from federation.protocol.config import NodeConfig
from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.api import create_app
from node.build import assemble_node, load_site_data
from node.client_app import CONFIG_HEADER
from node.engine import ModelHost
from node.minimise import MinimisedSiteData
from node.model import load_model
from node.service import NodeService
from privacy.consistency import LedgerMismatch
from privacy.kanonymity import KAnonymityRefused
from tests.node.peers import as_peer, policy_for

N_TRAIN = 48  # the conftest's site data: the demo's records (tests/conftest.py), with their dataset.json


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    model, tok = load_model(tiny_model_dir)
    return ModelHost(model, tok, model_name=tiny_model_dir.name)


def round_config() -> Any:
    run = RunSettings(num_rounds=1, batch_size=16, learning_rate=1e-2)
    return TrainInstruction(run=run, server_round=1, run_id="run-k").to_config_record()


def start(host: ModelHost, data_dir: Path, state: Path) -> NodeService:
    config = NodeConfig(
        name="site-a", model_dir="unused", data_dir=str(data_dir), state_dir=str(state), pki_dir=str(state / "pki")
    )
    train, eval_data = load_site_data(config, host.tokenizer)
    return assemble_node(config, host, train=train, eval_data=eval_data)


def audit_records(service: NodeService, action: str) -> list[dict[str, Any]]:
    lines = service.audit.path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["action"] == action]


def trained_text(service: NodeService) -> list[str]:
    return [service.host.tokenizer.decode(e.input_ids) for e in service.train_data]


def site_copy(site_data_dir: Path, to: Path, *, n_train: int | None = None) -> Path:
    """The demo site's data directory, its training file cut to `n_train` records."""
    shutil.copytree(site_data_dir, to)
    if n_train is not None:
        lines = (to / "train.jsonl").read_text().splitlines(keepends=True)
        (to / "train.jsonl").write_text("".join(lines[:n_train]))
    return to


def originals(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line)["meta"] for line in (data_dir / "train.jsonl").read_text().splitlines()]


def test_data_below_k_is_generalised_audited_and_trained_on(
    host: ModelHost, site_data_dir: Path, tmp_path: Path
) -> None:
    data_dir = site_copy(site_data_dir, tmp_path / "data")
    metas = originals(data_dir)
    declared = json.loads((data_dir / "dataset.json").read_text())["quasi_identifiers"]
    assert declared == ["age", "postcode", "sex"]
    as_collected = Counter(tuple(m[c] for c in declared) for m in metas)
    assert min(as_collected.values()) < 5  # below the site's k (5) as collected

    service = start(host, data_dir, tmp_path / "state")
    assert isinstance(service.train_data, MinimisedSiteData) and service.ledger_refusal is None
    [minimised] = audit_records(service, "data.minimised")
    report = minimised["details"]
    assert report["partition"] == "train.jsonl" and report["sha256"] == service.train_data.fingerprints[0]
    assert report["k"] == 5 and report["k_before"] < 5 <= report["k_achieved"]
    assert report["records_in"] == N_TRAIN and report["records_out"] == len(service.train_data)
    assert report["suppressed"] == N_TRAIN - len(service.train_data) <= 0.1 * N_TRAIN
    changed = {c["column"] for c in report["columns"] if c["level"] > 0}
    assert changed, report

    # what the node holds and trains on shows no original postcode or age where those were generalised
    texts = trained_text(service)
    for meta in metas:
        for text in texts:
            if "postcode" in changed:
                assert f"postcode {meta['postcode']}" not in text
            if "age" in changed:
                assert not re.search(rf"(?<![\w-]){meta['age']}-year-old", text)

    result = service.train(None, round_config())
    assert result.report.num_examples == len(service.train_data)
    [trained] = audit_records(service, "train")
    assert trained["details"]["round"] == 1
    assert service.audit.path.read_text().index("data.minimised") < service.audit.path.read_text().index('"train"')


def test_a_batch_that_can_never_reach_k_is_refused_with_the_reason(
    host: ModelHost, site_data_dir: Path, tmp_path: Path
) -> None:
    data_dir = site_copy(site_data_dir, tmp_path / "data", n_train=3)  # 3 records: k = 5 is out of reach
    service = start(host, data_dir, tmp_path / "state")
    assert service.ledger_refusal is not None and "cannot be made 5-anonymous" in service.ledger_refusal
    [refused_at_start] = audit_records(service, "data.refused")
    assert "cannot be made 5-anonymous" in refused_at_start["details"]["error"]

    ready = service.readiness(round_config())
    assert not ready.ready and "5-anonymous" in ready.reason
    with pytest.raises(KAnonymityRefused, match="cannot be made 5-anonymous") as caught:
        service.train(None, round_config())
    # its own reason and code, not a ledger mismatch: an operator fixes the data, not the ledger
    assert caught.value.http_status == 409 and caught.value.code == "k_anonymity_not_met"
    assert not isinstance(caught.value, LedgerMismatch)
    # and so over the agent's API, as the ClientApp relays it to the coordinator
    client = TestClient(create_app(service, access=policy_for(service)), raise_server_exceptions=False)
    headers = {"authorization": f"Bearer {service.token}", **as_peer("site-a", "node")}
    answer = client.post("/internal/train", headers={**headers, CONFIG_HEADER: json.dumps(dict(round_config()))})
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert error["code"] == "k_anonymity_not_met" and "cannot be made 5-anonymous" in error["message"]
    refusals = audit_records(service, "train.refused")
    assert len(refusals) == 3 and all("5-anonymous" in r["details"]["error"] for r in refusals)
    assert service.ledger.entries() == [] and audit_records(service, "train") == []  # nothing charged or trained

    # held, never trained on, and even so only in the most general form three records allow
    texts = trained_text(service)
    for meta in originals(data_dir):
        assert all(f"postcode {meta['postcode']}" not in text for text in texts)


def test_a_site_policy_of_k_1_changes_nothing(host: ModelHost, site_data_dir: Path, tmp_path: Path) -> None:
    data_dir = site_copy(site_data_dir, tmp_path / "data", n_train=12)
    config = NodeConfig(
        name="site-a",
        model_dir="unused",
        data_dir=str(data_dir),
        state_dir=str(tmp_path / "state"),
        pki_dir=str(tmp_path / "pki"),
        k_anonymity=1,
    )
    train, _ = load_site_data(config, host.tokenizer)
    assert isinstance(train, MinimisedSiteData)
    [part] = train.minimisation
    assert not part.report.changed and part.refusal is None and len(train) == 12
