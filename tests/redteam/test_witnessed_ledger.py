"""Red team, issue 14 (anchored ledger), real processes: an insider rewrites BOTH a site's ledger and its
audit trail, which the node's own start-up check (ledger against audit trail) cannot see.

Before: deleting `ledger.sqlite` together with `audit.jsonl` (or restoring both from an older
backup, or forking both by training a different round on the restored copy) gave a site that
started, passed its own consistency check, and trained the same records on a fresh or replenished
budget; the coordinator aggregated whatever it sent. Now every readiness answer and every update
carries the site's ledger head signed with its node key, and the coordinator refuses a head that
does not extend the last one it witnessed: the site is left out before anything is charged, the
run fails with one line naming the reason, nothing is aggregated, the refusal is in the
coordinator's audit trail, and `fedseek budget --witness COORD_STATE` exits 1 with the same reason.

One coordinator (`fedseek coordinator start`), two real node agents (`fedseek node start`), and
`fedseek run` as the operator runs it. site-a is stopped, tampered with and restarted per case.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fedseek_examples.demo.data import write_site_dataset

from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.client_app import CONFIG_HEADER, agent_client
from privacy.audit import head_path
from tests.e2e.fleet import activated, audit_records, start_coordinator, stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b")


def _state_files(state: Path) -> list[Path]:
    """What the insider rewrites: the ledger (and its WAL) and the audit trail (and its head file)."""
    layout = NodeLayout(state)
    wal = [layout.ledger.with_name(layout.ledger.name + suffix) for suffix in ("-wal", "-shm")]
    return [layout.ledger, *wal, layout.audit, head_path(layout.audit)]


def _backup(state: Path, to: Path) -> None:
    to.mkdir(parents=True)
    for path in _state_files(state):
        if path.exists():
            shutil.copy2(path, to / path.name)


def _restore(state: Path, backup: Path) -> None:
    for path in _state_files(state):
        path.unlink(missing_ok=True)
    for path in backup.iterdir():
        shutil.copy2(path, state / path.name)


def _delete(state: Path) -> None:
    for path in _state_files(state):
        path.unlink(missing_ok=True)


def _fedseek(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """A coordinator and both sites; two witnessed runs (one round each), site-a's state backed up between."""
    base = tmp_path_factory.mktemp("witnessed")
    pki_dir, state = signed_consortium(base, SITES)
    fleet_port = free_port()
    procs: list[Managed] = []
    try:
        coordinator, info = start_coordinator(
            base, ["--pki", str(pki_dir), "--state", str(state), "--fleet-port", str(fleet_port)]
        )
        procs.append(coordinator)
        nodes: dict[str, Managed] = {}
        configs: dict[str, Path] = {}
        for i, site in enumerate(SITES):
            data = base / site / "data"
            write_site_dataset(data, site_index=i, n_sites=2, n_train=48, n_eval=8)
            configs[site] = cfg.save(
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
                argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(configs[site])],
                log_path=base / site / "agent.log",
            ).start()
            procs.append(nodes[site])
        for site in SITES:
            wait_json(NodeLayout(base / site / "state").endpoints, nodes[site], timeout=300)
        assert wait_activated(info, 2, timeout=180), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        env: dict[str, Any] = {"base": base, "state": state, "nodes": nodes, "info": info, "pki": pki_dir}
        a_state = base / "site-a" / "state"
        assert _run(env, "first").returncode == 0
        _stop(env, "site-a")
        _backup(a_state, base / "backup-after-first")  # the insider's copy: ledger and audit trail agree
        _start(env, "site-a")
        assert _run(env, "second").returncode == 0
        yield env
    finally:
        stop(procs)


def _stop(env: dict[str, Any], site: str) -> None:
    env["nodes"][site].stop(timeout=60)


def _start(env: dict[str, Any], site: str) -> None:
    before = activated(env["info"])
    env["nodes"][site].start()
    wait_json(NodeLayout(env["base"] / site / "state").endpoints, env["nodes"][site], timeout=300)
    assert wait_activated(env["info"], before + 1, timeout=180), "the restarted SuperNode never connected"


def _run(env: dict[str, Any], name: str) -> subprocess.CompletedProcess[str]:
    argv = ["run", "--state", str(env["state"]), "--rounds", "1", "--min-nodes", "2", "--name", name]
    return _fedseek(*argv, "--timeout", "600")


def _tampered(env: dict[str, Any], tamper: Callable[[Path], None]) -> None:
    """Stop site-a, let the insider at its state directory, start it again (its own check passes)."""
    _stop(env, "site-a")
    tamper(env["base"] / "site-a" / "state")
    _start(env, "site-a")


def _local_round(env: dict[str, Any], run_id: str) -> None:
    """site-a trains a round nobody else sees (as its ClientApp would call its agent): a fork of its ledger."""
    site = env["base"] / "site-a"
    endpoints = json.loads(NodeLayout(site / "state").endpoints.read_text())
    node_config = {
        "agent-url": str(endpoints["openai"]),  # the agent's one HTTPS API, /internal routes included
        "agent-token-file": str(NodeLayout(site / "state").agent_token),
        "agent-ca": str(env["pki"] / "ca" / "ca.pem"),
        "agent-cert": str(env["pki"] / "site-a" / "cert.pem"),
        "agent-key": str(env["pki"] / "site-a" / "key.pem"),
    }
    config: dict[str, Any] = dict(TrainInstruction(run=RunSettings(num_rounds=1), server_round=1).to_config_record())
    config["run-id"] = run_id
    with agent_client(node_config, timeout=300) as http:
        r: httpx.Response = http.post("/internal/train", content=b"", headers={CONFIG_HEADER: json.dumps(config)})
    assert r.status_code == 200, r.text


