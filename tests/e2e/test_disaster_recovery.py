"""Issue 15, disaster recovery, real processes: the coordinator is backed up while it runs, killed, and a
standby restored from the backup into another state directory (another PKI directory too) takes over;
the sites fail over to it and the next round runs there, continuing the registry and the witness.

One coordinator (`fedseek coordinator start`), two node agents (`fedseek node start`) whose
`coordinator` lists the primary's fleet address and then the standby's (`federation.security.sidecar`:
stunnel `failover = prio`), `fedseek run`, `fedseek backup`, `fedseek restore`, as an operator runs them.
On one host the two coordinators differ by fleet port; across hosts (tests/e2e multi-host) by address.

Measured, written to `dr-measurements.json` in the test's directory and printed (run with -s):
- recovery point: what the standby lacks of the primary's state at the kill (audit records, witnessed
  heads, registry versions, runs written after the backup);
- recovery time: kill -> standby serving (its coordinator.json), -> both sites' SuperNodes pulling
  from it (through its gateway), -> the next round finished there.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fedseek_examples.demo.data import write_site_dataset

from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from tests.e2e.fleet import audit_records, start_coordinator, stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b")


def _fedseek(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv], capture_output=True, text=True, timeout=timeout
    )


def _run(state: Path, name: str) -> subprocess.CompletedProcess[str]:
    return _fedseek(
        "run", "--state", str(state), "--rounds", "1", "--min-nodes", "2", "--name", name, "--timeout", "900"
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _witnessed(state: Path) -> dict[str, list[str]]:
    witness = CoordinatorLayout(state).witness
    return {site: _lines(witness / site / "ledger.head.jsonl") for site in SITES}


def _pulling(state: Path, timeout: float) -> bool:
    """Whether every site's SuperNode reached this coordinator's Fleet API (a 200 through its gateway, as
    the site's certificate) within `timeout`. A SuperNode that lost its SuperLink reconnects with the node
    id it had, which the restored database knows, so the SuperLink logs no new activation."""
    log = CoordinatorLayout(state).gateway / "access.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [json.loads(x) for x in _lines(log) if x.strip()]
        seen = {r["subject"].rsplit("CN=", 1)[-1] for r in rows if r.get("status") == 200}
        if seen >= set(SITES):
            return True
        time.sleep(0.2)
    return False


def _runs(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM run").fetchone()[0])


def _node_ids(db: Path) -> list[int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return sorted(int(r[0]) for r in conn.execute("SELECT node_id FROM node").fetchall())


@pytest.mark.parametrize(
    "round_after_backup", [False, True], ids=["backup-after-last-round", "round-lost-with-the-primary"]
)
def test_a_standby_restored_from_a_live_backup_takes_over(
    tmp_path: Path, tiny_model_dir: Path, round_after_backup: bool
) -> None:
    """The standby carries on from the backup: same nodes, run history, witnessed heads extended, and a
    new version every site deploys. With a round run on the primary after the backup, that round (its
    version and witnessed heads) is the recovery point's loss, and its version number must not come back."""
    base = tmp_path
    pki_dir, state = signed_consortium(base, SITES)
    primary_port, standby_port = free_port(), free_port()
    procs: list[Managed] = []
    numbers: dict[str, Any] = {}
    try:
        primary, info = start_coordinator(
            base, ["--pki", str(pki_dir), "--state", str(state), "--fleet-port", str(primary_port)]
        )
        procs.append(primary)
        nodes: list[Managed] = []
        for i, site in enumerate(SITES):
            data = base / site / "data"
            write_site_dataset(data, site_index=i, n_sites=2, n_train=48, n_eval=8)
            conf = cfg.save(
                cfg.NodeConfig(
                    name=site,
                    model_dir=str(tiny_model_dir),
                    data_dir=str(data),
                    state_dir=str(base / site / "state"),
                    pki_dir=str(pki_dir),
                    # The standby after the primary: the sites' sidecars dial it only while the primary is gone.
                    coordinator=f"127.0.0.1:{primary_port},127.0.0.1:{standby_port}",
                    api_port=free_port(),
                ),
                base / site / "node.json",
            )
            node = Managed(
                name=site,
                argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(conf)],
                log_path=base / site / "agent.log",
            ).start()
            nodes.append(node)
            procs.append(node)
        for site, node in zip(SITES, nodes, strict=True):
            wait_json(NodeLayout(base / site / "state").endpoints, node, timeout=300)
        assert wait_activated(info, 2, timeout=300), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        first = _run(state, "first")
        assert first.returncode == 0, first.stdout + first.stderr

        # A backup while everything runs: the coordinator (with its PKI, keys included: the standby
        # needs the coordinator's certificate and key) and a site (no secrets, signed with its key).
        archive = base / "coordinator-backup.tar.gz"
        started = time.monotonic()
        made = _fedseek(
            "backup", "--state", str(state), "--pki", str(pki_dir), "--include-secrets", "--out", str(archive), "--json"
        )
        assert made.returncode == 0, made.stderr
        made_report = json.loads(made.stdout)
        numbers["backup_s"] = round(time.monotonic() - started, 2)
        numbers["backup_bytes"] = archive.stat().st_size
        assert made_report["signed_by"] == "coordinator" and archive.stat().st_mode & 0o777 == 0o600
        site_backup = base / "site-a-backup.tar"
        site_made = _fedseek(
            "backup", "--state", str(base / "site-a" / "state"), "--pki", str(pki_dir), "--name", "site-a",
            "--out", str(site_backup), "--json",
        )  # fmt: skip
        assert site_made.returncode == 0, site_made.stderr
        skipped = json.loads(site_made.stdout)["skipped"]
        assert "state/site.key (secret)" in skipped and "pki/site-a/key.pem (secret)" in skipped
        checked = _fedseek("restore", "--from", str(site_backup), "--state", str(base / "x"), "--check", "--json")
        assert checked.returncode == 0 and json.loads(checked.stdout)["signed_by"] == "site-a", checked.stderr

        at_backup: dict[str, Any] = {
            "audit": len(audit_records(state)),
            "witnessed": _witnessed(state),
            "versions": sorted(p.name for p in (state / "registry").glob("global-v*")),
        }
        assert at_backup["versions"] == ["global-v0001"]
        assert all(len(v) >= 2 for v in at_backup["witnessed"].values())  # readiness and update heads of "first"
        node_ids = _node_ids(CoordinatorLayout(state).superlink_db)
        if round_after_backup:  # lost with the primary: what a backup taken before the last round costs
            between = _run(state, "between")
            assert between.returncode == 0, between.stdout + between.stderr

        # The primary host dies.
        killed = time.monotonic()
        os.kill(primary.pid, signal.SIGKILL)
        assert primary.proc is not None
        primary.proc.wait(30)
        lost: dict[str, Any] = {
            "audit_records": len(audit_records(state)) - at_backup["audit"],
            "witnessed_heads": sum(len(v) for v in _witnessed(state).values())
            - sum(len(v) for v in at_backup["witnessed"].values()),
            "versions": sorted({p.name for p in (state / "registry").glob("global-v*")} - set(at_backup["versions"])),
        }

        # The standby: restored into its own state and PKI directories, then started there.
        standby_base = base / "standby"
        standby_state, standby_pki = standby_base / "coord", standby_base / "pki"
        restored = _fedseek(
            "restore", "--from", str(archive), "--state", str(standby_state), "--pki", str(standby_pki),
            "--ca", str(pki_dir / "ca" / "ca.pem"), "--json",
        )  # fmt: skip
        assert restored.returncode == 0, restored.stderr
        numbers["restore_s"] = json.loads(restored.stdout)["seconds"]
        standby, standby_info = start_coordinator(
            standby_base,
            [
                "--pki", str(standby_pki), "--state", str(standby_state), "--fleet-port", str(standby_port),
                "--site-keys", str(standby_pki / "site-keys"),
            ],
        )  # fmt: skip
        procs.append(standby)
        serving = time.monotonic()
        assert sorted(standby_info["registered_sites"]) == list(SITES)  # type: ignore[call-overload]
        activated = _pulling(standby_state, timeout=300)
        sites_back = time.monotonic()
        assert activated, "the sites never reached the standby's fleet gateway"
        second = _run(standby_state, "second")
        done = time.monotonic()
        assert second.returncode == 0, (
            second.stdout + second.stderr + CoordinatorLayout(standby_state).superlink_log.read_text()[-3000:]
        )

        # The standby carried on: the same nodes, the run history, the witness, and a new version number.
        assert _node_ids(CoordinatorLayout(standby_state).superlink_db) == node_ids
        assert _runs(CoordinatorLayout(standby_state).superlink_db) == 2  # "first" (restored) and "second"
        summary = json.loads((standby_state / "registry" / "runs" / "second.json").read_text())
        made_version, made_sha = summary["global_adapter"]["version"], summary["global_adapter"]["sha256"]
        # The next number after the backup's; with a round lost with the primary, after the version the sites
        # installed in it (their readiness answers name it): the standby never reuses a number the sites hold.
        assert made_version == ("global-v0003" if round_after_backup else "global-v0002")
        assert summary["status"] == "finished" and summary["rounds"][-1]["deploy_refused"] == {}
        assert set(summary["rounds"][-1]["eval_loss"]) == set(SITES)
        for site in SITES:
            records = [json.loads(x) for x in _lines(NodeLayout(base / site / "state").audit)]
            refused = [r["details"] for r in records if r["action"] == "deploy.refused"]
            deployed = {(r["resource"], r["details"].get("sha256")) for r in records if r["action"] == "deploy"}
            assert not refused, f"{site} refused the standby's version: {refused}"
            assert (made_version, made_sha) in deployed, site
        witnessed = _witnessed(standby_state)
        for site in SITES:
            before = at_backup["witnessed"][site]
            assert witnessed[site][: len(before)] == before and len(witnessed[site]) > len(before), site
            ok = _fedseek("budget", "--state", str(base / site / "state"), "--witness", str(standby_state), timeout=120)
            assert ok.returncode == 0 and ok.stdout.splitlines()[-1].startswith(f"WITNESSED: {site}"), ok.stdout
        restored_records = audit_records(standby_state, "state.restored")
        assert len(restored_records) == 1 and restored_records[0]["details"]["signed_by"] == "coordinator"
        round_s = summary["traffic_by_round"][0]["end_s"] if summary.get("traffic_by_round") else None

        numbers.update(
            recovery_point_lost=lost,
            kill_to_standby_serving_s=round(serving - killed, 1),
            kill_to_sites_reconnected_s=round(sites_back - killed, 1),
            kill_to_next_round_done_s=round(done - killed, 1),
            next_round_s=round(done - sites_back, 1),
            next_round_serverapp_s=round(round_s, 1) if round_s is not None else None,
        )
        (base / "dr-measurements.json").write_text(json.dumps(numbers, indent=2))
        print("disaster recovery:", json.dumps(numbers))
        # What was written after the backup is what a standby lacks: with the backup after the last round,
        # no witnessed head and no version; with a round after it, that round's.
        if round_after_backup:
            assert lost["witnessed_heads"] > 0 and lost["versions"] == ["global-v0002"]
        else:
            assert lost["witnessed_heads"] == 0 and lost["versions"] == []
    finally:
        stop(procs)
