"""Real processes: a coordinator (SuperLink + stunnel) and raw `flower-supernode`s.

Only a SuperNode whose sidecar presents a consortium certificate AND whose Flower auth key
is registered gets in; the others fail at the TLS handshake or at SuperNode authentication.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation import pki
from federation.flower_auth import ensure_auth_keypair
from federation.procs import Managed, free_port
from federation.sidecar import TLSFiles, client_config, make_sidecar

pytestmark = pytest.mark.e2e

FLWR_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1"}


def _wait_json(path: Path, proc: Managed, timeout: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        assert proc.alive(), proc.log_path.read_text()[-2000:]
        time.sleep(0.3)
    raise AssertionError(f"{path} not written in {timeout}s")


@pytest.fixture
def coordinator(tmp_path: Path, pki_dir: Path) -> Iterator[dict[str, object]]:
    keys = tmp_path / "site-keys"
    keys.mkdir()
    shutil.copy(ensure_auth_keypair(pki_dir / "site-a").public_key, keys / "site-a.pub")
    fleet_port = free_port()
    proc = Managed(
        name="coordinator",
        argv=[
            sys.executable,
            "-m",
            "federation.cli.main",
            "coordinator",
            "start",
            "--pki",
            str(pki_dir),
            "--state",
            str(tmp_path / "coord"),
            "--fleet-port",
            str(fleet_port),
            "--site-keys",
            str(keys),
        ],
        log_path=tmp_path / "coordinator.log",
    ).start()
    try:
        info = _wait_json(tmp_path / "coord" / "coordinator.json", proc)
        info["state"] = str(tmp_path / "coord")
        yield info
    finally:
        proc.stop()


def _supernode(
    tmp_path: Path, name: str, *, tls: TLSFiles | None, target: str, auth_key: Path, ca: Path
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
                "3",
                "--max-wait-time",
                "20",
            ],
            log_path=tmp_path / name / "supernode.log",
            env={**FLWR_ENV, "FLWR_HOME": str(tmp_path / name / "flwr")},
        ).start()
    )
    return procs


def _activated(coord: dict[str, object]) -> int:
    log = Path(str(coord["state"])) / "logs" / "superlink.log"
    return log.read_text(errors="replace").count("Activated node_id")


def _wait_activated(coord: dict[str, object], count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _activated(coord) >= count:
            return True
        time.sleep(0.5)
    return False


def _stop(procs: list[Managed]) -> None:
    for p in reversed(procs):
        p.stop()


def test_only_consortium_certificate_with_registered_key_gets_in(
    tmp_path: Path, pki_dir: Path, coordinator: dict[str, object]
) -> None:
    ca = pki_dir / "ca" / "ca.pem"
    fleet = str(coordinator["fleet"])
    site_a = pki.load_leaf(pki_dir, "site-a")
    key_a = ensure_auth_keypair(pki_dir / "site-a").private_key

    # 1. A certificate from another CA: the coordinator's sidecar refuses the handshake.
    other = tmp_path / "other-pki"
    pki.init_ca(other, consortium="fedseek-test")
    pki.issue(other, "site-a", role="node")
    rogue_leaf = pki.load_leaf(other, "site-a")
    rogue = _supernode(
        tmp_path, "rogue", tls=TLSFiles(rogue_leaf.cert, rogue_leaf.key, ca), target=fleet, auth_key=key_a, ca=ca
    )
    # 2. No client certificate at all: straight to the mTLS port.
    bare = _supernode(tmp_path, "bare", tls=None, target=fleet, auth_key=key_a, ca=ca)
    try:
        assert not _wait_activated(coordinator, 1, timeout=15), "a node without a consortium certificate got in"
    finally:
        _stop(rogue + bare)
    coord_sidecar_log = (Path(str(coordinator["state"])) / "sidecar" / "fleet-sidecar.log").read_text(errors="replace")
    assert (
        "CERTIFICATE_REQUIRED" in coord_sidecar_log.upper() or "peer did not return a certificate" in coord_sidecar_log
    )
    assert (
        "certificate verify failed" in coord_sidecar_log.lower()
        or "unable to get local issuer" in coord_sidecar_log.lower()
    )

    # 3. A consortium certificate but an unregistered Flower auth key: the second factor refuses it.
    site_b = pki.load_leaf(pki_dir, "site-b")
    unregistered = _supernode(
        tmp_path,
        "unregistered",
        tls=TLSFiles(site_b.cert, site_b.key, ca),
        target=fleet,
        auth_key=ensure_auth_keypair(pki_dir / "site-b").private_key,
        ca=ca,
    )
    try:
        assert not _wait_activated(coordinator, 1, timeout=12), "a node with an unregistered auth key got in"
    finally:
        _stop(unregistered)
    link_log = (Path(str(coordinator["state"])) / "logs" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link_log

    # 4. Positive control: consortium certificate and registered key.
    good = _supernode(tmp_path, "good", tls=TLSFiles(site_a.cert, site_a.key, ca), target=fleet, auth_key=key_a, ca=ca)
    try:
        assert _wait_activated(coordinator, 1, timeout=40), (tmp_path / "good" / "supernode.log").read_text()[-2000:]
    finally:
        _stop(good)
