"""Issue 16, real processes: a site's audit log is witnessed off the site with no round at all.

"Checkpoints are witnessed off the site: sent to the coordinator at least every 60 s while there
are new records". One coordinator (`fedseek coordinator start`) and one node agent (`fedseek node
start`, `coordinator_admin` set, the push interval lowered to 1 s); no `fedseek run`. Requests the
site serves make new audit records; the agent's pusher (`node.checkpoint_push`) POSTs the signed
checkpoint to the coordinator's admin API over mTLS, which keeps it
(`<coordinator state>/witness/site-a/audit.checkpoint.jsonl`). Then an insider restores the copy of
the log taken before those requests: the copy passes its own check, `fedseek audit verify LOG
--witness COORD_STATE` refuses it, and the agent restarted on it is refused by the coordinator at
its first push (audited there), still with no round.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from federation.security.signed_statement import load_public_key
from privacy.audit import companion_paths
from privacy.checkpoints import KIND, parse_checkpoint
from tests.e2e.fleet import start_coordinator, stop, wait_json
from tests.redteam.consortium import signed_consortium

pytestmark = pytest.mark.e2e

SITE = "site-a"
PUSH_S = 1.0
WAIT_S = 120.0  # far above the 60 s bound: this box is shared and loaded; the assertion is on content
SERVED = 6
"""Requests served after the copy: more records than a restart on the copy adds before its first push (an
unsigned-tail note, the data minimisation, the app guard's start: 3), so the restored log stays shorter than
the witnessed one ("rolled back or cut"). With 3 it could grow back to the very size witnessed, with other
records: refused as a fork (seen in a full run here, when the copy held the guard's late record)."""
CHAT = {"messages": [{"role": "user", "content": "Chest pain since this morning."}], "max_tokens": 2}


def _fedseek(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _until(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
    return found


def _audit_files(state: Path) -> list[Path]:
    log = NodeLayout(state).audit
    return [log, *companion_paths(log)]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, site_data_dir: Path
) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("audit-pushed")
    pki_dir, state = signed_consortium(base, [SITE])
    procs: list[Managed] = []
    try:
        coordinator, info = start_coordinator(
            base, ["--pki", str(pki_dir), "--state", str(state), "--fleet-port", str(free_port())]
        )
        procs.append(coordinator)
        config = cfg.save(
            cfg.NodeConfig(
                name=SITE,
                model_dir=str(tiny_model_dir),
                data_dir=str(site_data_dir),
                state_dir=str(base / SITE / "state"),
                pki_dir=str(pki_dir),
                coordinator=str(info["fleet"]),
                coordinator_admin=str(info["admin"]),  # the URL coordinator.json shows
                checkpoint_push_seconds=PUSH_S,
                api_port=free_port(),
            ),
            base / SITE / "node.json",
        )
        agent = Managed(
            name=SITE,
            argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(config)],
            log_path=base / SITE / "agent.log",
        ).start()
        procs.append(agent)
        yield {"base": base, "state": state, "pki": pki_dir, "agent": agent, "config": config, "procs": procs}
    finally:
        stop(procs)


def _witnessed(env: dict[str, Any]) -> list[dict[str, Any]]:
    path = CoordinatorLayout(env["state"]).witness / SITE / f"{KIND}.jsonl"
    return _records(path) if path.exists() else []


def _covering(env: dict[str, Any], size: int) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        for entry in reversed(_witnessed(env)):
            if entry["statement"]["payload"]["size"] >= size:
                return entry
        return None

    return check


def test_serving_records_are_witnessed_within_the_push_interval_without_a_round(site: dict[str, Any]) -> None:
    node_state = site["base"] / SITE / "state"
    layout = NodeLayout(node_state)
    info = wait_json(layout.endpoints, site["agent"], timeout=300)
    log = layout.audit
    # The agent's start-up records are pushed first; the log is quiet once they are witnessed. The last
    # may be the app guard's (its own process, up seconds after the agent): wait for it, or the copy below
    # could hold it while no witnessed checkpoint does yet.
    _until(lambda: any(r["action"] == "app_guard.started" for r in _records(log)), "the app guard never started")
    _until(_covering(site, len(_records(log))), "the start-up records were never witnessed")
    before = site["base"] / "before"
    before.mkdir()
    for path in _audit_files(node_state):
        if path.exists():
            shutil.copy2(path, before / path.name)
    restored_size = len(_records(before / log.name))

    key = layout.api_key.read_text().strip()
    tls = ssl.create_default_context(cafile=str(site["pki"] / "ca" / "ca.pem"))
    with httpx.Client(base_url=str(info["openai"]), verify=tls, timeout=120) as http:
        for _ in range(SERVED):
            answer = http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
    served = [r for r in _records(log) if r["seq"] > restored_size]
    assert served, "serving wrote no audit record"
    last = max(r["seq"] for r in served)
    served_at = time.monotonic()

    entry = _until(_covering(site, last), f"no witnessed checkpoint covers record {last} after {WAIT_S:.0f} s")
    print(f"record {last} witnessed {time.monotonic() - served_at:.1f} s after it was served (push every {PUSH_S} s)")
    assert entry["note"] == "push" and entry["site"] == SITE
    checkpoint = parse_checkpoint(entry["statement"], key=load_public_key(site["pki"] / "site-keys" / f"{SITE}.pub"))
    assert checkpoint.origin == SITE and checkpoint.size >= last
    assert not (CoordinatorLayout(site["state"]).registry / "runs").exists() or not list(
        (CoordinatorLayout(site["state"]).registry / "runs").glob("*.json")
    )  # no run, no round: the push alone brought it

    # The live log holds against the witness.
    deadline = time.monotonic() + WAIT_S
    ok = _fedseek(
        "audit", "verify", log, "--witness", site["state"], "--site", SITE, "--site-keys", site["pki"] / "site-keys"
    )
    while ok.returncode != 0 and "verify again" in ok.stderr and time.monotonic() < deadline:
        time.sleep(1)  # a record in its first second is not signed yet
        ok = _fedseek(
            "audit", "verify", log, "--witness", site["state"], "--site", SITE, "--site-keys", site["pki"] / "site-keys"
        )
    assert ok.returncode == 0, ok.stderr

    # The insider stops the node and restores the copy from before the requests.
    site["agent"].stop(timeout=60)
    for path in _audit_files(node_state):
        path.unlink(missing_ok=True)
        saved = before / path.name
        if saved.exists():
            shutil.copy2(saved, path)
    assert _fedseek("audit", "verify", log).returncode == 0  # internally valid: the local check is fooled
    result = _fedseek(
        "audit", "verify", log, "--witness", site["state"], "--site", SITE, "--site-keys", site["pki"] / "site-keys"
    )
    assert result.returncode == 1, result.stdout
    assert f"holds {restored_size} records, fewer than the" in result.stderr, result.stderr
    assert "an older copy of the log restored" in result.stderr, result.stderr

    # Restarted on the restored log, the agent pushes at once and the coordinator refuses it, audited.
    restarted = Managed(
        name=f"{SITE}-restarted",
        argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(site["config"])],
        log_path=site["base"] / SITE / "agent-restarted.log",
    ).start()
    site["procs"].append(restarted)
    wait_json(layout.endpoints, restarted, timeout=300)
    coord_audit = CoordinatorLayout(site["state"]).audit

    def refused() -> dict[str, Any] | None:
        found = [r for r in _records(coord_audit) if r["action"] == "witness.refused" and r["actor"] == SITE]
        return found[-1] if found else None

    record = _until(refused, "the coordinator did not refuse the rolled-back log's pushed checkpoint")
    assert record["details"]["stage"] == "push"
    assert "audit log rolled back or cut" in record["details"]["error"], record
    assert _until(
        lambda: "audit checkpoint refused" in (site["base"] / SITE / "agent-restarted.log").read_text(),
        "the agent did not log the refusal",
    )
    assert restarted.alive()  # serving goes on regardless
