"""Red team, finding 9: state files were 0644 in 0755 directories, so any local user could read
a site's audit trail, ledger, adapters and explanations.

Now the daemons run under umask 077 and make (or tighten) their state directory 0700, and
files are written 0600 by default. After a real node agent has served a chat, an explanation
and refused a caller, and after a real coordinator has run, nothing under either state
directory is open to group or other.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from federation.ops.supervise import free_port
from federation.protocol import config as cfg
from federation.security import pki
from federation.security.site_binding import register_site_key
from tests.e2e.fleet import start_coordinator, stop
from tests.redteam.node_agent import node_agent

pytestmark = pytest.mark.e2e


def loose_entries(root: Path) -> list[str]:
    """Every file, directory or socket under `root` (itself included) that group or other may use."""
    found = []
    for top, dirs, files in os.walk(root):
        for path in [Path(top)] if Path(top) == root else []:
            found += _loose(path)
        for name in [*dirs, *files]:
            found += _loose(Path(top) / name)
    return found


def _loose(path: Path) -> list[str]:
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode) or not mode & 0o077:
        return []
    return [f"{oct(stat.S_IMODE(mode))} {path}"]


def test_node_state_is_private_after_a_run(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # an operator made it with the usual umask: the agent tightens it
    os.chmod(state, 0o755)
    with node_agent(tmp_path, pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir) as agent:
        messages = [{"role": "user", "content": "Chest pain since this morning."}]
        with agent.client() as app:
            ok = app.post(
                "/v1/chat/completions",
                json={"messages": messages, "max_tokens": 2},
                headers={"authorization": f"Bearer {agent.key}"},
            )
            assert ok.status_code == 200, ok.text
            assert app.get("/v1/models").status_code == 401  # a refusal, audited
        with agent.client("reviewer") as reviewer:
            expl = reviewer.post("/v1/explanations", json={"messages": messages, "response": "ok", "max_evals": 10})
            assert expl.status_code == 200, expl.text
        written = {p.relative_to(state).parts[0] for p in state.rglob("*")}
        assert {"audit.jsonl", "ledger.sqlite", "explanations", "site.key", "api-key"} <= written, written
        assert loose_entries(state) == []
    assert loose_entries(state) == []  # and after it stopped


def test_coordinator_state_is_private_after_a_run(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root, consortium="perm-test")
    pki.issue(root, "coordinator", role="coordinator")
    pki.issue(root, "site-x", role="node")
    register_site_key(root, "site-x")
    conf = cfg.CoordinatorConfig(
        pki_dir=str(root),
        state_dir=str(tmp_path / "coord"),
        fleet_port=free_port(),
        site_keys_dir=str(root / "site-keys"),
        pki_poll_seconds=1.0,
    )
    proc, info = start_coordinator(tmp_path, ["--config", str(cfg.save(conf, tmp_path / "coordinator.json"))])
    state = Path(str(info["state"]))
    try:
        written = {p.name for p in state.iterdir()}
        assert {"audit.jsonl", "gateway", "logs"} <= written, written
        assert loose_entries(state) == []
    finally:
        stop([proc])
    assert loose_entries(state) == []
