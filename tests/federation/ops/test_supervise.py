"""Supervision of child processes: port choice, restarts with back-off, whole trees killed and reaped."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from federation.ops.proctree import descendants
from federation.ops.supervise import Backoff, Managed, free_port, port_open, supervise


def _ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_free_port_is_bindable_distinct_and_outside_the_ephemeral_range() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= p <= high for p in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_supervise_restarts_a_dead_child(tmp_path: Path) -> None:
    marker = tmp_path / "starts"
    proc = Managed(
        name="flaky",
        argv=[sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"],
        log_path=tmp_path / "flaky.log",
    ).start()
    stopping = threading.Event()
    threading.Timer(3.5, stopping.set).start()
    supervise([proc], stopping)
    assert len(marker.read_text()) >= 2  # started once by us, at least once by the supervisor


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def test_supervise_never_gives_up_and_backs_off_a_child_that_keeps_dying(tmp_path: Path) -> None:
    """Issue 15, findings 1 and 3: a child that keeps failing (here: on a port taken) no longer makes
    the supervisor raise, which took the whole daemon down; it is restarted after 1, 2, 4 ... s (at
    most `cap`), and `Health` shows it down meanwhile."""
    marker = tmp_path / "starts"
    proc = Managed(
        name="broken",
        argv=[
            sys.executable,
            "-c",
            f"import sys, time; open({str(marker)!r}, 'a').write(f'{{time.monotonic()}}\\n'); "
            "print('Binding service [fleet] failed'); sys.exit(1)",
        ],
        log_path=tmp_path / "broken.log",
    ).start()
    stopping = threading.Event()
    changes: list[dict[str, object]] = []
    threading.Timer(14, stopping.set).start()
    health = supervise(
        [proc], stopping, backoff=Backoff(initial=1, cap=4, stable=60), on_change=lambda h: changes.append(h.snapshot())
    )
    starts = [float(line) for line in marker.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) >= 4, starts  # never gave up
    assert gaps[1] > gaps[0] + 0.5 and max(gaps) < 4 + 3, gaps  # backed off, within the cap
    state = health.get("broken")
    # the last restart may be stopped before its Python wrote its start (interpreter start-up under load)
    assert state.failures >= 3 and state.restarts in (len(starts) - 1, len(starts)) and state.last_exit == 1
    assert any(c["state"] == "degraded" and c["down"] == ["broken"] for c in changes)


def test_a_dead_childs_leftovers_are_killed_and_reaped_before_it_restarts(tmp_path: Path) -> None:
    """Issue 15, finding 1: the child's own children (nginx's worker, holding the port) are killed with
    it (its session), and so is one that left its session (handed to the subreaper supervisor), and
    none is left a zombie; the port is free for the restarted child."""
    port = free_port()
    serve = f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); time.sleep(600)"
    script = (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {serve!r}])\n"  # the "worker", in the child's session
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    proc = Managed(name="master", argv=[sys.executable, "-c", script], log_path=tmp_path / "m.log").start()
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        left = {pid: _start_time(pid) for pid in descendants(proc.pid)}
        assert len(left) == 2
        os.kill(proc.pid, signal.SIGKILL)
        stopping = threading.Event()
        threading.Timer(4, stopping.set).start()
        supervise([proc], stopping, backoff=Backoff(initial=10))  # sees it die; restarts it only after 10 s
        assert not [pid for pid, start in left.items() if _start_time(pid) == start]  # killed and reaped
        assert not port_open("127.0.0.1", port)
    finally:
        proc.stop()


def test_a_child_nobody_waits_for_is_reaped(tmp_path: Path) -> None:
    """Issue 15, finding 4: a `Managed` child killed while nobody polls it (the demo's agents) does not
    stay a zombie."""
    proc = Managed(
        name="idle", argv=[sys.executable, "-c", "import time; time.sleep(600)"], log_path=tmp_path / "i.log"
    )
    proc.start()
    start = _start_time(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _start_time(proc.pid) == start:
        assert time.monotonic() < deadline, "left a zombie"
        time.sleep(0.1)
    assert proc.proc is not None and proc.proc.returncode == -signal.SIGKILL


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(initial=1, cap=30)
    assert [backoff.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
