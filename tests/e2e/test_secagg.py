"""`fedseek run --secagg` with real processes: a coordinator (SuperLink in its own netns, the signed app) and
three `fedseek node start` agents on the tiny model, each with its SuperNode and ClientApp processes.

What the in-process tests (tests/e2e/test_secagg_protocol.py) cannot show: Flower's SecAgg+ state survives
between the four stages in a real SuperNode's context, the readiness answers carry the example counts,
the agents train through the mod, and the coordinator's state directory afterwards holds the sum only:
no site's update, by the digest each site's own audit trail records of what it trained. The equality of
the secure aggregate with plain FedAvg on the same inputs is the in-process tests' (training is DP-noisy,
so two real runs never see the same inputs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedseek_examples.demo.data import write_site_dataset

from coordinator.registry import AdapterRegistry
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from federation.protocol import wire
from tests.e2e.fleet import start_coordinator, stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b", "site-c")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("secagg")
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
            write_site_dataset(data, site_index=i, n_sites=3, n_train=24 * (i + 1), n_eval=8)
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
        assert wait_activated(info, 3, timeout=300), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        yield {"base": base, "state": state, "nodes": nodes}
    finally:
        stop(procs)


def _fedseek_run(state: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "federation.cli.main", "run", "--state", str(state), *argv, "--timeout", "1200"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500)


def _trained(site_state: Path) -> list[dict[str, Any]]:
    path = NodeLayout(site_state).audit
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["action"] == "train"]


def test_a_secure_round_makes_the_sum_and_leaves_no_single_update_at_the_coordinator(
    consortium: dict[str, Any],
) -> None:
    base, state = consortium["base"], consortium["state"]
    done = _fedseek_run(state, "--secagg", "--ffa-lora", "--rounds", "1", "--min-nodes", "3", "--name", "secure")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    summary = json.loads((state / "registry" / "runs" / "secure.json").read_text())
    assert summary["status"] == "finished", summary.get("error")
    rec = summary["rounds"][0]
    assert sorted(rec["accepted"]) == list(SITES) == rec["secagg"]["summed"] and not rec["rejected"]
    assert rec["secagg"]["check_error"] <= rec["secagg"]["error_bound"]  # the masks cancelled
    assert rec["secagg"]["max_weight"] == 72.0  # the largest site's records, announced at readiness
    assert 0 < rec["secagg"]["error_bound"] < 1e-7
    train = summary["traffic"]["train"]
    assert train["messages_sent"] >= 4 * 3  # setup, share keys, masking, unmask: a message per site each
    version = summary["global_adapter"]["version"]
    arrays, manifest = AdapterRegistry(state / "registry").load(version)
    assert all(np.isfinite(v).all() for v in arrays.values())
    assert sorted(s["site"] for s in manifest.to_json()["sites"]) == list(SITES)

    # every site trained the round once; the digest of what it trained is nowhere in the coordinator's state
    digests = {}
    for site in SITES:
        records = _trained(base / site / "state")
        assert [r["details"]["round"] for r in records][-1:] == [1]
        digests[site] = records[-1]["details"]["update_sha256"]
    assert len(set(digests.values())) == 3 and manifest.sha256 not in digests.values()
    needles = [d.encode() for d in digests.values()]
    scanned = 0
    for path in state.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            scanned += 1
            for site, needle in zip(SITES, needles, strict=True):
                assert needle not in data, f"{site}'s update digest found in {path}"
    assert scanned > 5
    assert wire.lora_a(arrays)  # FFA-LoRA: the shared A completes the adapter


def test_secagg_refuses_a_run_with_fewer_than_three_ready_sites(consortium: dict[str, Any]) -> None:
    """`--min-nodes 2` with one site stopped: the run fails before anything trains, naming why."""
    base, state, nodes = consortium["base"], consortium["state"], consortium["nodes"]
    before = {site: len(_trained(base / site / "state")) for site in SITES}
    nodes["site-c"].stop()
    done = _fedseek_run(state, "--secagg", "--rounds", "1", "--min-nodes", "2", "--name", "too-few")
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    assert "secure aggregation needs at least 3 ready sites" in done.stderr
    assert {site: len(_trained(base / site / "state")) for site in SITES} == before
