"""Red team, issue 15 (robust aggregation), real processes: a site that scales its update x100.

One coordinator and three real node agents (`fedseek node start`) on the tiny model; site-c runs the
same agent with its trained update's change scaled x100 before it leaves (tests/redteam/poisoning_agent.py:
a test-only wrapper, since the product has no such hook). `fedseek run --min-nodes 2`, as an operator
runs it, with the default aggregation (FedAvg) and update bound (update-norm-ratio 10).

The coordinator rejects site-c's update in every round as outsized, records why in the round record and
says so on the operator's terminal; the adapter comes from the two honest sites' real DP-SGD updates,
which pass the same bound (their sizes are recorded too), and site-c is absent from its lineage.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
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

SITES = ("site-a", "site-b", "site-c")
POISONER = "site-c"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """A coordinator with the consortium's signed app and three sites' node agents, connected."""
    base = tmp_path_factory.mktemp("poisoned-site")
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
            write_site_dataset(data, site_index=i, n_sites=len(SITES), n_train=48, n_eval=8)
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
            agent = ["-m", "federation.cli.main", "node", "start", "--config", str(conf)]
            if site == POISONER:
                agent = ["-m", "tests.redteam.poisoning_agent", "--config", str(conf), "--factor", "100"]
            nodes[site] = Managed(
                name=site, argv=[sys.executable, *agent], log_path=base / site / "agent.log", cwd=REPO
            ).start()
            procs.append(nodes[site])
        for site in SITES:
            wait_json(NodeLayout(base / site / "state").endpoints, nodes[site], timeout=300)
        assert wait_activated(info, len(SITES), timeout=180), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        yield {"base": base, "state": state, "nodes": nodes}
    finally:
        stop(procs)


def _records(site_state: Path, action: str) -> list[dict[str, Any]]:
    path = NodeLayout(site_state).audit
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["action"] == action]


def test_a_site_scaling_its_update_x100_is_rejected_every_round(consortium: dict[str, Any]) -> None:
    base, state = consortium["base"], consortium["state"]
    argv = ["run", "--state", str(state), "--rounds", "2", "--min-nodes", "2", "--name", "poisoned"]
    done = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv, "--timeout", "900"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    summary = json.loads((state / "registry" / "runs" / "poisoned.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    for rec in summary["rounds"]:
        assert sorted(rec["accepted"]) == ["site-a", "site-b"]
        ((who, why),) = rec["rejected"].items()
        assert who.startswith("node-")
        assert re.fullmatch(r"update norm \S+ is \S+x the median \S+ of the other updates' .*refused as outsized", why)
        norms = rec["update_norms"]
        # the honest sites' real DP-SGD updates are within the bound of each other; site-c far beyond it
        assert max(norms["site-a"], norms["site-b"]) < 10 * min(norms["site-a"], norms["site-b"])
        assert norms[POISONER] > 10 * max(norms["site-a"], norms["site-b"])
        manifest = json.loads((state / "registry" / rec["version"] / "manifest.json").read_text())
        assert sorted(s["site"] for s in manifest["sites"]) == ["site-a", "site-b"]
        # the operator sees it as it happens
        assert f"round {rec['round']}: rejected {who}: update norm" in done.stdout
    # site-c did train (and was charged) in both rounds: the coordinator refused what it sent, not its round
    trained = _records(base / POISONER / "state", "train")
    assert [r["details"]["round"] for r in trained][-2:] == [1, 2]
