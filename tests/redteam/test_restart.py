"""Issue 15, findings 1 and 2, real processes: the coordinator survives a killed fleet gateway, and
a coordinator restarted with the same command on the same state comes back with its history.

Before: `kill -9` of the gateway's nginx master left its worker holding the fleet port (re-parented
to pid 1); every restart of nginx failed on bind, and after 6 tries in 60 s the whole coordinator
exited, SuperLink and admin API included. Started again on the same state it failed for good:
`registering site-a: flwr supernode register failed: }` (the SuperLink answers 412: the key is
already in `superlink.db`), so recovery meant moving the database, and the run history, aside.

Now the supervisor owns its children's whole process trees (each child in a session of its own,
the supervisor a child subreaper): a dead child's leftovers are killed and reaped before it is
restarted, and a child that keeps failing is restarted with a capped back-off, never taking the
rest down. A key the SuperLink already holds is the site's registration, read back from its
database, which stays where it is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import sys
import time
from pathlib import Path

import pytest

from federation.ops.layout import CoordinatorLayout
from federation.ops.supervise import Managed, free_port, port_open
from federation.security.flower_auth import ensure_auth_keypair
from tests.e2e.fleet import audit_records
from tests.redteam.procnet import process_tree, running, started, tree_listeners

pytestmark = pytest.mark.e2e

READY_S = 120.0


def _children(pid: int) -> dict[int, list[str]]:
    """Direct children of `pid` and their command lines."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
    return found


def _nginx_master(coordinator: int) -> int | None:
    masters = [
        pid for pid, argv in _children(coordinator).items() if argv and argv[0].startswith(("nginx", "/usr/sbin/nginx"))
    ]
    return masters[0] if len(masters) == 1 else None


def _start(tmp_path: Path, argv: list[str], *, log: str) -> tuple[Managed, dict[str, object]]:
    """`fedseek coordinator start ARGV`; waits for the coordinator.json that this process wrote."""
    proc = Managed(
        name="coordinator",
        argv=[sys.executable, "-m", "federation.cli.main", "coordinator", "start", *argv],
        log_path=tmp_path / log,
    ).start()
    endpoints = CoordinatorLayout(tmp_path / "coord").endpoints
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        assert proc.alive(), f"coordinator exited:\n{proc.log_path.read_text()[-3000:]}"
        try:
            info = dict(json.loads(endpoints.read_text()))
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            return proc, info
        time.sleep(0.3)
    proc.stop()
    raise AssertionError(f"coordinator not ready in {READY_S}s:\n{proc.log_path.read_text()[-3000:]}")


def _argv(tmp_path: Path, pki_dir: Path) -> list[str]:
    keys = tmp_path / "site-keys"
    keys.mkdir(exist_ok=True)
    shutil.copy(ensure_auth_keypair(pki_dir / "site-a").public_key, keys / "site-a.pub")
    fleet = free_port()
    return [
        "--pki",
        str(pki_dir),
        "--state",
        str(tmp_path / "coord"),
        "--fleet-port",
        str(fleet),
        "--site-keys",
        str(keys),
    ]


