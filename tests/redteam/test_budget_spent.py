"""Red team, issue 14 finding 3, real processes: a site whose privacy budget is spent.

Before: `fedseek node start` refused to start once the ledger was (nearly) spent ("privacy
budget exhausted"), so after one demo run, which spent 0.999 of every site's lifetime epsilon,
a hospital lost its inference API for good. Now serving never depends on the training budget:
the node starts and serves, and each training round is refused (409, one line, audited
`train.refused`); the coordinator's readiness query hears "no" first, and `fedseek budget`
reports the spend as before.

The budget is spent the way a site spends it: a training round through the agent's own
`/internal/train` (as the ClientApp calls it), in a run allowed all that remained
(`budget-share` 1.0). Then the agent is stopped and started again on the same state.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation.protocol.round_settings import RunSettings, TrainInstruction
from federation.security import pki
from node.client_app import CONFIG_HEADER, agent_client
from tests.redteam.node_agent import Agent, node_agent

pytestmark = pytest.mark.e2e


def _client_app(agent: Agent) -> dict[str, Any]:
    """The ClientApp's node config for this agent: the site's own certificate and the agent token."""
    leaf = pki.load_leaf(agent.pki_dir, "site-a")
    return {
        "agent-url": agent.url,
        "agent-token-file": str(agent.layout.agent_token),
        "agent-ca": str(leaf.ca_cert),
        "agent-cert": str(leaf.cert),
        "agent-key": str(leaf.key),
    }


def _internal(agent: Agent, path: str, *, run_id: str, **run: Any) -> httpx.Response:
    """POST `path` with a train config (round 1 of a 1-round run) exactly as the ClientApp relays it."""
    instruction = TrainInstruction(run=RunSettings(num_rounds=1, **run), run_id=run_id)
    with agent_client(_client_app(agent), timeout=300) as http:
        return http.post(path, headers={CONFIG_HEADER: json.dumps(dict(instruction.to_config_record()))})


@pytest.fixture(scope="module")
def restarted(
    tmp_path_factory: pytest.TempPathFactory, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path
) -> Iterator[Agent]:
    """The agent started again on a state whose budget a first run spent."""
    root = tmp_path_factory.mktemp("redteam-budget-spent")
    with node_agent(root, pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir) as first:
        trained = _internal(first, "/internal/train", run_id="everything", budget_share=1.0)
        assert trained.status_code == 200, trained.text
    with node_agent(root, pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir) as agent:
        yield agent


def _budget(agent: Agent) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", "budget", "--state", str(agent.layout.root), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_the_node_starts_and_serves_on_a_spent_budget(restarted: Agent) -> None:
    assert restarted.proc.poll() is None
    assert "privacy budget spent" in restarted.log.read_text()  # the start says so, once
    spent = _budget(restarted)
    assert spent["epsilon_spent"] >= 0.99 * spent["budget_epsilon"]
    auth = {"authorization": f"Bearer {restarted.key}"}
    with restarted.client() as app:
        models = app.get("/v1/models", headers=auth)
        chat = app.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Chest pain, 54 y. Which department?"}], "max_tokens": 4},
            headers=auth,
        )
    assert models.status_code == 200, models.text
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_training_is_refused_with_one_audited_line_and_nothing_charged(restarted: Agent) -> None:
    ledger = hashlib.sha256(restarted.layout.ledger.read_bytes()).hexdigest()
    before = _budget(restarted)

    ready = _internal(restarted, "/internal/ready", run_id="next")
    assert ready.status_code == 200, ready.text
    answer = ready.json()
    assert answer["site"] == "site-a" and answer["ready"] is False
    assert answer["reason"].startswith("privacy budget exhausted for this site")

    refused = _internal(restarted, "/internal/train", run_id="next")
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "BudgetExceeded"
    assert error["message"].startswith("privacy budget exhausted for this site") and "\n" not in error["message"]

    declined, last = restarted.audit_of("next")  # the readiness answer's and the round's, nothing charged
    assert (declined["action"], declined["details"]["stage"]) == ("train.refused", "readiness")
    assert last["action"] == "train.refused" and "stage" not in last["details"]
    assert last["details"]["error"] == error["message"]
    assert hashlib.sha256(restarted.layout.ledger.read_bytes()).hexdigest() == ledger
    assert _budget(restarted) == before  # `fedseek budget` sees the same spend, entry for entry
