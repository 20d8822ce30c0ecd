"""Separate hosts on one machine: a network namespace per party, wired to a switch, made and removed by a test.

    with Hosts(["coord", "site-a", "site-b"]) as net:
        proc = net.run_in("coord", ["fedseek", "coordinator", "start", ...], log=path)
        net.address("coord")            # 10.77.0.11: the only address a party has besides its loopback
        net.link_down("site-a"); net.link_up("site-a")     # its switch port: a cut cable
        net.netem("site-b", delay_ms=200, loss_pct=5)       # a slow, lossy wire
        net.move_address("10.77.0.10", "coord", "standby")  # IP failover, with a gratuitous ARP

Layout: the switch is a Linux bridge `br0` in a namespace of its own (nothing touches the machine's
interfaces); each host is a namespace with `lo` and `eth0`, one end of a veth pair whose other end
(`p<i>`) is a port of that bridge. Addresses come from `subnet` and exist only on those `eth0`s: the
machine's own namespace has no interface, route or listener of theirs, and one host's loopback is
not another's, so parties reach each other only through the switch.

Names carry the creating process's pid (`fsmh-<pid>-<n>-<host>`), so two tests never collide and a
run that died without cleaning up is found and removed by the next (`reap_stale`). On exit, even
after a failure, every process started in a host is killed with its whole tree (a party's own
nested namespaces included), then the namespaces are deleted, which deletes the veths and bridge.

Faults use the kernel's tools: `ip link set ... down` for a link, `tc qdisc ... netem` for delay and
loss. Where the kernel has no netem (`netem_available` says why), `netem` puts a relay on the host's
switch port instead (`tests.multihost.wire`), with the same meaning: the host's outgoing frames are
delayed and dropped; `impairment` says which was used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "fsmh"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-")
_counter = itertools.count()


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`): the tests that need them skip with this reason."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why separate hosts cannot be made on this machine, or None if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces, veth pairs and a bridge needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` refused: {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        if veth.returncode != 0:
            return f"no veth pairs: {veth.stderr.strip()}"
        bridge = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"no bridges: {bridge.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def netem_available() -> str | None:
    """Why `tc ... netem` cannot be used here, or None if it can (tried on a throwaway veth)."""
    if shutil.which("tc") is None:
        return "no `tc` command"
    probe = f"{PREFIX}-{os.getpid()}-netem"
    _ip("netns", "add", probe)
    try:
        _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        tried = subprocess.run(
            ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "a0", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if tried.returncode != 0:
            return f"tc netem refused: {tried.stderr.strip()} (kernel without sch_netem)"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def impairment_unavailable_reason() -> str | None:
    """Why `Hosts.netem` cannot work here (no netem and no `ethtool` for the relay), or None."""
    netem = netem_available()
    if netem is None or shutil.which("ethtool") is not None:
        return None
    return f"{netem}, and no `ethtool` to ready the relay that stands in for it (apt-get install ethtool)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parents() -> dict[int, int]:
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # comm may hold spaces
    return found


def process_trees(roots: Iterable[int]) -> set[int]:
    """`roots` and all their descendants (children that started their own session or namespace too)."""
    parents = _parents()
    tree = {r for r in roots if r in parents}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def kill_trees(roots: Iterable[int]) -> None:
    """SIGKILL every process of the trees at once, as a power cut does: stopped first, so that no
    supervisor among them sees a child die and starts another."""
    pids = process_trees(roots)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _netns_pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def _delete_netns(netns: str) -> None:
    kill_trees(_netns_pids(netns))
    _ip("netns", "del", netns, check=False)


def reap_stale() -> list[str]:
    """Delete the namespaces (and kill the processes) of earlier runs whose process is gone."""
    out = _ip("netns", "list", check=False).stdout
    stale = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_netns(name)
            stale.append(name)
    return stale


def our_namespaces() -> list[str]:
    """This process's namespaces that exist now."""
    mine = f"{PREFIX}-{os.getpid()}-"
    return [ln.split()[0] for ln in _ip("netns", "list", check=False).stdout.splitlines() if ln.startswith(mine)]


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str
    port: str  # its switch port, in the switch's namespace


