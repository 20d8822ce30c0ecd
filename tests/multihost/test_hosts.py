"""The multi-host harness itself: hosts are really separate, faults really happen, nothing is left behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.hosts import (
    PREFIX,
    Hosts,
    impairment_unavailable_reason,
    our_namespaces,
    reap_stale,
    unavailable_reason,
)

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"separate hosts cannot be made here: {REASON}")

ECHO = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 47123))
s.listen()
while True:
    c, _ = s.accept()
    while (d := c.recv(65536)):
        c.sendall(d)
    c.close()
"""

# Connect, send 64 KiB, read the echo; prints the connect time and the whole exchange's time.
CLIENT = """
import socket, sys, time
t = time.monotonic()
c = socket.create_connection((sys.argv[1], 47123), timeout=float(sys.argv[2]))
t1 = time.monotonic()
c.sendall(b"x" * 65536)
c.shutdown(socket.SHUT_WR)
n = 0
while (d := c.recv(65536)):
    n += len(d)
assert n == 65536, n
print(t1 - t, time.monotonic() - t)
"""


def _client(net: Hosts, host: str, target: str, *, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        net.argv_in(host, [sys.executable, "-c", CLIENT, target, str(timeout)]),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _serve(net: Hosts, host: str, bind: str = "0.0.0.0") -> None:
    net.run_in(host, [sys.executable, "-c", ECHO, bind])
    target = net.address(host) if bind == "0.0.0.0" else bind
    deadline = time.monotonic() + 30
    while _probe(net, host, target) != 0:  # ready once it accepts, asked from its own host
        assert time.monotonic() < deadline, "echo server did not start"
        time.sleep(0.2)


def _probe(net: Hosts, host: str, target: str) -> int:
    code = f"import socket; socket.create_connection(({target!r}, 47123), timeout=2).close()"
    return subprocess.run(net.argv_in(host, [sys.executable, "-c", code]), capture_output=True, timeout=30).returncode


@pytest.fixture
def net() -> Iterator[Hosts]:
    with Hosts(["a", "b"]) as hosts:
        yield hosts


def test_hosts_are_made_and_removed() -> None:
    before = set(our_namespaces())
    with Hosts(["a", "b", "c"]) as hosts:
        made = set(our_namespaces()) - before
        assert made == {hosts.switch, *(h.netns for h in hosts.hosts.values())}
        assert len({h.address for h in hosts.hosts.values()}) == 3
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert "br0" not in links and " p0" not in links  # nothing of theirs in the machine's namespace
    assert set(our_namespaces()) == before


def test_a_host_reaches_another_only_at_its_address(net: Hosts) -> None:
    _serve(net, "b")
    done = _client(net, "a", net.address("b"))
    assert done.returncode == 0, done.stderr
    # b's loopback is b's own: a's 127.0.0.1 has no such server (no loopback shortcut between parties)
    assert _probe(net, "a", "127.0.0.1") != 0
    # ...and a server on b's loopback only is out of a's reach at any address
    net.run_in("b", [sys.executable, "-c", ECHO.replace("47123", "47124"), "127.0.0.1"])
    time.sleep(1.0)
    assert _probe(net, "a", net.address("b")) == 0  # the :47123 one still answers
    code = f"import socket; socket.create_connection(({net.address('b')!r}, 47124), timeout=2).close()"
    refused = subprocess.run(net.argv_in("a", [sys.executable, "-c", code]), capture_output=True, timeout=30)
    assert refused.returncode != 0


def test_the_machine_itself_has_no_way_to_the_hosts(net: Hosts) -> None:
    """No interface, route or listener of the hosts is in the machine's own namespace (where this test
    runs), so nothing here can talk to a party except by entering its namespace."""
    _serve(net, "b")
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert net.address("a") not in addrs and net.address("b") not in addrs
    route = subprocess.run(["ip", "route", "get", net.address("b")], capture_output=True, text=True)
    assert "dev lo" not in route.stdout and "br0" not in route.stdout and "eth0 " not in route.stdout.split("via")[0]
    tcp = Path("/proc/self/net/tcp").read_text()
    assert f":{47123:04X} " not in tcp  # b's listener is not in this namespace's table
    # Nor does a loopback connection land there.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", 47123), timeout=2):
        pass


def test_link_down_cuts_a_host_off_and_link_up_brings_it_back(net: Hosts) -> None:
    _serve(net, "b")
    net.link_down("a")
    assert _client(net, "a", net.address("b"), timeout=3).returncode != 0
    net.link_up("a")
    deadline = time.monotonic() + 30
    while (done := _client(net, "a", net.address("b"), timeout=3)).returncode != 0:
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.5)


@pytest.mark.skipif(REASON is None and impairment_unavailable_reason() is not None, reason="no netem, no ethtool")
def test_netem_delays_and_drops_a_hosts_traffic(net: Hosts) -> None:
    _serve(net, "b")
    plain = _client(net, "a", net.address("b"))
    assert plain.returncode == 0, plain.stderr
    kind = net.netem("a", delay_ms=200, loss_pct=5)
    assert kind in {"netem", "relay"}
    connects = []
    for _ in range(3):
        done = _client(net, "a", net.address("b"))
        assert done.returncode == 0, done.stderr
        connects.append(float(done.stdout.split()[0]))
    # The SYN leaves a and waits 200 ms on the wire: no handshake can be faster (a lower bound, so
    # a loaded machine cannot make it fail), and a lost SYN only adds to it.
    assert min(connects) >= 0.19, connects
    net.clear_netem("a")
    again = _client(net, "a", net.address("b"))
    assert again.returncode == 0 and float(again.stdout.split()[0]) < 0.19, again


def test_a_moved_address_answers_from_its_new_host() -> None:
    with Hosts(["client", "primary", "standby"]) as net:
        vip = net.service_address(10)
        net.add_address("primary", vip)
        _serve(net, "primary")
        assert _client(net, "client", vip).returncode == 0  # the client's neighbour cache now names primary
        net.crash("primary")
        assert _client(net, "client", vip, timeout=3).returncode != 0
        net.move_address(vip, "primary", "standby")
        _serve(net, "standby")
        done = _client(net, "client", vip)  # at once: the gratuitous ARP moved the client's cache
        assert done.returncode == 0, done.stderr


@pytest.mark.skipif(REASON is None and impairment_unavailable_reason() is not None, reason="no netem, no ethtool")
def test_everything_is_removed_after_a_failure() -> None:
    before = set(our_namespaces())
    started: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), Hosts(["a", "b"]) as net:
        started.append(net.run_in("a", [sys.executable, "-c", "import time; time.sleep(600)"]).pid)
        net.netem("b", delay_ms=10, loss_pct=0)
        raise RuntimeError("boom")
    assert set(our_namespaces()) == before
    time.sleep(0.2)
    assert not Path(f"/proc/{started[0]}").exists() or "Z" in Path(f"/proc/{started[0]}/stat").read_text().split()[2]


def test_a_crashed_runs_namespaces_are_reaped() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{PREFIX}-{dead.stdout.strip()}-0-site"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in reap_stale()
        assert stale not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
