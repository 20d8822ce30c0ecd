"""Issue 14, finding 3, at the node: runs spend a share of what remains; a spent budget stops training only.

Before, a run could spend everything that remained (the demo left every site at epsilon 0.999
of 1.0, so a second run could not train), and a node whose budget was spent refused to start,
taking its inference API with it. Now a run spends `RunSettings.budget_share` (default 0.5) of
what remained at its start, the readiness query (`NodeService.readiness`) answers without
charging, and a node on a spent ledger builds, serves and refuses each training round.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord

from federation.protocol.config import NodeConfig
from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.build import assemble_node
from node.data import TokenizedExample, load_jsonl, tokenize
from node.engine import ModelHost
from node.model import load_model
from node.service import NodeService
from node.serving import SamplingParams
from privacy.ledger import BudgetExceeded

N_TRAIN = 16


def _config(server_round: int, num_rounds: int, *, run_id: str, **run: Any) -> ConfigRecord:
    """A train message's config as the ClientApp relays it (sample rate 1: one DP step per round)."""
    settings = RunSettings(num_rounds=num_rounds, batch_size=N_TRAIN, learning_rate=1e-2, **run)
    return TrainInstruction(run=settings, server_round=server_round, run_id=run_id).to_config_record()


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    model, tok = load_model(tiny_model_dir)
    return ModelHost(model, tok, model_name=tiny_model_dir.name)


@pytest.fixture(scope="module")
def data(host: ModelHost, site_data_dir: Path) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    train = tokenize(load_jsonl(site_data_dir / "train.jsonl"), host.tokenizer)[:N_TRAIN]
    return train, tokenize(load_jsonl(site_data_dir / "eval.jsonl"), host.tokenizer)[:2]


def _node(host: ModelHost, data: tuple[list[TokenizedExample], list[TokenizedExample]], state: Path) -> NodeService:
    config = NodeConfig(name="site-a", model_dir="unused", data_dir="unused", state_dir=str(state), pki_dir="unused")
    return assemble_node(config, host, train=list(data[0]), eval_data=list(data[1]))


def _run(node: NodeService, run_id: str, rounds: int, **run: Any) -> list[float]:
    """Every round of a run, each starting from the last; the site's epsilon after each."""
    arrays = None
    spent: list[float] = []
    for r in range(1, rounds + 1):
        result = node.train(arrays, _config(r, rounds, run_id=run_id, **run))
        arrays = result.arrays
        spent.append(result.report.epsilon)
    return spent


def _records(node: NodeService) -> list[dict[str, Any]]:
    return [json.loads(line) for line in node.audit.path.read_text().splitlines() if line.strip()]


def test_two_runs_in_sequence_both_train_and_stay_within_the_budget(
    host: ModelHost, data: tuple[list[TokenizedExample], list[TokenizedExample]], tmp_path: Path
) -> None:
    """What a second `fedseek demo` on the same state does at each site: both runs train."""
    node = _node(host, data, tmp_path / "state")
    first = _run(node, "demo-1", 2)
    assert 0.45 <= first[-1] <= 0.5  # the default share: half of the lifetime epsilon 1.0
    assert node.readiness(_config(1, 2, run_id="demo-2")).ready  # the next run may train
    second = _run(node, "demo-2", 2)
    assert first[-1] < second[0] < second[-1] <= first[-1] + 0.5 * (1.0 - first[-1]) + 1e-9
    assert second[-1] >= 0.7 and node.ledger.spent() <= 1.0
    assert [(e.run_id, e.status) for e in node.ledger.entries()] == [
        ("demo-1", "completed"),
        ("demo-1", "completed"),
        ("demo-2", "completed"),
        ("demo-2", "completed"),
    ]


def test_readiness_answers_yes_without_charging_or_writing(
    host: ModelHost, data: tuple[list[TokenizedExample], list[TokenizedExample]], tmp_path: Path
) -> None:
    node = _node(host, data, tmp_path / "state")
    ledger, audit = node.layout.ledger.read_bytes(), node.audit.path.read_bytes()
    answer = node.readiness(_config(1, 2, run_id="r"))
    assert (answer.site, answer.ready, answer.reason) == ("site-a", True, "")
    assert (answer.epsilon_spent, answer.epsilon_remaining) == (0.0, 1.0)
    assert node.layout.ledger.read_bytes() == ledger and node.audit.path.read_bytes() == audit


def test_spent_budget_refuses_training_and_nothing_else(
    host: ModelHost, data: tuple[list[TokenizedExample], list[TokenizedExample]], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    spent = _run(_node(host, data, state), "all-of-it", 1, budget_share=1.0)[-1]
    assert spent >= 0.99

    node = _node(host, data, state)  # a restart on the spent ledger builds: it serves
    prep = node.serving.prepare([{"role": "user", "content": "Chest pain?"}], None)
    generation, _ = node.serving.complete(prep, SamplingParams(max_tokens=2), actor="app")
    assert generation.completion_tokens >= 1

    ledger = hashlib.sha256(node.layout.ledger.read_bytes()).hexdigest()
    answer = node.readiness(_config(1, 2, run_id="next"))
    assert not answer.ready and answer.reason.startswith("privacy budget exhausted for this site")
    assert "\n" not in answer.reason and answer.epsilon_remaining < 0.01
    declined = _records(node)[-1]
    assert declined["action"] == "train.refused" and declined["resource"] == "next"
    assert declined["details"] == {"round": 1, "error": answer.reason, "stage": "readiness"}

    with pytest.raises(BudgetExceeded, match=r"^privacy budget exhausted for this site"):
        node.train(None, _config(1, 2, run_id="next"))
    refused = _records(node)[-1]
    assert refused["action"] == "train.refused" and "privacy budget exhausted" in refused["details"]["error"]
    assert hashlib.sha256(node.layout.ledger.read_bytes()).hexdigest() == ledger  # nothing charged
    assert node.state.rounds_trained == 0


def test_a_run_whose_share_is_spent_is_not_ready_but_the_next_run_is(
    host: ModelHost, data: tuple[list[TokenizedExample], list[TokenizedExample]], tmp_path: Path
) -> None:
    node = _node(host, data, tmp_path / "state")
    _run(node, "r1", 1)  # a 1-round run spends its whole share (0.5) in its one round
    # The same run asked for one more round (round 2, as a run resumed with more rounds would): not a round
    # charged already (that is `AlreadyCharged`'s refusal), but its share is gone.
    again = node.readiness(_config(2, 2, run_id="r1"))
    assert not again.ready and again.reason.startswith("this run's share (0.5) of the privacy budget is spent")
    assert node.readiness(_config(1, 1, run_id="r2")).ready
