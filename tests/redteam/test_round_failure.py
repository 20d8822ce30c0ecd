"""Red team, issue 14 finding 4, real processes: a site killed in the middle of a round.

Before: with `--min-nodes` equal to the number of sites and one site killed mid-round, no adapter
was made, yet the run reported `finished`, `fedseek run` exited 0, and the surviving sites had
spent budget for nothing (and would have spent more in the next round). Now the round that made
no adapter ends the run: the summary says `failed` with an error naming the site that dropped and
the sites charged for nothing, `fedseek run` exits 2 with that one line, and no later round starts
(the survivors are charged for the one round only). Before every round the coordinator asks each
site whether it can train (a Flower `query` message the ClientApp relays to `/internal/ready`).

One coordinator and two real node agents (`fedseek node start`); `fedseek run` as the operator
runs it. site-b has ten times the records, so its round runs long enough to be killed in the middle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fedseek_examples.demo.data import write_site_dataset

from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from tests.e2e.fleet import start_coordinator, stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """A coordinator with the consortium's signed app, and both sites' node agents, connected."""
    base = tmp_path_factory.mktemp("round-failure")
    pki_dir, state = signed_consortium(base, SITES)
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
            write_site_dataset(data, site_index=i, n_sites=2, n_train=48 if site == "site-a" else 480, n_eval=8)
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
            nodes[site] = Managed(
                name=site,
                argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(conf)],
                log_path=base / site / "agent.log",
            ).start()
            procs.append(nodes[site])
        for site in SITES:
            wait_json(NodeLayout(base / site / "state").endpoints, nodes[site], timeout=300)
        assert wait_activated(info, 2, timeout=180), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        yield {"base": base, "state": state, "nodes": nodes}
    finally:
        stop(procs)


def _records(site_state: Path, action: str) -> list[dict[str, Any]]:
    path = NodeLayout(site_state).audit
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["action"] == action]


def test_a_site_killed_mid_round_fails_the_run_naming_it(consortium: dict[str, Any]) -> None:
    """Finding 4: `fedseek run --min-nodes 2`, site-b killed while it trains round 1 of 2."""
    base, nodes = consortium["base"], consortium["nodes"]
    b_state, a_state = base / "site-b" / "state", base / "site-a" / "state"
    approved_before = len(_records(b_state, "clientapp.approved"))
    argv = ["run", "--state", str(consortium["state"]), "--rounds", "2", "--min-nodes", "2", "--name", "killed"]
    cli = subprocess.Popen(
        [sys.executable, "-m", "federation.cli.main", *argv, "--timeout", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # site-b's app guard approves the readiness query's task, then the train task: kill it then
        deadline = time.monotonic() + 300
        while len(_records(b_state, "clientapp.approved")) < approved_before + 2:
            assert cli.poll() is None, cli.communicate()
            assert time.monotonic() < deadline, "site-b was never sent its round"
            time.sleep(0.1)
        ready = [r for r in _records(b_state, "clientapp.approved")][approved_before:]
        nodes["site-b"].proc.kill()  # the site's host goes down mid-round (its children die with it)
        out, err = cli.communicate(timeout=900)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
    assert len(ready) == 2
    assert cli.returncode == 2, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("fedseek: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(
        "fedseek: error: run killed failed: round 1 made no global adapter (1 valid updates, min-nodes 2)"
    ), line
    assert "dropped or rejected: site-b (node-" in line
    assert "charged for this round with no adapter made: site-a (node-" in line
    assert line.endswith("later rounds not started")
    assert "round 1: no global adapter" in out

    summary = json.loads((consortium["state"] / "registry" / "runs" / "killed.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0 and summary["global_adapter"] is None
    assert [r["round"] for r in summary["rounds"]] == [1]
    # both sites said they could train round 1; site-a trained it, and nothing after
    trained = _records(a_state, "train")
    assert [r["details"]["round"] for r in trained] == [1]
    assert not _records(a_state, "train.refused")
