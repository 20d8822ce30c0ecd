"""Shared by the fleet e2e tests: a coordinator process and SuperNodes behind site sidecars."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from federation.procs import Managed, free_port
from federation.sidecar import TLSFiles, client_config, make_sidecar

FLWR_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1"}


def wait_json(path: Path, proc: Managed, timeout: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        assert proc.alive(), proc.log_path.read_text()[-2000:]
        time.sleep(0.3)
    raise AssertionError(f"{path} not written in {timeout}s")


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
    """A SuperNode behind its own site sidecar (tls given) or pointed straight at `target`."""
    procs: list[Managed] = []
    superlink = target
    if tls is not None:
        port = free_port()
        sidecar = make_sidecar(
            name=f"{name}-sidecar",
            config_text=client_config(tls=tls, accept=f"127.0.0.1:{port}", connect=target, server_name="localhost"),
            workdir=tmp_path / name,
        )
        procs.append(sidecar.start())
        sidecar.wait_port("127.0.0.1", port, timeout=20)
        superlink = f"127.0.0.1:{port}"
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


def activated(coord: dict[str, object]) -> int:
    log = Path(str(coord["state"])) / "logs" / "superlink.log"
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
    info = wait_json(tmp_path / "coord" / "coordinator.json", proc)
    info["state"] = str(tmp_path / "coord")
    return info
