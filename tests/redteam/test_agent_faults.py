"""Issue 15, findings 3 and 4, real processes: one `fedseek node start` (its stunnel sidecar, its
SuperNode and app guard in their namespace under the launcher), started as `fedseek demo` starts
its agents (`Managed`), with no coordinator behind it.

3. Before: killing the site's SuperNode 6 times in a minute made the agent give up and exit, taking
   the OpenAI API down. Now the SuperNode is restarted with a capped back-off for ever; federation
   is `degraded` meanwhile (`/v1/admin/federation`, node.json) and serving never stops.
4. Before: a killed agent was left a zombie and its ClientApp orphaned. Now every `Managed` child is
   reaped when it dies, and nothing the agent started outlives it (PDEATHSIG to its children, the
   launcher a subreaper that ends whatever is left under it).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from federation.ops.layout import NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from federation.security import pki
from tests.redteam.procnet import process_tree, running, started

pytestmark = pytest.mark.e2e

READY_S = 240.0


@dataclass
class Site:
    proc: Managed
    url: str
    layout: NodeLayout
    pki_dir: Path
    config: Path

    def client(self, party: str) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca" / "ca.pem"))
        ctx.load_cert_chain(str(self.pki_dir / party / "cert.pem"), str(self.pki_dir / party / "key.pem"))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=60)


@pytest.fixture(scope="module")
def admin_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A consortium with site-a and an operator holding an `admin` certificate."""
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root, consortium="fedseek-faults")
    pki.issue(root, "coordinator", role="coordinator")
    pki.issue(root, "site-a", role="node")
    pki.issue(root, "operator", role="admin")
    return root


@pytest.fixture
def site(tmp_path: Path, admin_pki: Path, tiny_model_dir: Path, site_data_dir: Path) -> Iterator[Site]:
    path = _config(tmp_path, admin_pki, tiny_model_dir, site_data_dir)
    proc = _agent(path, tmp_path / "agent.log")
    layout = NodeLayout(tmp_path / "state")
    try:
        url = _ready(proc, layout)
        with layout.access_policy.open("a") as policy:  # the site lists its operator (node/policy.py)
            policy.write("g, operator, site-a\n")
        yield Site(proc, url, layout, admin_pki, path)
    finally:
        proc.stop(timeout=60)


def _config(tmp_path: Path, admin_pki: Path, tiny_model_dir: Path, site_data_dir: Path) -> Path:
    conf = cfg.NodeConfig(
        name="site-a",
        model_dir=str(tiny_model_dir),
        data_dir=str(site_data_dir),
        state_dir=str(tmp_path / "state"),
        pki_dir=str(admin_pki),
        coordinator=f"127.0.0.1:{free_port()}",  # nobody there: the SuperNode keeps retrying
        api_port=free_port(),
        pki_poll_seconds=1.0,
    )
    return cfg.save(conf, tmp_path / "node.json")


def _agent(config: Path, log: Path) -> Managed:
    """`fedseek node start --config CONFIG`, started as the demo starts its agents."""
    return Managed(
        name="agent",
        argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(config)],
        log_path=log,
        env={"OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"},
    ).start()


def _ready(proc: Managed, layout: NodeLayout) -> str:
    """Wait for the node.json that `proc` wrote (not one a killed agent left); its API URL."""
    deadline = time.monotonic() + READY_S
    while True:
        assert proc.alive(), f"agent exited:\n{proc.log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"agent not ready:\n{proc.log_path.read_text()[-3000:]}"
        try:
            info = json.loads(layout.endpoints.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            return str(info["openai"])
        time.sleep(0.3)


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _supernode(agent: int, *, not_in: set[int], timeout: float) -> int:
    """A (new) flower-supernode in the agent's tree."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in process_tree(agent):
            if pid not in not_in and any(a.endswith("flower-supernode") for a in _argv(pid)[:2]):
                return pid
        time.sleep(0.3)
    raise AssertionError(f"no new flower-supernode under the agent within {timeout:.0f}s")


def _federation(site: Site) -> dict[str, object]:
    with site.client("operator") as client:
        response = client.get("/v1/admin/federation")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_supernode_that_keeps_dying_degrades_federation_never_serving(site: Site) -> None:
    """Finding 3: the SuperNode killed 6 times, each time as soon as it is back; the agent stays up,
    says federation is degraded (and why), keeps serving the OpenAI API, and brings the SuperNode
    back once it is left alone."""
    key = site.layout.api_key.read_text().strip()
    killed: set[int] = set()
    for _ in range(6):
        pid = _supernode(site.proc.pid, not_in=killed, timeout=150)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        assert site.proc.alive(), site.proc.log_path.read_text()[-3000:]

    deadline = time.monotonic() + 60
    while True:  # the agent has seen the 6th death
        assert site.proc.alive(), f"the agent exited:\n{site.proc.log_path.read_text()[-3000:]}"
        fed = _federation(site)
        child = dict(fed["children"])["supernode"]  # type: ignore[call-overload]
        if child["failures"] >= 6 and fed["state"] == "degraded":
            break
        assert time.monotonic() < deadline, fed
        time.sleep(0.3)
    assert fed["down"] == ["supernode"] and child["state"] == "restarting" and child["next_start_at"]
    assert json.loads(site.layout.endpoints.read_text())["federation"]["state"] == "degraded"
    with site.client("operator") as client:  # serving goes on, API key and all
        assert client.get("/healthz").status_code == 200
        models = client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200, models.text

    _supernode(site.proc.pid, not_in=killed, timeout=120)  # back after its back-off
    deadline = time.monotonic() + 60
    while _federation(site)["state"] != "ok":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert site.proc.alive()


def test_a_killed_agent_leaves_no_zombie_and_nothing_behind(site: Site) -> None:
    """Finding 4: kill -9 of the agent. It is reaped though nobody waits for it (as in the demo),
    and every process it started (the sidecar, the namespace launcher, SuperNode, app guard) ends.
    The same command on the same state then starts the site again."""
    agent = site.proc.pid
    _supernode(agent, not_in=set(), timeout=60)
    tree = {pid: started(pid) for pid in process_tree(agent) - {agent}}
    names = " ".join(" ".join(_argv(pid)[:3]) for pid in tree)
    for part in ("stunnel", "federation.ops.netns", "flower-supernode", "node.app_guard.superexec"):
        assert part in names, names
    agent_start = started(agent)
    os.kill(agent, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        left = running(tree)  # a zombie of init has ended (see `running`)
        zombie = started(agent) == agent_start
        if not left and not zombie:
            break
        assert time.monotonic() < deadline, f"left behind: {left}, agent a zombie: {zombie}"
        time.sleep(0.3)
    again = _agent(site.config, site.proc.log_path.with_name("agent-2.log"))
    try:
        url = _ready(again, site.layout)
        with site.client("operator") as client:
            assert client.get(f"{url}/healthz").status_code == 200
        assert _supernode(again.pid, not_in=set(), timeout=120)
    finally:
        again.stop(timeout=60)
