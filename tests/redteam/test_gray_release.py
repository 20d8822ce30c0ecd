"""Issue 15 finding 5 (gray release), real processes: a run's new version is a candidate, not the default.

Before: each new global version served all default traffic the moment it was deployed, before its
evaluation was known; there was no promote, rollback or canary. Now (node/release.py) a deployed
version is a candidate serving `share` of default traffic while its eval loss and error rate are
compared with the stable version's; promoted when it holds up, rolled back automatically when not;
`fedseek model list|promote|rollback|policy` for people, every step audited and shown in `/v1/models`.

One coordinator and three real node agents on the tiny model. site-c runs the test's poisoning agent
(tests/redteam/poisoning_agent.py), which scales its trained update x1e35. The honest run keeps the
default update bound, which refuses site-c's update: its version is sound. The poisoned run switches the
bound off (`--update-norm-ratio 0`, an operator's mistake), so site-c's update makes the version. Why
x1e35 and not x100: the tiny model is random, its eval loss is ln(vocabulary) ~ 11.8 whatever a LoRA
adapter does (RMSNorm bounds the logits: x100 to x1e20 moved it by < 0.05); only an overflow to NaN makes
its evaluation measurably worse. A real model's loss responds to far less; the rule is the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fedseek_examples.demo.data import write_site_dataset

from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from federation.security import pki
from node.policy import add_members
from tests.e2e.fleet import start_coordinator, stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b", "site-c")
POISONER = "site-c"
REPO = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "user", "content": "Chest pain since this morning."}], "max_tokens": 2}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """A coordinator and three sites' node agents (site-c poisons its updates), connected; an admin `operator`."""
    base = tmp_path_factory.mktemp("gray-release")
    pki_dir, state = signed_consortium(base, SITES)
    pki.issue(pki_dir, "operator", role="admin")
    fleet_port = free_port()
    procs: list[Managed] = []
    try:
        coordinator, info = start_coordinator(
            base, ["--pki", str(pki_dir), "--state", str(state), "--fleet-port", str(fleet_port)]
        )
        procs.append(coordinator)
        nodes: dict[str, Managed] = {}
        for i, site in enumerate(SITES):
            data = base / site / "data"
            write_site_dataset(data, site_index=i, n_sites=len(SITES), n_train=32, n_eval=6)
            conf = cfg.save(
                cfg.NodeConfig(
                    name=site,
                    model_dir=str(tiny_model_dir),
                    data_dir=str(data),
                    state_dir=str(base / site / "state"),
                    pki_dir=str(pki_dir),
                    coordinator=f"127.0.0.1:{fleet_port}",
                    api_port=free_port(),
                ),
                base / site / "node.json",
            )
            # The consortium's `operator` is one of this site's admins (node/policy.py: deny by default).
            add_members(NodeLayout(base / site / "state").access_policy, site=site, org=site, names=("operator",))
            agent = ["-m", "federation.cli.main", "node", "start", "--config", str(conf)]
            if site == POISONER:
                agent = ["-m", "tests.redteam.poisoning_agent", "--config", str(conf), "--factor", "1e35"]
            nodes[site] = Managed(
                name=site, argv=[sys.executable, *agent], log_path=base / site / "agent.log", cwd=REPO
            ).start()
            procs.append(nodes[site])
        urls = {}
        for site in SITES:
            urls[site] = str(wait_json(NodeLayout(base / site / "state").endpoints, nodes[site], timeout=300)["openai"])
        assert wait_activated(info, len(SITES), timeout=180), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        yield {"base": base, "state": state, "pki": pki_dir, "urls": urls}
    finally:
        stop(procs)


