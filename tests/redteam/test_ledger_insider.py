"""Issue 14, findings 1 and 2, against a real node agent: an insider resets the site's privacy ledger.

Before: `rm state/ledger.sqlite` and a restart gave a node at "epsilon spent 0.0000" that trained
the same hospital's data at the full budget again; deleting the last row and resetting the head
in `meta` (or editing a noise multiplier and re-chaining) was accepted too. Now the ledger's
genesis commits budget, delta and the data's fingerprint, the audit trail records every charge
(seq, hash, epsilon) and each entry cites the audit record it followed; at start-up the node holds
the two against each other. It still starts and serves, but `/internal/train` answers 409 with
the one-line reason, recorded in the audit trail, and `fedseek budget` shows the same reason.

The agent is `fedseek node start` as its own process (tests/redteam/node_agent.py), trained the
way its ClientApp calls it (`node.client_app.agent_client`: the site's certificate and agent token).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.client_app import CONFIG_HEADER, REPORT_HEADER, agent_client
from privacy.ledger import PrivacyLedger
from tests.privacy.insider import delete_last_row, rechain
from tests.redteam.node_agent import Agent, node_agent

pytestmark = pytest.mark.e2e

N_TRAIN = 48  # tests/conftest.py's site dataset: one batch, one DP step per round


def _train(agent: Agent, *, run_id: str, server_round: int, num_rounds: int) -> httpx.Response:
    """POST /internal/train as the site's ClientApp does: its node certificate, the agent token, the round's config."""
    run = RunSettings(num_rounds=num_rounds, batch_size=N_TRAIN)  # the run may spend half of the budget
    config: dict[str, Any] = dict(TrainInstruction(run=run, server_round=server_round).to_config_record())
    config["run-id"] = run_id
    node_config = {
        "agent-url": agent.url,
        "agent-token-file": str(agent.layout.agent_token),
        "agent-ca": str(agent.pki_dir / "ca" / "ca.pem"),
        "agent-cert": str(agent.pki_dir / "site-a" / "cert.pem"),
        "agent-key": str(agent.pki_dir / "site-a" / "key.pem"),
    }
    with agent_client(node_config, timeout=300) as http:
        return http.post("/internal/train", content=b"", headers={CONFIG_HEADER: json.dumps(config)})


def _serves(agent: Agent) -> None:
    with agent.client() as app:
        r = app.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Fever and cough?"}], "max_tokens": 2},
            headers={"authorization": f"Bearer {agent.key}"},
        )
    assert r.status_code == 200, r.text


def _budget_cli(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", "budget", "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _refused_after_restart(agent: Agent, reason: str) -> str:
    """The restarted node serves, refuses to train with `reason` (409), and its audit trail says so."""
    _serves(agent)
    before = agent.layout.ledger.read_bytes()
    r = _train(agent, run_id="after", server_round=1, num_rounds=1)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "LedgerMismatch" and error["message"].startswith(reason), error
    message = str(error["message"])
    assert "\n" not in message
    audit = agent.audit()
    assert [a for a in audit if a["action"] == "ledger.mismatch"][-1]["details"]["error"] == message  # at start-up
    # the run's one record is the refusal: nothing charged (a `ledger.charge` would name the run too)
    assert [(a["action"], a["details"].get("error")) for a in agent.audit_of("after")] == [("train.refused", message)]
    assert agent.layout.ledger.read_bytes() == before
    return message


def test_deleted_ledger_refuses_training_but_the_node_serves(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path
) -> None:
    """Finding 1: `rm state/ledger.sqlite` and restart no longer gives the site a fresh budget."""
    kw = {"pki_dir": pki_dir, "model_dir": tiny_model_dir, "data_dir": site_data_dir}
    with node_agent(tmp_path, **kw) as agent:  # type: ignore[arg-type]
        r = _train(agent, run_id="before", server_round=1, num_rounds=1)
        assert r.status_code == 200, r.text
        spent = float(json.loads(r.headers[REPORT_HEADER])["epsilon"])
        assert spent > 0.4  # the run's half of the budget, in one round
        assert agent.stop() == 0
    ledger = agent.layout.ledger
    for path in (ledger, ledger.with_name(ledger.name + "-wal"), ledger.with_name(ledger.name + "-shm")):
        path.unlink(missing_ok=True)  # the insider
    with node_agent(tmp_path, **kw) as agent:  # type: ignore[arg-type]
        message = _refused_after_restart(
            agent, f"ledger missing: the audit trail records 1 training round spending epsilon {spent:.4f}"
        )
        assert "holds none of them" in message
    cli = _budget_cli(agent.layout.root)
    assert cli.returncode == 1, cli.stderr
    assert "epsilon spent 0.0000" in cli.stdout  # the fresh ledger, but no longer taken at its word:
    assert cli.stdout.splitlines()[-1] == f"TRAINING REFUSED: {message}"


@pytest.mark.parametrize("tamper", ["last row deleted, head reset", "noise multiplier edited, re-chained"])
def test_rechained_ledger_refuses_training_but_the_node_serves(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path, tamper: str
) -> None:
    """Finding 2: an edit the ledger's own chain check accepts is caught by the audit trail's record of it."""
    kw = {"pki_dir": pki_dir, "model_dir": tiny_model_dir, "data_dir": site_data_dir}
    with node_agent(tmp_path, **kw) as agent:  # type: ignore[arg-type]
        for server_round in (1, 2):
            r = _train(agent, run_id="before", server_round=server_round, num_rounds=2)
            assert r.status_code == 200, r.text
        assert agent.stop() == 0
    ledger = agent.layout.ledger
    if tamper.startswith("last row"):
        delete_last_row(ledger)
        reason = "ledger entries missing: the audit trail records 2 training rounds"
    else:
        noise = PrivacyLedger.open_existing(ledger).entries()[0].noise_multiplier
        rechain(ledger, entries={1: {"noise_multiplier": noise * 10}})
        reason = "ledger entry 1 differs from the audit trail's record of it"
    with node_agent(tmp_path, **kw) as agent:  # type: ignore[arg-type]
        message = _refused_after_restart(agent, reason)
    cli = _budget_cli(agent.layout.root)
    assert cli.returncode == 1 and cli.stdout.splitlines()[-1] == f"TRAINING REFUSED: {message}", cli
