"""What a process tree exposes on the host: its pids and the TCP ports it listens on.

Read from /proc as seen by the test process, i.e. in the host's network namespace: a socket
of a process inside a private network namespace is not in this view, which is the point.
"""

from __future__ import annotations

import os
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


def started(pid: int) -> str | None:
    """`pid`'s start time (clock ticks after boot), which tells it from a later process given the same
    pid (pids wrap quickly on a busy host); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def running(procs: dict[int, str | None]) -> list[int]:
    """Those of `procs` (pid: start time) that still run. A zombie does not: it has given back its
    ports, memory and files, and only its parent can remove it. For an orphan that parent is init,
    and a container's PID 1 may never reap (CI's does not: the orphans it adopted stayed zombies)."""
    alive = []
    for pid, start in procs.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            alive.append(pid)
    return alive


def process_tree(root: int) -> set[int]:
    """`root` and every descendant (by parent pid; a child that started its own session counts)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # comm may hold spaces
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _host_listeners() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket in this network namespace."""
    found: dict[int, tuple[str, int]] = {}
    for table, v6 in (("/proc/self/net/tcp", False), ("/proc/self/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != _LISTEN:
                continue
            hexaddr, hexport = cols[1].split(":")
            found[int(cols[9])] = (_address(hexaddr, v6), int(hexport, 16))
    return found


def _address(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    if not v6:
        return ".".join(str(b) for b in reversed(raw))
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # four host-order 32-bit words
    import ipaddress

    return str(ipaddress.IPv6Address(b"".join(words)))


def tree_listeners(root: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP port that `root`'s process tree listens on in the host namespace."""
    listeners = _host_listeners()
    return {listeners[i] for pid in process_tree(root) for i in _socket_inodes(pid) if i in listeners}
