"""Child processes that the coordinator and node supervise: start, wait ready, stop, restart.

Each child runs in a session (so a process group) of its own, dies with its supervisor
(PDEATHSIG), and the supervisor is a child subreaper (`federation.ops.proctree`): whatever a
child spawned is either still in its session or, once the child is gone, re-parented to the
supervisor rather than to init. So stopping or losing a child also ends what it spawned (SuperLink
and SuperNode start ServerApp/ClientApp processes; nginx's master its worker, which holds the
fleet port), and every process is reaped: no orphan keeps a port, no zombie stays.

`supervise` restarts a child that dies with a capped exponential back-off, for ever: a child that
keeps failing (a port taken, a bad certificate) is reported in `Health` (degraded) while the
rest of the daemon, its HTTPS API above all, keeps running.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from federation.errors import Unavailable
from federation.ops import proctree

log = logging.getLogger("fedseek.procs")

# Listening ports are drawn below Linux's ephemeral range (32768-60999 by default): a port
# from bind(0) is only free until the probe closes, and any outgoing connection in the
# meantime may take it as its source port, so a child process that binds it later fails.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()
_port_lock = threading.Lock()


class ProcessError(Unavailable):
    """A supervised process failed to start or died."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, outside the ephemeral range, never handed out twice here."""
    with _port_lock:
        for _ in range(200):
            port = random.randrange(*_PORT_RANGE)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise ProcessError(f"no free TCP port in {_PORT_RANGE} on {host}")


