"""A node whose ledger disagrees with its audit trail serves, but refuses to train (issue 14, findings 1-2).

In-process: `assemble_node` holds the ledger against the audit trail once, stores the verdict on
the service, and `train` refuses with it (a 409 `LedgerMismatch`, audited as `train.refused`)
before anything is charged. The real-process version is tests/redteam/test_ledger_insider.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from federation.protocol.config import NodeConfig
from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.build import assemble_node
from node.data import TokenizedExample, load_jsonl, tokenize
from node.engine import ModelHost
from node.model import load_model
from node.service import NodeService
from privacy.consistency import LedgerMismatch


def round_config(run_id: str) -> ConfigRecord:
    return TrainInstruction(run=RunSettings(num_rounds=2, batch_size=8), run_id=run_id).to_config_record()


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    model, tok = load_model(tiny_model_dir)
    return ModelHost(model, tok, model_name=tiny_model_dir.name)


@pytest.fixture(scope="module")
def train(host: ModelHost, site_data_dir: Path) -> list[TokenizedExample]:
    return tokenize(load_jsonl(site_data_dir / "train.jsonl"), host.tokenizer)[:8]


@pytest.fixture
def nodes() -> Iterator[list[NodeService]]:
    """Services assembled by a test over one state directory, their serving engines stopped afterwards."""
    made: list[NodeService] = []
    yield made
    for service in made:
        service.serving.close()


def _assemble(
    nodes: list[NodeService], host: ModelHost, train: list[TokenizedExample], state: Path, **kw: str
) -> NodeService:
    config = NodeConfig(name="site-a", model_dir="unused", data_dir="unused", state_dir=str(state), pki_dir="unused")
    service = assemble_node(config, host, train=train, eval_data=train[:2], **kw)  # type: ignore[arg-type]
    nodes.append(service)
    return service


def _audit(service: NodeService) -> list[dict[str, object]]:
    return [json.loads(line) for line in service.audit.path.read_text().splitlines()]


def test_deleted_ledger_refuses_training_not_serving(
    nodes: list[NodeService], host: ModelHost, train: list[TokenizedExample], tmp_path: Path
) -> None:
    first = _assemble(nodes, host, train, tmp_path)
    assert first.ledger_refusal is None
    spent = first.train(None, round_config("r1")).report.epsilon
    assert _assemble(nodes, host, train, tmp_path).ledger_refusal is None  # an honest restart
    first.layout.ledger.unlink()

    node = _assemble(nodes, host, train, tmp_path)
    reason = f"ledger missing: the audit trail records 1 training round spending epsilon {spent:.4f}"
    assert node.ledger_refusal is not None and node.ledger_refusal.startswith(reason)
    assert _audit(node)[-1]["action"] == "ledger.mismatch"  # said once, at start-up
    with pytest.raises(LedgerMismatch, match=f"^{re.escape(reason)}") as info:
        node.train(None, round_config("r2"))
    assert info.value.http_status == 409
    last = _audit(node)[-1]
    assert (last["action"], last["resource"]) == ("train.refused", "r2")
    assert node.ledger.entries() == []  # nothing charged
    assert node.status()["privacy"]["training_refused"] == node.ledger_refusal
    messages = [{"role": "user", "content": "hi"}]
    generation, _, _ = node.chat(messages, model=None, actor="t", max_tokens=2, ignore_eos=True)
    assert generation.completion_tokens == 2  # it still serves


def test_changed_training_data_refuses_training(
    nodes: list[NodeService], host: ModelHost, train: list[TokenizedExample], tmp_path: Path
) -> None:
    _assemble(nodes, host, train, tmp_path, dataset_sha256="sha256:" + "a" * 64)
    node = _assemble(nodes, host, train, tmp_path, dataset_sha256="sha256:" + "b" * 64)
    assert node.ledger_refusal is not None and node.ledger_refusal.startswith("training data changed")
    with pytest.raises(LedgerMismatch, match=r"^training data changed"):
        node.train(None, round_config("r1"))
    assert node.ledger.entries() == []