def fedseek(*argv: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def model_cli(env: dict[str, Any], site: str, *argv: str) -> dict[str, Any]:
    """`fedseek model ARGV --node ... --json` as the site's admin `operator`; the node's answer."""
    who = env["pki"] / "operator"
    done = fedseek(
        "model",
        *argv,
        "--node",
        env["urls"][site],
        "--ca",
        str(env["pki"] / "ca" / "ca.pem"),
        "--cert",
        str(who / "cert.pem"),
        "--key",
        str(who / "key.pem"),
        "--json",
        timeout=120,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    return dict(json.loads(done.stdout))


def app(env: dict[str, Any], site: str) -> httpx.Client:
    """The site's application, with the API key the node made on first start."""
    key = NodeLayout(env["base"] / site / "state").api_key.read_text().strip()
    ca = str(env["pki"] / "ca" / "ca.pem")
    return httpx.Client(base_url=env["urls"][site], verify=ca, headers={"authorization": f"Bearer {key}"}, timeout=120)


def cards(env: dict[str, Any], site: str) -> dict[str, dict[str, Any]]:
    with app(env, site) as client:
        return {c["id"]: c for c in client.get("/v1/models").json()["data"]}


def release_records(env: dict[str, Any], site: str) -> list[dict[str, Any]]:
    path = NodeLayout(env["base"] / site / "state").audit
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["action"].startswith("release.")]


def test_a_new_version_is_a_candidate_promoted_when_it_holds_and_rolled_back_when_not(
    consortium: dict[str, Any], tiny_model_dir: Path
) -> None:
    env, base_name = consortium, tiny_model_dir.name
    for site in SITES:  # each site chooses how its candidates are judged
        policy = model_cli(env, site, "policy", "--share", "0.5", "--min-requests", "4", "--tolerance", "0.05")
        assert policy["policy"] == {"share": 0.5, "tolerance": 0.05, "min_requests": 4, "error_margin": 0.0}

    # 1. an honest run: its version is deployed everywhere as a candidate at share 0.5
    honest = fedseek("run", "--state", str(env["state"]), "--rounds", "1", "--min-nodes", "2", "--name", "honest")
    assert honest.returncode == 0, (honest.stdout, honest.stderr)
    for site in SITES:
        seen = cards(env, site)
        assert (seen["global-v0001"]["status"], seen["global-v0001"]["share"]) == ("candidate", 0.5)
        assert (seen[base_name]["status"], seen[base_name]["share"]) == ("stable", 0.5)
        assert [r["action"] for r in release_records(env, site)][-1] == "release.candidate"
    # default traffic is split by the share; the candidate is judged after 4 requests and promoted
    with app(env, "site-a") as client:
        served = [client.post("/v1/chat/completions", json=CHAT).json()["model"] for _ in range(4)]
        assert sorted(served) == sorted([base_name, base_name, "global-v0001", "global-v0001"])
        for _ in range(2):  # requests naming the candidate count too
            assert client.post("/v1/chat/completions", json={**CHAT, "model": "global-v0001"}).status_code == 200
    seen = cards(env, "site-a")
    assert (seen["global-v0001"]["status"], seen["global-v0001"]["share"]) == ("stable", 1.0)
    promoted = release_records(env, "site-a")[-1]
    assert (promoted["action"], promoted["resource"], promoted["actor"]) == ("release.promoted", "global-v0001", "node")

    # 2. a poisoned run (the update bound switched off): its version evaluates worse everywhere, rolled back
    argv = ["--rounds", "1", "--min-nodes", "2", "--name", "poisoned", "--update-norm-ratio", "0"]
    poisoned = fedseek("run", "--state", str(env["state"]), *argv)
    assert poisoned.returncode == 0, (poisoned.stdout, poisoned.stderr)
    summary = json.loads((env["state"] / "registry" / "runs" / "poisoned.json").read_text())
    assert summary["rounds"][0]["version"] == "global-v0002" and POISONER in summary["rounds"][0]["accepted"]
    # the coordinator hears each site's verdict, and the operator sees it
    assert summary["rounds"][0]["release"] == dict.fromkeys(SITES, "retired")
    assert "round 1: global-v0002 rolled back at site-a, site-b, site-c" in poisoned.stdout
    honest_summary = json.loads((env["state"] / "registry" / "runs" / "honest.json").read_text())
    assert honest_summary["rounds"][0]["release"] == dict.fromkeys(SITES, "candidate")
    for site in SITES:
        seen = cards(env, site)
        assert (seen["global-v0002"]["status"], seen["global-v0002"]["share"]) == ("retired", 0.0)
        rolled = release_records(env, site)[-1]
        assert (rolled["action"], rolled["resource"], rolled["actor"]) == (
            "release.rolled_back",
            "global-v0002",
            "coordinator",
        )
        assert rolled["details"]["automatic"] is True and "eval loss is nan" in rolled["details"]["reason"]
    with app(env, "site-a") as client:  # the stable version keeps all default traffic
        assert {client.post("/v1/chat/completions", json=CHAT).json()["model"] for _ in range(3)} == {"global-v0001"}

    # 3. by hand: roll the stable version back to the base model, then promote it again
    listed = model_cli(env, "site-a", "list")
    assert (listed["stable"], listed["candidate"]) == ("global-v0001", None)
    rows = {v["version"]: v for v in listed["versions"]}
    assert rows["global-v0002"]["status"] == "retired" and rows["global-v0001"]["requests"] >= 7
    after = model_cli(env, "site-a", "rollback")
    assert after["stable"] is None and cards(env, "site-a")[base_name]["status"] == "stable"
    after = model_cli(env, "site-a", "promote", "global-v0001")
    assert after["stable"] == "global-v0001" and cards(env, "site-a")["global-v0001"]["share"] == 1.0
    manual = [r for r in release_records(env, "site-a") if r["actor"] == "operator"]
    assert [(r["action"], r["resource"]) for r in manual][-2:] == [
        ("release.rolled_back", "global-v0001"),
        ("release.promoted", "global-v0001"),
    ]
    # an application (API key) may not decide releases: the admin routes need an admin certificate
    with app(env, "site-a") as client:
        assert client.post("/v1/admin/models/rollback", json={}).status_code == 401
