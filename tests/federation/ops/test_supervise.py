"""Supervision of child processes: port choice and the restart limit."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

from federation.ops.supervise import Managed, ProcessError, free_port, supervise


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
    supervise([proc], stopping, max_restarts=10, window=60)
    assert len(marker.read_text()) >= 2  # started once by us, at least once by the supervisor


def test_supervise_gives_up_on_a_child_that_keeps_dying(tmp_path: Path) -> None:
    proc = Managed(
        name="broken",
        argv=[sys.executable, "-c", "import sys; print('Binding service [fleet] failed'); sys.exit(1)"],
        log_path=tmp_path / "broken.log",
    ).start()
    stopping = threading.Event()
    watchdog = threading.Timer(60, stopping.set)
    watchdog.start()
    try:
        with pytest.raises(ProcessError, match=r"broken died 3 times.*giving up") as err:
            supervise([proc], stopping, max_restarts=2, window=60)
    finally:
        watchdog.cancel()
    assert "Binding service [fleet] failed" in str(err.value)
    assert not stopping.is_set()
