"""The node refuses, before its ledger changes, a budget outside site policy, an empty dataset or a NaN loss."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from federation.protocol.config import NodeConfig
from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.build import assemble_node, site_budget
from node.data import TokenizedExample, load_jsonl, tokenize
from node.engine import ModelHost
from node.model import load_model
from node.trainer import TrainingError
from privacy.ledger import PolicyError


def round_config(*, num_rounds: int) -> ConfigRecord:
    """Round 1 of a run of `num_rounds`, batches of 8 (every record of the 8-record dataset)."""
    return TrainInstruction(run=RunSettings(num_rounds=num_rounds, batch_size=8), run_id="r").to_config_record()


def config(state: Path, **kw: object) -> NodeConfig:
    return NodeConfig(
        name="site-a", model_dir="unused", data_dir="unused", state_dir=str(state), pki_dir="unused", **kw
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "n", "reason"),
    [
        ({"epsilon": 1.5}, 100, r"epsilon 1\.5 is looser than the site's policy \(epsilon <= 1\)"),
        ({"epsilon": 3.0, "privacy_policy_epsilon": 2.0}, 100, "looser than the site's policy"),
        ({"delta": 0.01}, 100, r"delta 0\.01 must be below 1/n = 0\.01 for 100 records"),
        ({"delta": 0.5}, 100, "must be below 1/n"),
        ({}, 0, "no training records"),
    ],
)
def test_budget_outside_policy_is_refused(tmp_path: Path, kw: dict[str, object], n: int, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        site_budget(config(tmp_path, **kw), n)


def test_budget_inside_policy() -> None:
    assert site_budget(config(Path("x")), 100).delta == pytest.approx(1e-3)  # 1 / (10 n)
    assert site_budget(config(Path("x"), delta=0.0099), 100).delta == 0.0099
    loose = site_budget(config(Path("x"), epsilon=2.0, privacy_policy_epsilon=2.0), 100)
    assert (loose.epsilon, loose.accountant) == (2.0, "rdp")


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    model, tok = load_model(tiny_model_dir)
    return ModelHost(model, tok, model_name=tiny_model_dir.name)


@pytest.fixture(scope="module")
def train(host: ModelHost, site_data_dir: Path) -> list[TokenizedExample]:
    return tokenize(load_jsonl(site_data_dir / "train.jsonl"), host.tokenizer)[:8]


@pytest.mark.parametrize("case", ["over-policy", "delta-too-large", "empty-dataset"])
def test_service_refuses_before_touching_state(
    host: ModelHost, train: list[TokenizedExample], tmp_path: Path, case: str
) -> None:
    good = assemble_node(config(tmp_path / "state"), host, train=train, eval_data=train[:2])
    good.train(None, round_config(num_rounds=2))
    ledger = good.layout.ledger
    before, entries = hashlib.sha256(ledger.read_bytes()).hexdigest(), good.ledger.entries()
    bad = {
        "over-policy": (config(tmp_path / "state", epsilon=2.0), train),
        "delta-too-large": (config(tmp_path / "state", delta=1 / 8), train),
        "empty-dataset": (config(tmp_path / "state"), []),
    }[case]
    with pytest.raises(PolicyError):
        assemble_node(bad[0], host, train=bad[1], eval_data=train[:2])
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == before
    assert good.ledger.entries() == entries
    fresh = tmp_path / "fresh"
    with pytest.raises(PolicyError):
        assemble_node(config(fresh, epsilon=2.0), host, train=train, eval_data=train[:2])
    assert not fresh.exists()


def test_nan_loss_at_start_is_refused_and_nothing_charged(
    host: ModelHost, train: list[TokenizedExample], tmp_path: Path
) -> None:
    service = assemble_node(config(tmp_path / "state"), host, train=train, eval_data=train[:2])
    ledger = service.layout.ledger
    before = hashlib.sha256(ledger.read_bytes()).hexdigest()
    norm = host.peft.get_base_model().model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm[0] = float("nan")  # a broken base model: every loss is NaN
    try:
        with pytest.raises(TrainingError, match="non-finite loss before training"):
            service.train(None, round_config(num_rounds=1))
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert service.ledger.entries() == []
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == before
    assert service.state.rounds_trained == 0