_GARP = """
import socket, struct, sys
ip = socket.inet_aton(sys.argv[1])
mac = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))
arp = struct.pack('!HHBBH6s4s6s4s', 1, 0x0800, 6, 4, 1, mac, ip, b'\\0' * 6, ip)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('eth0', 0))
for _ in range(3):
    s.send(b'\\xff' * 6 + mac + b'\\x08\\x06' + arp)
"""


@dataclass
class Hosts:
    """Hosts on one switch; a context manager that makes them and always removes them."""

    names: Sequence[str]
    subnet: str = "10.77.0.0/24"
    first_host: int = 11  # addresses from .11 on; lower ones are free for service addresses
    hosts: dict[str, Host] = field(default_factory=dict, init=False)
    switch: str = field(default="", init=False)
    impairment: str = field(default="", init=False)  # "netem" or "relay" once `netem` was used
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    _relays: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    _restore_sigterm: bool = field(default=False, init=False)

    def __enter__(self) -> Hosts:
        reason = unavailable_reason()
        if reason is not None:
            raise HostsUnavailable(reason)
        reap_stale()
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            # A SIGTERM (a CI timeout) unwinds through `close` instead of leaving the namespaces behind.
            signal.signal(signal.SIGTERM, _terminate)
            self._restore_sigterm = True
        net = ipaddress.ip_network(self.subnet)
        self._prefix = net.prefixlen
        run = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        self.switch = f"{run}-switch"
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                host = Host(name, f"{run}-{name}", str(net[self.first_host + i]), f"p{i}")
                _ip("netns", "add", host.netns)
                _ip("-n", host.netns, "link", "add", "eth0", "type", "veth", "peer", "name", host.port)
                _ip("-n", host.netns, "link", "set", host.port, "netns", self.switch)
                _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/{self._prefix}", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                self.hosts[name] = host
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill everything started in the hosts, then delete every namespace (their veths go with them)."""
        if self._restore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._restore_sigterm = False
        kill_trees([p.pid for p in [*self._procs, *self._relays.values()]])
        for p in [*self._procs, *self._relays.values()]:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        for host in self.hosts.values():
            _delete_netns(host.netns)
        if self.switch:
            _delete_netns(self.switch)

    # ---- who is where ------------------------------------------------------------------------
    def address(self, name: str) -> str:
        return self.hosts[name].address

    def service_address(self, index: int) -> str:
        """An address of the subnet below the hosts' own (for a service that moves between hosts)."""
        return str(ipaddress.ip_network(self.subnet)[index])

    # ---- running things on a host ---------------------------------------------------------------
    def argv_in(self, name: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name].netns, *argv]

    def run_in(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` on host `name` (its own session); killed with its tree when the hosts close."""
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = log.open("ab")
        try:
            proc = subprocess.Popen(
                self.argv_in(name, argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd or ROOT,
                start_new_session=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self._procs.append(proc)
        return proc

    def check_in(self, name: str, argv: Sequence[str], *, timeout: float = 120, **kwargs: Any) -> str:
        """Run `argv` on host `name` to completion; its stdout (AssertionError with its output on failure)."""
        done = subprocess.run(
            self.argv_in(name, argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs
        )
        assert done.returncode == 0, f"{argv} on {name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def crash(self, name: str) -> None:
        """The host loses power: its link goes, and every process started on it dies at once (SIGKILL)."""
        self.link_down(name)
        netns = self.hosts[name].netns
        kill_trees([*_netns_pids(netns), *(p.pid for p in self._procs if self._in(p, netns))])

    def _in(self, proc: subprocess.Popen[bytes], netns: str) -> bool:
        return proc.poll() is None and isinstance(proc.args, list) and netns in proc.args

    # ---- faults, with the kernel's tools ------------------------------------------------------------
    def link_down(self, name: str) -> None:
        """Its switch port goes down, as a pulled cable: the host loses carrier, frames are dropped."""
        _ip("-n", self.switch, "link", "set", self.hosts[name].port, "down")

    def link_up(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[name].port, "up")

    def netem(self, name: str, *, delay_ms: float, loss_pct: float, seed: int = 1) -> str:
        """Delay and drop the host's outgoing frames (`tc netem` on its eth0, or the relay); returns which."""
        host = self.hosts[name]
        if netem_available() is None:
            self.check_in(name, ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay",
                                 f"{delay_ms:g}ms", "loss", f"{loss_pct:g}%"])  # fmt: skip
            self.impairment = "netem"
            return self.impairment
        if shutil.which("ethtool") is None:
            raise HostsUnavailable("no netem in this kernel and no `ethtool` to ready the relay's ports")
        self.clear_netem(name)
        relay_port, switch_end = f"r{host.port[1:]}", f"s{host.port[1:]}"
        _ip("-n", self.switch, "link", "add", relay_port, "type", "veth", "peer", "name", switch_end)
        _ip("-n", self.switch, "link", "set", host.port, "nomaster")
        _ip("-n", self.switch, "link", "set", switch_end, "master", "br0", "up")
        _ip("-n", self.switch, "link", "set", relay_port, "up")
        # Relayed frames must be whole: every sender fills in its checksums and segments itself.
        offloads = ["tx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off"]
        for other in self.hosts.values():
            subprocess.run(["ip", "netns", "exec", other.netns, "ethtool", "-K", "eth0", *offloads],
                           capture_output=True, check=False, timeout=30)  # fmt: skip
        for port in (host.port, relay_port, switch_end):
            subprocess.run(["ip", "netns", "exec", self.switch, "ethtool", "-K", port, *offloads],
                           capture_output=True, check=False, timeout=30)  # fmt: skip
        wire = ["--host-port", host.port, "--switch-port", relay_port, "--seed", str(seed)]
        wire += ["--delay-ms", f"{delay_ms:g}", "--loss-pct", f"{loss_pct:g}"]
        relay = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, sys.executable, "-m", "tests.multihost.wire", *wire],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._relays[name] = relay
        assert relay.stdout is not None
        line = relay.stdout.readline()  # printed once both sockets are bound
        assert line.startswith(b"wire "), line + relay.stdout.read()
        self.impairment = "relay"
        return self.impairment

    def clear_netem(self, name: str) -> None:
        """The host's wire is a plain cable again."""
        host = self.hosts[name]
        relay = self._relays.pop(name, None)
        if relay is None:
            subprocess.run(self.argv_in(name, ["tc", "qdisc", "del", "dev", "eth0", "root"]),
                           capture_output=True, check=False, timeout=30)  # fmt: skip
            return
        relay.terminate()
        relay.wait(timeout=10)
        _ip("-n", self.switch, "link", "del", f"r{host.port[1:]}")  # its peer on the bridge goes with it
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")

    # ---- a service address that moves ----------------------------------------------------------------
    def add_address(self, name: str, address: str) -> None:
        _ip("-n", self.hosts[name].netns, "addr", "add", f"{address}/{self._prefix}", "dev", "eth0")

    def move_address(self, address: str, src: str, dst: str) -> None:
        """IP failover, as VRRP does it: the address leaves `src` (if it still can) and comes up on `dst`,
        which announces it with gratuitous ARP so the others' neighbour caches follow at once."""
        _ip("-n", self.hosts[src].netns, "addr", "del", f"{address}/{self._prefix}", "dev", "eth0", check=False)
        self.add_address(dst, address)
        self.check_in(dst, [sys.executable, "-c", _GARP, address])


def wait_for(predicate: Any, *, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll `predicate()` until it returns something truthy; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)
