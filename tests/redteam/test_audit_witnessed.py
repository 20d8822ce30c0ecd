"""Issue 16, real processes: each round carries the site's signed audit checkpoint to the coordinator.

One coordinator (`fedseek coordinator start`), two node agents (`fedseek node start`) and one
`fedseek run`. Each site's readiness answer and update carry its audit log's latest checkpoint,
signed with its SuperNode key; the coordinator checks it against the registered key and keeps it
(`<coordinator state>/witness/<site>/audit.checkpoint.jsonl`). Then `fedseek audit verify LOG
--witness COORD_STATE` holds the site's live log against them, and refuses the same site's log
once an insider restores the copy taken before the round.
"""

from __future__ import annotations

import json
import shutil
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
from federation.security.signed_statement import load_public_key
from privacy.audit import companion_paths
from privacy.checkpoints import parse_checkpoint
from tests.e2e.fleet import start_coordinator, stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b")


def _fedseek(*argv: str | Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _audit_files(state: Path) -> list[Path]:
    log = NodeLayout(state).audit
    return [log, *companion_paths(log)]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """A coordinator and both sites after one run of one round; site-a's audit files copied before it."""
    base = tmp_path_factory.mktemp("audit-witnessed")
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
            write_site_dataset(data, site_index=i, n_sites=2, n_train=48, n_eval=8)
            config = cfg.save(
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
                argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(config)],
                log_path=base / site / "agent.log",
            ).start()
            procs.append(nodes[site])
        for site in SITES:
            wait_json(NodeLayout(base / site / "state").endpoints, nodes[site], timeout=300)
        assert wait_activated(info, 2, timeout=180), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        before = base / "site-a-before"
        before.mkdir()
        for path in _audit_files(base / "site-a" / "state"):
            if path.exists():
                shutil.copy2(path, before / path.name)
        argv = ["run", "--state", str(state), "--rounds", "1", "--min-nodes", "2", "--name", "first"]
        ran = _fedseek(*argv, "--timeout", "600")
        assert ran.returncode == 0, ran.stderr[-3000:]
        yield {"base": base, "state": state, "pki": pki_dir, "nodes": nodes, "before": before}
    finally:
        stop(procs)


def _verify(env: dict[str, Any], site: str) -> subprocess.CompletedProcess[str]:
    log = NodeLayout(env["base"] / site / "state").audit
    return _fedseek(
        "audit", "verify", log, "--witness", env["state"], "--site-keys", env["pki"] / "site-keys", timeout=300
    )


def test_each_round_carries_a_signed_checkpoint_the_coordinator_keeps(consortium: dict[str, Any]) -> None:
    witness = CoordinatorLayout(consortium["state"]).witness
    for site in SITES:
        key = load_public_key(consortium["pki"] / "site-keys" / f"{site}.pub")
        stored = [json.loads(line) for line in (witness / site / "audit.checkpoint.jsonl").open()]
        checkpoints = [parse_checkpoint(entry["statement"], key=key) for entry in stored]
        assert len(checkpoints) >= 2  # readiness, then the update: the log grew with the round
        assert all(c.origin == site for c in checkpoints)
        sizes = [c.size for c in checkpoints]
        assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
        log = NodeLayout(consortium["base"] / site / "state").audit
        train = [json.loads(x) for x in log.read_text().splitlines() if '"action":"train"' in x]
        assert train and train[-1]["seq"] <= sizes[-1]  # the update's checkpoint holds the round's record
    deadline = time.monotonic() + 120
    result = _verify(consortium, "site-b")
    while result.returncode != 0 and "verify again" in result.stderr and time.monotonic() < deadline:
        time.sleep(1)  # a record in its first second is not signed yet
        result = _verify(consortium, "site-b")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("site-b: OK: ") and "signatures checked" in result.stdout


def test_the_copy_from_before_the_round_is_refused_against_the_witness(consortium: dict[str, Any]) -> None:
    consortium["nodes"]["site-a"].stop(timeout=60)
    state = consortium["base"] / "site-a" / "state"
    for path in _audit_files(state):
        path.unlink(missing_ok=True)
        saved = consortium["before"] / path.name
        if saved.exists():
            shutil.copy2(saved, path)
    assert _fedseek("audit", "verify", NodeLayout(state).audit).returncode == 0  # internally valid
    result = _verify(consortium, "site-a")
    assert result.returncode == 1, result.stdout
    assert "fewer than the" in result.stderr and "an older copy of the log restored" in result.stderr
