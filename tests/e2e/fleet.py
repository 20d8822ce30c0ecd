"""Shared by the fleet e2e tests: a coordinator process (SuperLink + nginx gateway) and SuperNodes
behind site sidecars."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.ops.layout import CoordinatorLayout
from federation.ops.supervise import Managed, free_port
from federation.security.sidecar import TLSFiles, client_config, make_sidecar

# PATH: SuperNodes start `flower-superexec` by name, from this environment's bin/
FLWR_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]),
}


def wait_json(path: Path, proc: Managed, timeout: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        assert proc.alive(), proc.log_path.read_text()[-2000:]
        time.sleep(0.3)
    raise AssertionError(f"{path} not written in {timeout}s")


def site_sidecar(tmp_path: Path, name: str, *, tls: TLSFiles, target: str) -> tuple[Managed, str]:
    """A site's fleet sidecar (started): its loopback TLS address for the SuperNode."""
    port = free_port()
    sidecar = make_sidecar(
        name=f"{name}-sidecar",
        config_text=client_config(
            tls=tls,
            accept=f"127.0.0.1:{port}",
            relay=f"127.0.0.1:{free_port()}",
            connect=target,
            server_name="localhost",
        ),
        workdir=tmp_path / name,
    )
    sidecar.start().wait_port("127.0.0.1", port, timeout=20)
    return sidecar, f"127.0.0.1:{port}"


def supernode(
    tmp_path: Path,
    name: str,
    *,
    tls: TLSFiles | None,
    target: str,
    auth_key: Path,
    ca: Path,
    max_retries: int = 3,
    max_wait: float = 20,
) -> list[Managed]:
    """A SuperNode behind its own site sidecar (tls given) or pointed straight at `target`.

    `ca` is what the SuperNode trusts: the CA of the certificate its sidecar serves it.
    """
    procs: list[Managed] = []
    superlink = target
    if tls is not None:
        sidecar, superlink = site_sidecar(tmp_path, name, tls=tls, target=target)
        procs.append(sidecar)
    procs.append(
        Managed(
            name=name,
            argv=[
                str(Path(sys.executable).parent / "flower-supernode"),
                "--root-certificates",
                str(ca),
                "--superlink",
                superlink,
                "--auth-supernode-private-key",
                str(auth_key),
                "--port",
                str(free_port()),
                "--max-retries",
                str(max_retries),
                "--max-wait-time",
                str(max_wait),
            ],
            log_path=tmp_path / name / "supernode.log",
            env={**FLWR_ENV, "FLWR_HOME": str(tmp_path / name / "flwr")},
        ).start()
    )
    return procs


def audit_records(state: Path, action: str | None = None) -> list[dict[str, Any]]:
    """The coordinator's audit records (of one `action`, if given)."""
    path = CoordinatorLayout(state).audit
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if action is None or r["action"] == action]


def wait_record(
    state: Path, action: str, match: Callable[[dict[str, Any]], bool], timeout: float, *, after: int = 0
) -> dict[str, Any]:
    """The first `action` audit record (from the `after`-th on) that `match`es, waiting up to
    `timeout` seconds for it."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in audit_records(state, action)[after:] if match(r)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching {action} record in {timeout}s: {audit_records(state, action)}")
        time.sleep(0.3)


def activated(coord: dict[str, object]) -> int:
    log = CoordinatorLayout(Path(str(coord["state"]))).superlink_log
    return log.read_text(errors="replace").count("Activated node_id")


def wait_activated(coord: dict[str, object], count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if activated(coord) >= count:
            return True
        time.sleep(0.5)
    return False


def stop(procs: list[Managed]) -> None:
    for p in reversed(procs):
        p.stop()


def start_coordinator(tmp_path: Path, argv: list[str]) -> tuple[Managed, dict[str, object]]:
    """`fedseek coordinator start ARGV...`; returns the process and its coordinator.json."""
    proc = Managed(
        name="coordinator",
        argv=[sys.executable, "-m", "federation.cli.main", "coordinator", "start", *argv],
        log_path=tmp_path / "coordinator.log",
    ).start()
    return proc, proc_info(tmp_path, proc)


def proc_info(tmp_path: Path, proc: Managed) -> dict[str, object]:
    info = wait_json(CoordinatorLayout(tmp_path / "coord").endpoints, proc)
    info["state"] = str(tmp_path / "coord")
    return info