def _https_status(url_host: str, port: int, pki_dir: Path, path: str) -> int:
    """A TLS request as site-a (consortium certificate) to host:port; the HTTP status."""
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(pki_dir / "site-a" / "cert.pem"), str(pki_dir / "site-a" / "key.pem"))
    with (
        socket.create_connection((url_host, port), timeout=20) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return int(tls.recv(200).split(b" ", 2)[1])


def _answers(port: int, pki_dir: Path) -> bool:
    """Whether the fleet gateway on `port` answers a site's request outside the Fleet API with its 403."""
    try:
        return _https_status("127.0.0.1", port, pki_dir, "/") == 403
    except (OSError, ValueError, IndexError):
        return False


def _admin_port(info: dict[str, object]) -> int:
    return int(str(info["admin"]).rsplit(":", 1)[1].strip("/"))


def test_a_killed_gateway_master_leaves_no_orphan_and_takes_nothing_down(tmp_path: Path, pki_dir: Path) -> None:
    """Finding 1: kill -9 of nginx's master. Its worker does not outlive it on the fleet port; a new
    gateway, the coordinator's own child, serves the port; SuperLink and admin API never go away."""
    argv = _argv(tmp_path, pki_dir)
    fleet = int(argv[argv.index("--fleet-port") + 1])
    proc, info = _start(tmp_path, argv, log="coordinator.log")
    try:
        master = _nginx_master(proc.pid)
        assert master is not None, _children(proc.pid)
        workers = {pid: started(pid) for pid in process_tree(master) - {master}}
        assert workers, "nginx runs one worker"
        superlink = int(str(info["superlink_pid"]))
        superlink_start = started(superlink)
        os.kill(master, signal.SIGKILL)

        deadline = time.monotonic() + 90
        new = None
        while time.monotonic() < deadline:
            assert proc.alive(), f"the coordinator exited:\n{proc.log_path.read_text()[-3000:]}"
            new = _nginx_master(proc.pid)
            if new not in (None, master) and ("127.0.0.1", fleet) in tree_listeners(new) and _answers(fleet, pki_dir):
                break
            time.sleep(0.5)
        else:
            orphans = running(workers)
            raise AssertionError(
                f"no new gateway on the fleet port in 90 s; old workers still there: {orphans}\n"
                f"{proc.log_path.read_text()[-3000:]}"
            )
        deadline = time.monotonic() + 60  # killed before the restart; on a loaded host exit may take a while
        while running(workers):
            assert time.monotonic() < deadline, "the dead master's workers were neither killed nor reaped"
            time.sleep(0.3)
        assert started(superlink) == superlink_start and proc.alive()
        assert _https_status("127.0.0.1", _admin_port(info), pki_dir, "/healthz") == 200
        # Survives a gateway that keeps dying too: killed again at once, and again, it comes back each time.
        for _ in range(6):
            current = _nginx_master(proc.pid)
            if current is not None:
                os.kill(current, signal.SIGKILL)
            time.sleep(1.0)
        deadline = time.monotonic() + 120
        while not (
            (current := _nginx_master(proc.pid)) is not None
            and ("127.0.0.1", fleet) in tree_listeners(current)
            and _answers(fleet, pki_dir)
        ):
            assert proc.alive(), f"the coordinator exited:\n{proc.log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the gateway did not come back after repeated kills"
            time.sleep(0.5)
        assert port_open("127.0.0.1", _admin_port(info)) and started(superlink) == superlink_start
    finally:
        proc.stop()


def _nodes(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return sorted(conn.execute("SELECT node_id, status FROM node").fetchall())


def test_restart_on_the_same_state_works_and_keeps_history(tmp_path: Path, pki_dir: Path) -> None:
    """Finding 2: the coordinator killed outright (kill -9, its gateway's master with it) and started
    again with the same command on the same state comes up, site-a registered under the node id it
    had, the orphaned nginx worker gone and the fleet port its new gateway's; superlink.db (the run
    history) is the same file, with the same node. A clean stop and a third start work too."""
    argv = _argv(tmp_path, pki_dir)
    layout = CoordinatorLayout(tmp_path / "coord")
    proc, info = _start(tmp_path, argv, log="coordinator-1.log")
    assert info["registered_sites"] == ["site-a"]
    first = [r["details"]["node_id"] for r in audit_records(layout.root, "site.registered")]
    assert len(first) == 1
    # Killed together with its gateway's master (kill -9 of both, as the OOM killer or a careless
    # operator would): the master's worker is left to init, holding the fleet port.
    master = _nginx_master(proc.pid)
    assert master is not None
    workers = {pid: started(pid) for pid in process_tree(master) - {master}}
    os.kill(master, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.proc is not None
    proc.proc.wait(30)
    time.sleep(2)
    orphans = running(workers)
    assert orphans, "the worker should outlive both (the scenario under test)"
    db_inode, nodes = layout.superlink_db.stat().st_ino, _nodes(layout.superlink_db)

    proc, info = _start(tmp_path, argv, log="coordinator-2.log")
    try:
        assert info["registered_sites"] == ["site-a"]
        deadline = time.monotonic() + 60
        while running(workers):
            assert time.monotonic() < deadline, f"the orphaned worker(s) {orphans} still run"
            time.sleep(0.3)
        fleet = int(argv[argv.index("--fleet-port") + 1])
        assert ("127.0.0.1", fleet) in tree_listeners(proc.pid)  # the new gateway holds the port
        again = [r["details"]["node_id"] for r in audit_records(layout.root, "site.registered")]
        assert again == [first[0], first[0]]
        assert layout.superlink_db.stat().st_ino == db_inode
        assert [n for n, _ in _nodes(layout.superlink_db)] == [n for n, _ in nodes]
    finally:
        proc.stop()
    proc, info = _start(tmp_path, argv, log="coordinator-3.log")
    try:
        assert info["registered_sites"] == ["site-a"]
        assert layout.superlink_db.stat().st_ino == db_inode
    finally:
        proc.stop()
