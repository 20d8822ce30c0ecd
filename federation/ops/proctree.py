"""Process trees as Linux sees them: who descends from whom, who shares a session, and making a
process the one its orphaned descendants are handed to (stdlib only: the namespace launcher uses it).

Why: a supervised child that dies can leave children behind (nginx's worker, still holding the
fleet port; a ClientApp of the app guard). Linux hands them to the nearest ancestor marked a child
subreaper, else to init. A supervisor that is a subreaper gets them back, so it can kill and reap
them before it starts the child again; nothing it started outlives it as an orphan or a zombie.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Proc", "adopt_orphans", "descendants", "die_with_parent", "kill_and_reap", "processes", "session_of"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    state: str  # one letter: R, S, D, Z (zombie), ...


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# Loaded once, here: `die_with_parent` runs between fork and exec, where loading a library is unsafe.
_LIBC = _load_libc()


def _prctl(option: int, arg: int) -> bool:
    if _LIBC is None:
        return False
    try:
        return int(_LIBC.prctl(option, arg, 0, 0, 0)) == 0
    except AttributeError:
        return False


def adopt_orphans() -> bool:
    """Make this process a child subreaper (Linux 3.4+): descendants orphaned by a dead child are
    re-parented to it rather than to init, so it can kill and reap them. Returns whether it took."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """For a `preexec_fn`: the child gets `sig` when the thread that started it exits (the
    supervisor's main thread: so, when the supervisor dies, even by SIGKILL)."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))


def _read(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # comm (in parentheses) may hold spaces
    return Proc(pid=pid, ppid=int(fields[1]), session=int(fields[3]), state=fields[0])


def processes() -> list[Proc]:
    """Every process visible in /proc, now."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := _read(int(entry))) is not None:
            found.append(proc)
    return found


def session_of(pid: int) -> int | None:
    proc = _read(pid)
    return proc.session if proc else None


def descendants(root: int, procs: Iterable[Proc] | None = None) -> set[int]:
    """Every live descendant of `root` (by parent pid), `root` excluded."""
    children: dict[int, list[int]] = {}
    for proc in processes() if procs is None else procs:
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found and pid != root:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def kill_and_reap(pids: Collection[int], *, timeout: float = 5.0) -> None:
    """SIGKILL each of `pids`, then reap those that are (now) this process's children, waiting up to
    `timeout` for them to exit. A pid that is another process's child is left for its parent (or for
    this subreaper, once that parent is gone too)."""
    me = os.getpid()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending:
        for pid in list(pending):
            proc = _read(pid)
            if proc is None:
                pending.discard(pid)
            elif proc.ppid == me:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == 0:
                        continue  # still dying
                pending.discard(pid)
            elif proc.state == "Z":
                pending.discard(pid)  # dead; its parent reaps it
        if not pending or time.monotonic() > deadline:
            return
        time.sleep(0.05)