def port_open(host: str, port: int, *, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, *, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Managed:
    """One supervised child process."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    # Unix sockets it binds: a killed process leaves them behind, and binding a path that exists
    # fails (stunnel), so they are removed before every start, restarts included.
    sockets: Sequence[Path] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Managed:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for path in self.sockets:
            if path.is_socket():
                path.unlink()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ)
        env.update(self.env or {})
        self.proc = subprocess.Popen(
            list(self.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(self.cwd) if self.cwd else None,
            start_new_session=True,  # its session: what it spawns can be found, and ended, with it
            preexec_fn=proctree.die_with_parent,
        )
        log.close()
        _reaper.watch(self)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_port(self, host: str, port: int, *, timeout: float = 60.0) -> None:
        """Block until the process listens on host:port, or raise with its log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(f"{self.name} exited during start-up:\n{log_tail(self.log_path)}")
            if port_open(host, port):
                return
            time.sleep(0.2)
        raise ProcessError(
            f"{self.name} did not listen on {host}:{port} within {timeout:.0f}s:\n{log_tail(self.log_path)}"
        )

    def wait_socket(self, path: Path, *, timeout: float = 60.0) -> None:
        """Block until a Unix socket exists at `path` (a launcher that creates it only once its
        service accepts, `federation.ops.netns`), or raise with the log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(f"{self.name} exited during start-up:\n{log_tail(self.log_path)}")
            if path.is_socket():
                return
            time.sleep(0.2)
        raise ProcessError(f"{self.name} did not create {path} within {timeout:.0f}s:\n{log_tail(self.log_path)}")

    def reload(self) -> bool:
        """SIGHUP the process itself (stunnel re-reads its config, certificates and CRL,
        keeping open connections); returns whether it was running."""
        if not self.alive():
            return False
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        return True

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left, its whole session included."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        self.kill_leftovers()

    def kill_leftovers(self) -> None:
        """Kill and reap what the (dead) process left: every process still in its session (nginx's
        worker holds the fleet port after its master was killed) and its live descendants."""
        if self.proc is None or self.proc.poll() is None:
            return  # alive: what it runs is its own business
        sid = self.proc.pid
        procs = proctree.processes()
        left = {p.pid for p in procs if p.session == sid and p.pid != sid} | proctree.descendants(sid, procs)
        left.discard(os.getpid())
        if left:
            log.warning("%s left %d process(es) behind: killing %s", self.name, len(left), sorted(left))
            proctree.kill_and_reap(left)


class _Reaper:
    """Polls every started child, so that one nobody waits for (a demo's agent killed mid-run) is
    reaped at once instead of staying a zombie; `Popen.poll` keeps its exit status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: list[Managed] = []
        self._thread: threading.Thread | None = None

    def watch(self, proc: Managed) -> None:
        with self._lock:
            self._procs.append(proc)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fedseek-reaper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                self._procs = [p for p in self._procs if p.proc is not None and p.proc.poll() is None]

    def pids(self) -> set[int]:
        with self._lock:
            return {p.pid for p in self._procs}


_reaper = _Reaper()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def reap_adopted(*, keep: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Kill and reap the orphans this subreaper was handed: its children in another session that it
    did not start as `Managed` (nor are in `keep`). They descend from a child that died; its own
    `subprocess.run` children share its session and are left alone."""
    me, mine = os.getpid(), os.getsid(0)
    started = _reaper.pids() | set(keep)
    adopted = [p.pid for p in proctree.processes() if p.ppid == me and p.session != mine and p.pid not in started]
    if adopted:
        log.warning("killing and reaping %d orphaned process(es): %s", len(adopted), adopted)
        proctree.kill_and_reap(adopted)
    return adopted


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a child that died: `initial`, doubled for each failure in a row,
    at most `cap`; a child that stayed up `stable` seconds starts again from `initial`."""

    initial: float = 1.0
    cap: float = 30.0
    stable: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.initial * 2 ** max(0, failures - 1))


@dataclass(frozen=True)
class ChildState:
    """One supervised child as its status page shows it (times: seconds since the epoch)."""

    state: str = "running"  # running | restarting (waiting out its back-off)
    restarts: int = 0  # since the supervisor started
    failures: int = 0  # deaths in a row, each within Backoff.stable of its start
    last_exit: int | None = None
    last_exit_at: float | None = None
    next_start_at: float | None = None


class Health:
    """What `supervise` knows of its children, read from other threads (status pages)."""

    def __init__(self, names: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._children = {name: ChildState() for name in names}

    def get(self, name: str) -> ChildState:
        with self._lock:
            return self._children[name]

    def update(self, name: str, **changes: Any) -> None:
        with self._lock:
            self._children[name] = replace(self._children[name], **changes)

    @property
    def degraded(self) -> list[str]:
        """Children not running now."""
        with self._lock:
            return sorted(name for name, st in self._children.items() if st.state != "running")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            children = {name: asdict(st) for name, st in self._children.items()}
        down = sorted(name for name, st in children.items() if st["state"] != "running")
        return {"state": "degraded" if down else "ok", "down": down, "children": children}


def supervise(
    procs: Sequence[Managed],
    stopping: threading.Event,
    *,
    backoff: Backoff | None = None,
    health: Health | None = None,
    on_change: Callable[[Health], None] | None = None,
    interval: float = 0.5,
) -> Health:
    """Restart children that die, until `stopping` is set; never gives up.

    A dead child's leftovers (its session, its orphans) are killed and reaped first, so its
    restart finds its port free; it restarts after `backoff`'s delay, during which `health` shows
    it down (`on_change` is called on every change, from this thread).
    """
    backoff = backoff or Backoff()
    health = health or Health([p.name for p in procs])
    proctree.adopt_orphans()
    started = {p.name: time.monotonic() for p in procs}
    due: dict[str, float] = {}

    def changed() -> None:
        if on_change is not None:
            try:
                on_change(health)
            except Exception:  # a status page must never stop the supervision
                log.exception("supervisor: status update failed")

    while not stopping.wait(interval):
        reap_adopted(keep={p.pid for p in procs})
        for proc in procs:
            now = time.monotonic()
            st = health.get(proc.name)
            if proc.alive():
                if st.failures and now - started[proc.name] >= backoff.stable:
                    health.update(proc.name, failures=0)
                continue
            if proc.name not in due:  # just found dead
                code = proc.proc.returncode if proc.proc is not None else None
                proc.kill_leftovers()
                up = now - started[proc.name]
                failures = 1 if up >= backoff.stable else st.failures + 1
                delay = backoff.delay(failures)
                due[proc.name] = now + delay
                health.update(
                    proc.name,
                    state="restarting",
                    failures=failures,
                    last_exit=code,
                    last_exit_at=time.time(),
                    next_start_at=time.time() + delay,
                )
                log.warning(
                    "%s exited (%s) after %.0fs up; restarting in %.0fs (failure %d in a row):\n%s",
                    proc.name,
                    code,
                    up,
                    delay,
                    failures,
                    log_tail(proc.log_path, lines=5),
                )
                changed()
            elif now >= due[proc.name]:
                del due[proc.name]
                started[proc.name] = now
                try:
                    proc.start()
                except OSError as exc:  # cannot even exec: counts as a failure, retried later
                    log.error("%s cannot start: %s", proc.name, exc)
                    continue
                health.update(proc.name, state="running", restarts=st.restarts + 1, next_start_at=None)
                changed()
    return health


def stop_all(procs: Sequence[Managed]) -> None:
    """Stop in reverse start order (dependants first)."""
    for proc in reversed(procs):
        proc.stop()
