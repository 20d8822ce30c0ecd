"""Red team, finding 8: what a node keeps about a prompt.

Before: audit records held `sha256(messages)`, unsalted, so a prompt built from a few fields
(age, sex, postcode, a diagnosis) was recovered by hashing every combination; and explanation
files stored the prompt in clear. Now digests are HMAC-SHA256 under a per-site secret
(`state/site.key`, 0600, made on first start) and explanations are sealed (AES-256-GCM) at
rest, opened only for a reviewer through the API.

Against the real node agent: a chat completion (API key) and an explanation (reviewer
certificate), then every file under the state directory is searched.
"""

from __future__ import annotations

import hashlib
import html
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.redteam.node_agent import Agent, node_agent

pytestmark = pytest.mark.e2e

# A note a dictionary attack would enumerate: age, sex, postcode, one finding.
PROMPT = "Patient 67 y, female, postcode 8047, Kussmaul breathing. Which department?"
MARKERS = ("Kussmaul", "postcode 8047", PROMPT)
RESPONSE = "cardiology"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def used(
    tmp_path_factory: pytest.TempPathFactory, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path
) -> Iterator[tuple[Agent, dict[str, Any]]]:
    """An agent after one chat and one explanation of the same prompt."""
    root = tmp_path_factory.mktemp("redteam-records")
    with node_agent(root, pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir) as agent:
        messages = [{"role": "user", "content": PROMPT}]
        with agent.client() as app:
            chat = app.post(
                "/v1/chat/completions",
                json={"messages": messages, "max_tokens": 4},
                headers={"authorization": f"Bearer {agent.key}"},
            )
        assert chat.status_code == 200, chat.text
        with agent.client("reviewer") as reviewer:
            explained = reviewer.post(
                "/v1/explanations", json={"messages": messages, "response": RESPONSE, "max_evals": 10}
            )
        assert explained.status_code == 200, explained.text
        yield agent, explained.json()


def _state_files(agent: Agent) -> list[Path]:
    return [p for p in agent.layout.root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_no_state_file_holds_the_prompt_or_its_plain_digest(used: tuple[Agent, dict[str, Any]]) -> None:
    agent, _ = used
    messages = [{"role": "user", "content": PROMPT}]
    plain = {
        _sha256(json.dumps(messages, sort_keys=True)),  # what serve and explain records held
        _sha256(PROMPT),
        _sha256(RESPONSE),
    }
    files = _state_files(agent)
    assert files
    for path in files:
        data = path.read_bytes()
        for marker in MARKERS:
            assert marker.encode() not in data, f"{path} holds the prompt ({marker!r})"
        for digest in plain:
            assert digest.encode() not in data, f"{path} holds a plain SHA-256 of the prompt or answer"


def test_audit_records_carry_keyed_digests(used: tuple[Agent, dict[str, Any]]) -> None:
    agent, _ = used
    rows = agent.audit()
    serve = [r for r in rows if r["action"] == "serve"]
    explain = [r for r in rows if r["action"] == "explain"]
    assert serve and explain
    for row in serve + explain:
        details = row["details"]
        assert len(details["prompt_hmac"]) == 64 and "prompt_sha256" not in details
    assert explain[-1]["details"]["prompt_hmac"] == serve[-1]["details"]["prompt_hmac"]  # linkable at the site
    secret = agent.layout.site_secret
    assert len(secret.read_bytes()) == 32 and secret.stat().st_mode & 0o777 == 0o600


def test_the_reviewer_still_gets_the_explanation_back(used: tuple[Agent, dict[str, Any]]) -> None:
    agent, body = used
    with agent.client("reviewer") as reviewer:
        again = reviewer.get(f"/v1/explanations/{body['id']}")
        page = reviewer.get(body["html"])
    assert again.status_code == 200 and again.json() == body
    assert "".join(body["features"]) == PROMPT  # the attribution still quotes the prompt, to the reviewer
    assert page.status_code == 200
    assert all(html.escape(f, quote=True) in page.text for f in body["features"] if f.strip())  # token by token
    with agent.client() as anonymous:
        assert anonymous.get(body["html"]).status_code == 401


def test_fedseek_audit_verify_still_passes(used: tuple[Agent, dict[str, Any]]) -> None:
    agent, _ = used
    proc = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", "audit", "verify", str(agent.layout.audit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
