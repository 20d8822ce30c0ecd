"""Child processes that the coordinator and node supervise: start, wait ready, stop by PID.

Every process gets its own log file and process group, so stopping it also stops what it
spawned (SuperLink and SuperNode start ServerApp/ClientApp subprocesses).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ProcessError(RuntimeError):
    """A supervised process failed to start or died."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free right now (tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Managed:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
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


def stop_all(procs: Sequence[Managed]) -> None:
    """Stop in reverse start order (dependants first)."""
    for proc in reversed(procs):
        proc.stop()
