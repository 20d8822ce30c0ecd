"""Child processes that the coordinator and node supervise: start, wait ready, stop by PID.

Every process gets its own log file and process group, so stopping it also stops what it
spawned (SuperLink and SuperNode start ServerApp/ClientApp subprocesses).
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from federation.errors import Unavailable

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
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
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
        """SIGTERM the process group, then SIGKILL what is left."""
        if self.proc is None or self.proc.poll() is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the child if its supervisor dies, so no sidecar outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def supervise(
    procs: Sequence[Managed], stopping: threading.Event, *, max_restarts: int = 5, window: float = 60.0
) -> None:
    """Restart children that die, until `stopping` is set.

    A child that dies more than `max_restarts` times within `window` seconds is failing on
    start-up (a port taken, a bad certificate): raise instead of looping for ever.
    """
    restarts: dict[str, list[float]] = {p.name: [] for p in procs}
    while not stopping.wait(1.0):
        for proc in procs:
            if proc.alive():
                continue
            now = time.monotonic()
            recent = [t for t in restarts[proc.name] if now - t < window] + [now]
            restarts[proc.name] = recent
            if len(recent) > max_restarts:
                raise ProcessError(
                    f"{proc.name} died {len(recent)} times within {window:.0f}s; giving up:\n{log_tail(proc.log_path)}"
                )
            log.warning("%s exited; restarting (%d in the last %.0fs)", proc.name, len(recent), window)
            time.sleep(1.0)
            proc.start()


def stop_all(procs: Sequence[Managed]) -> None:
    """Stop in reverse start order (dependants first)."""
    for proc in reversed(procs):
        proc.stop()
