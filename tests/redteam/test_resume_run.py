"""Issue 15 finding 5 (resume), real processes: the coordinator dies mid-round; `fedseek run --resume` goes on.

Before: `fedseek run` could not continue from an existing version: a run whose coordinator crashed was
lost, and running it again started from the seeded init under a new Flower run, whose rounds every site
would charge afresh. Now the run is resumed from the registry's last version of it, at the round after
the last one sent to sites, under the run's own key in every site's ledger, and a site refuses to be
charged twice for one (run, round) (node.service.check_not_charged).

One coordinator and three real node agents on the tiny model (site-c with ten times the records, so
round 2 is still running when it is killed). `fedseek run --rounds 3` as the operator runs it; once a
site's ledger has charged round 2 the whole coordinator process tree (`fedseek coordinator start`, the
SuperLink, its SuperExec and ServerApp, the gateway) and `fedseek run` get SIGKILL. The coordinator is
started again on the same state, and `fedseek run --resume long` finishes the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fedseek_examples.demo.data import write_site_dataset

from coordinator.registry import AdapterRegistry
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from tests.e2e.fleet import stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium
from tests.redteam.procnet import process_tree

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b", "site-c")
REPO = Path(__file__).resolve().parents[2]


def start_coordinator(base: Path, argv: list[str], *, log: str) -> tuple[Managed, dict[str, Any]]:
    """`fedseek coordinator start`; waits for the coordinator.json this process wrote (not a dead one's)."""
    proc = Managed(
        name="coordinator",
        argv=[sys.executable, "-m", "federation.cli.main", "coordinator", "start", *argv],
        log_path=base / log,
    ).start()
    path = CoordinatorLayout(base / "coord").endpoints
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.alive(), f"coordinator exited:\n{proc.log_path.read_text()[-3000:]}"
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            return proc, {**info, "state": str(base / "coord")}
        time.sleep(0.3)
    raise AssertionError(f"coordinator not ready:\n{proc.log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("resume-run")
    pki_dir, state = signed_consortium(base, SITES)
    fleet_port = free_port()
    argv = ["--pki", str(pki_dir), "--state", str(state), "--fleet-port", str(fleet_port)]
    procs: list[Managed] = []
    try:
        coordinator, info = start_coordinator(base, argv, log="coordinator.log")
        procs.append(coordinator)
        nodes: dict[str, Managed] = {}
        for i, site in enumerate(SITES):
            data = base / site / "data"
            n_train = 320 if site == "site-c" else 32
            write_site_dataset(data, site_index=i, n_sites=len(SITES), n_train=n_train, n_eval=4)
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
                cwd=REPO,
            ).start()
            procs.append(nodes[site])
        for site in SITES:
            wait_json(NodeLayout(base / site / "state").endpoints, nodes[site], timeout=300)
        assert wait_activated(info, len(SITES), timeout=180), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        yield {"base": base, "state": state, "argv": argv, "procs": procs, "info": info}
    finally:
        stop(procs)


def charges(base: Path, site: str) -> list[tuple[str, int]]:
    """The (run, round) pairs the site's ledger charged, from its audit trail's `ledger.charge` records."""
    path = NodeLayout(base / site / "state").audit
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["resource"], int(r["details"]["round"])) for r in rows if r["action"] == "ledger.charge"]


def sigkill_tree(root: int) -> None:
    """SIGKILL `root` and every process under it at once, as a host that loses power would."""
    for pid in sorted(process_tree(root)):
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.kill(pid, signal.SIGKILL)


def test_a_run_killed_mid_round_resumes_without_a_double_charge_or_a_reused_version(
    consortium: dict[str, Any],
) -> None:
    base, state = consortium["base"], consortium["state"]
    argv = ["run", "--state", str(state), "--rounds", "3", "--min-nodes", "3", "--name", "long", "--timeout", "900"]
    first = subprocess.Popen(
        [sys.executable, "-m", "federation.cli.main", *argv], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 900
    while not any(rnd == 2 for site in SITES for _, rnd in charges(base, site)):  # round 2 is being trained
        assert first.poll() is None, f"the run ended before round 2: {first.communicate()[0]}"
        assert time.monotonic() < deadline, "round 2 never started"
        time.sleep(0.2)
    coordinator: Managed = consortium["procs"][0]
    sigkill_tree(coordinator.pid)
    first.kill()
    first.communicate()
    summary_path = state / "registry" / "runs" / "long.json"
    crashed = json.loads(summary_path.read_text())
    assert crashed["status"] == "running"  # nobody lived to write anything else
    run_key = crashed["run_key"]
    before = {site: charges(base, site) for site in SITES}
    versions_before = AdapterRegistry(state / "registry").versions()

    # the same command on the same state; the sites' SuperNodes reconnect on their own (already registered
    # and activated: the resumed run's readiness query waits for them, up to its round timeout)
    coordinator, _ = start_coordinator(base, consortium["argv"], log="coordinator-restarted.log")
    consortium["procs"][0] = coordinator

    resume = ["run", "--state", str(state), "--resume", "long", "--timeout", "900"]
    done = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *resume], capture_output=True, text=True, cwd=REPO, timeout=1200
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "resuming long at round 3" in done.stdout

    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "finished" and summary["run_key"] == run_key
    assert [s["start_round"] for s in summary["submissions"]] == [1, 3]
    made = [r for r in summary["rounds"] if r["version"]]
    assert [r["round"] for r in made][-1] == 3 and made[0]["round"] == 1

    # no version number was given twice, and each names the weights every site installed under it
    registry = AdapterRegistry(state / "registry")
    versions = registry.versions()
    assert versions[: len(versions_before)] == versions_before and len(versions) == len(set(versions))
    manifests = [registry.manifest(v) for v in versions]
    assert len({(m.run, m.round) for m in manifests}) == len(manifests)
    resumed = next(m for m in manifests if m.round == 3)
    assert resumed.parent == versions_before[-1]  # from the crashed run's last version
    for site in SITES:
        adapters = NodeLayout(base / site / "state").adapters
        for m in manifests:
            meta = adapters / m.version / "adapter.json"
            if meta.exists():
                assert json.loads(meta.read_text())["sha256"] == m.sha256

    # every site charged each (run, round) at most once, all under the run's key; round 3 everywhere
    for site in SITES:
        charged = [c for c in charges(base, site) if c[0] == run_key]
        assert len(charged) == len(set(charged)), (site, charged)
        assert set(before[site]) <= set(charged) and (run_key, 3) in charged
        assert all(rnd in (1, 2, 3) for _, rnd in charged)