def _ledger_rows(state: Path) -> int:
    out = _fedseek("budget", "--state", str(state), "--json", timeout=120)
    return len(json.loads(out.stdout)["entries"])


def _refused(env: dict[str, Any], name: str, reason: str) -> str:
    """`fedseek run` fails before round 1 trains: site-a is refused with `reason`, nothing charged or aggregated."""
    b_state = env["base"] / "site-b" / "state"
    b_rows = _ledger_rows(b_state)
    refusals = len(audit_records(env["state"], "witness.refused"))
    cli = _run(env, name)
    assert cli.returncode == 2, (cli.stdout, cli.stderr)
    (line,) = [x for x in cli.stderr.splitlines() if x.startswith("fedseek: error:")]
    assert "Traceback" not in cli.stderr
    assert line.startswith(f"fedseek: error: run {name} failed: round 1 not started, nothing trained or charged")
    assert "site-a (node-" in line and f"): site-a: {reason}" in line, line
    summary = json.loads((env["state"] / "registry" / "runs" / f"{name}.json").read_text())
    assert summary["status"] == "failed" and summary["global_adapter"] is None  # nothing aggregated
    assert _ledger_rows(b_state) == b_rows  # the honest site was not charged for the refused round
    record = audit_records(env["state"], "witness.refused")[refusals:][0]
    assert record["resource"] == "site-a" and record["details"]["stage"] == "readiness"
    assert record["details"]["error"].startswith(f"site-a: {reason}") and record["details"]["run"] == name
    return line


def _budget_witness(env: dict[str, Any], site: str) -> subprocess.CompletedProcess[str]:
    return _fedseek("budget", "--state", str(env["base"] / site / "state"), "--witness", str(env["state"]), timeout=120)


def test_both_sites_heads_are_witnessed_and_budget_witness_agrees(consortium: dict[str, Any]) -> None:
    witness = CoordinatorLayout(consortium["state"]).witness
    for site in SITES:
        heads = [json.loads(x)["statement"]["payload"]["head"] for x in (witness / site / "ledger.head.jsonl").open()]
        seqs = [h["seq"] for h in heads]
        # readiness of run 1 (0), its update (1), run 2's readiness (1 again: a fresh signed statement of
        # the same head, kept as evidence) and update (2): never lower, and every charge witnessed
        assert seqs == sorted(seqs) and sorted(set(seqs)) == [0, 1, 2], seqs
        assert heads[-1]["epsilon"] > heads[1]["epsilon"] > 0
    ok = _budget_witness(consortium, "site-b")
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1].startswith("WITNESSED: site-b: the ledger (seq 2"), ok


def test_ledger_and_audit_trail_rolled_back_together_is_refused(consortium: dict[str, Any]) -> None:
    _tampered(consortium, lambda state: _restore(state, consortium["base"] / "backup-after-first"))
    _refused(consortium, "rolled-back", "ledger rolled back: head seq 1")
    cli = _budget_witness(consortium, "site-a")
    assert cli.returncode == 1
    assert cli.stdout.splitlines()[-1].startswith("WITNESS REFUSED: site-a: ledger rolled back: head seq 1")
    assert "TRAINING REFUSED" not in cli.stdout  # the node's own check cannot see it: ledger and audit agree


def test_ledger_and_audit_trail_forked_together_is_refused(consortium: dict[str, Any]) -> None:
    """The old copy trains another round 2 of its own: a consistent ledger and audit trail, of another history."""
    _tampered(consortium, lambda state: _restore(state, consortium["base"] / "backup-after-first"))
    _local_round(consortium, "fork")
    _refused(consortium, "forked", "ledger forked or re-chained: entry 2 hash")
    cli = _budget_witness(consortium, "site-a")
    assert cli.returncode == 1 and "WITNESS REFUSED: site-a: ledger forked or re-chained" in cli.stdout


def test_ledger_and_audit_trail_deleted_together_is_refused(consortium: dict[str, Any]) -> None:
    _tampered(consortium, _delete)
    _refused(consortium, "deleted", "ledger reset or replaced")
    cli = _budget_witness(consortium, "site-a")
    assert cli.returncode == 1 and "was never witnessed by this coordinator" in cli.stdout
    # the operator cannot give the same data a fresh budget either
    layout = NodeLayout(consortium["base"] / "site-a" / "state")
    head = json.loads(_fedseek("budget", "--state", str(layout.root), "--json", timeout=120).stdout)["head"]
    accept = _fedseek(
        "witness", "accept-genesis", "--state", str(consortium["state"]), "--site", "site-a",
        "--dataset-sha256", head["dataset_sha256"], "--operator", "mallory", timeout=120,
    )  # fmt: skip
    assert accept.returncode == 2 and "was already witnessed" in accept.stderr, accept
    assert audit_records(consortium["state"], "witness.genesis-refused")[-1]["details"]["operator"] == "mallory"
    assert _run(consortium, "deleted-again").returncode == 2  # still refused
