"""A command in a private network namespace, its loopback ports reachable only as Unix sockets.

Why: Flower 1.42's SuperLink serves its Control API (start any run, register SuperNodes) on
the same uvicorn TCP port as the Fleet API, and the open-source build authenticates no
Control caller. On the host's loopback every local user could reach it. TCP has no owner;
a Unix socket has one. So the SuperLink runs in a network namespace of its own, where its
port is the only listener and the only client is what runs inside (its ServerApp, and the
operator's `flwr` commands, which enter the namespace); the fleet gateway reaches it through a
Unix socket in a 0700 directory of the coordinator's user.

A site's SuperNode has the same problem the other way round: it can only dial TCP host:port and
present no client certificate, so whatever it dials on the host's loopback (the fleet sidecar)
any local user may dial too, and its own Runtime API port is open to them as well. So the
SuperNode and its app guard (and the guard's task processes) share one private namespace, and
their ways out are `--forward`s: a port inside that leads to a Unix socket on the host (the
sidecar's, the agent API's), in a 0700 directory of the agent's user.

The launcher (run it with `python -m federation.ops.netns`; stdlib only):

    python -m federation.ops.netns --expose DIR/link.sock=9093 -- flower-superlink --port 9093 ...
    python -m federation.ops.netns --expose DIR/runtime.sock=9094 --forward 9092=DIR/fleet.sock \
        --also '{"argv": ["guard", ...], "log": "...", "env": {...}}' -- flower-supernode ...

- As root it unshares a new network namespace; as another user it unshares a user namespace
  too (identity uid/gid map: files keep the user's ids, and only that user can enter it).
  Either way it brings `lo` up and runs COMMAND inside (COMMAND dies with it: PDEATHSIG). It is
  a child subreaper: whatever the commands spawn and leave orphaned is handed to it, and killed
  and reaped when it ends, so nothing of the namespace outlives its launcher.
- A socket file appears only once its port accepts, so "the socket exists" means "ready".
  It is created 0600 in a directory that must be the caller's own with mode 0700.
- Pathname Unix sockets are not bound to a network namespace: a process on the host (nginx)
  connects to the path, and the file modes decide who may. Bytes are relayed unchanged (TLS
  stays end to end).
- `--forward PORT=SOCKET`: inside, 127.0.0.1:PORT listens before COMMAND starts; each
  connection is relayed to the host's Unix socket SOCKET (opened as the launcher's user).
- `--also SPEC` (JSON: argv, optional log file and environment) starts a further command in
  the same namespace once every exposed port accepts: one launcher, one namespace, so the
  commands can never end up in different ones. All die with the launcher (PDEATHSIG); when one
  exits the launcher stops the others and exits with its status, so its supervisor restarts
  them together. Command lines are public (/proc): no secrets in SPEC.
- It exits with COMMAND's status (or the first `--also` command's to exit) and removes its sockets.

`run_inside(socket, argv)` runs a command in the namespace that serves `socket`: the kernel
names the launcher (SO_PEERCRED), which must be this module run by our own user, in a network
namespace other than ours; then `nsenter` joins it through namespace files opened beforehand.
Another user can neither open the socket nor join the namespace (nsenter needs privileges over
the namespace's owning user namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.errors import Unavailable
from federation.ops import proctree

__all__ = [
    "MODULE",
    "REFUSAL_PREFIX",
    "Command",
    "Exposed",
    "Forward",
    "NamespaceError",
    "check_available",
    "check_socket_path",
    "launcher_argv",
    "prepare_socket_dir",
    "refusal_in",
    "run_inside",
    "serving_pid",
]

MODULE = "federation.ops.netns"
REFUSAL_PREFIX = "netns: "  # the launcher's one stderr line when it refuses to start
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sh22x"  # struct ifreq: name, flags, rest of the union (40 bytes)
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
_PR_SET_PDEATHSIG = 1


class NamespaceError(Unavailable):
    """The private namespace cannot be made, or what serves a socket is not the one we trust."""


@dataclass(frozen=True)
class Exposed:
    """One loopback TCP port inside the namespace, served outside it as a Unix socket."""

    socket: Path
    port: int

    def arg(self) -> str:
        return f"{os.path.abspath(self.socket)}={self.port}"  # the launcher may run elsewhere

    @classmethod
    def parse(cls, text: str) -> Exposed:
        path, sep, port = text.rpartition("=")
        if not sep or not path or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"expected SOCKET=PORT, got {text!r}")
        return cls(Path(os.path.abspath(path)), int(port))


@dataclass(frozen=True)
class Forward:
    """One loopback TCP port inside the namespace that leads out to a Unix socket on the host."""

    port: int
    socket: Path

    def arg(self) -> str:
        return f"{self.port}={os.path.abspath(self.socket)}"

    @classmethod
    def parse(cls, text: str) -> Forward:
        port, sep, path = text.partition("=")
        if not sep or not path or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"expected PORT=SOCKET, got {text!r}")
        return cls(int(port), Path(os.path.abspath(path)))


@dataclass(frozen=True)
class Command:
    """A further command for the namespace: its argv, the file its output is appended to (None:
    the launcher's own), and variables set over the launcher's environment."""

    argv: tuple[str, ...]
    log: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def arg(self) -> str:
        log = os.path.abspath(self.log) if self.log is not None else None
        return json.dumps({"argv": list(self.argv), "log": log, "env": dict(self.env)})

    @classmethod
    def parse(cls, text: str) -> Command:
        try:
            spec = json.loads(text)
            argv, log, env = spec["argv"], spec.get("log"), spec.get("env") or {}
            ok = isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
            ok = ok and (log is None or isinstance(log, str)) and isinstance(env, dict)
            ok = ok and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f'expected {{"argv": [...], "log": PATH, "env": {{...}}}}, got {text!r}')
        return cls(tuple(argv), Path(log) if log else None, env)


def launcher_argv(
    command: Sequence[str],
    exposed: Sequence[Exposed],
    *,
    forwards: Sequence[Forward] = (),
    also: Sequence[Command] = (),
    timeout: float = 60.0,
) -> list[str]:
    """argv that runs `command` (and `also`) in a private network namespace, exposing `exposed`
    and reaching out through `forwards`."""
    args = [sys.executable, "-m", MODULE, "--timeout", str(timeout)]
    for item in exposed:
        args += ["--expose", item.arg()]
    for fwd in forwards:
        args += ["--forward", fwd.arg()]
    for extra in also:
        args += ["--also", extra.arg()]
    return [*args, "--", *command]


def refusal_in(text: str) -> str | None:
    """The launcher's one-line refusal in `text` (a log tail), if it refused to start."""
    return next((line for line in reversed(text.splitlines()) if line.startswith(REFUSAL_PREFIX)), None)


def check_available(*, timeout: float = 30.0) -> None:
    """Raise NamespaceError, with the launcher's own reason, unless it can make a namespace here
    (it runs `true` in one): a daemon checks this before it starts anything, so that where its
    namespace cannot be made, nothing runs at all."""
    out = subprocess.run(launcher_argv(["true"], []), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        reason = refusal_in(out.stderr) or (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise NamespaceError(reason.removeprefix(REFUSAL_PREFIX))


def check_socket_path(path: Path) -> None:
    """`path` fits a Unix socket address (108 bytes, NUL included)."""
    if len(os.fsencode(os.path.abspath(path))) > _SUN_PATH_MAX:
        raise NamespaceError(f"socket path too long for a Unix socket ({_SUN_PATH_MAX} bytes at most): {path}")


def prepare_socket_dir(path: Path) -> None:
    """Create `path` (0700), or check an existing one is ours, 0700 and not a link.

    The directory is the guard: only its owner may reach a socket inside it.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise NamespaceError(
            f"{path} must be a directory owned by uid {os.geteuid()} with mode 0700 "
            f"(found uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
        )


# --- the launcher ---------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_private_netns() -> None:
    """Move this (single-threaded) process into a new network namespace with `lo` up."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if _libc().unshare(flags) != 0:
        err = os.strerror(ctypes.get_errno())
        if uid == 0:
            hint = "; root needs CAP_SYS_ADMIN for it (a container must allow unshare)"
        else:
            hint = (
                "; a non-root user needs unprivileged user namespaces (kernel.unprivileged_userns_clone=1,"
                " kernel.apparmor_restrict_unprivileged_userns=0)"
            )
        raise NamespaceError(f"cannot create a private network namespace (unshare: {err}){hint}")
    if uid != 0:  # identity map: the user keeps its ids, so its files stay its own
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/setgroups").write_text("deny")  # required before an unprivileged gid_map
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`, without ip(8)
        flags_now = struct.unpack(_IFREQ, fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags_now | _IFF_UP))


def _die_with_parent() -> None:
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _check_socket_path(item: Exposed) -> None:
    check_socket_path(item.socket)
    prepare_socket_dir(item.socket.parent)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(item.socket).st_mode):
            raise NamespaceError(f"{item.socket} exists and is not a socket")
        os.unlink(item.socket)  # left by a launcher that was killed


def _wait_accepting(ports: Sequence[int], child: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting:
        if child.poll() is not None:
            raise NamespaceError(f"the command exited ({child.returncode}) before listening on {waiting}")
        if time.monotonic() > deadline:
            raise NamespaceError(f"nothing listened on 127.0.0.1:{waiting} within {timeout:.0f}s")
        try:
            socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.5).close()
            waiting.pop(0)
        except OSError:
            time.sleep(0.2)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close, so TLS close_notify and EOF reach the other end
    except OSError:
        writer.close()


_Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _splice(dial: Callable[[], Awaitable[_Streams]]) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """A connection handler relaying each accepted connection to a new one from `dial`."""

    async def handle(outer_r: asyncio.StreamReader, outer_w: asyncio.StreamWriter) -> None:
        try:
            inner_r, inner_w = await dial()
        except OSError:
            outer_w.close()
            return
        try:
            await asyncio.gather(_pump(outer_r, inner_w), _pump(inner_r, outer_w))
        finally:
            for w in (outer_w, inner_w):
                w.close()

    return handle


def _listen_inside(port: int) -> socket.socket:
    """127.0.0.1:port in the namespace, listening before any command runs (its first dial finds it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise NamespaceError(f"cannot listen on 127.0.0.1:{port} inside the namespace: {exc.strerror}") from exc
    sock.listen(128)
    return sock


def _first_exit(children: Sequence[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes] | None:
    return next((c for c in children if c.poll() is not None), None)


def _terminate(children: Sequence[subprocess.Popen[bytes]]) -> None:
    for c in children:
        if c.poll() is None:
            c.terminate()


def _stop(children: Sequence[subprocess.Popen[bytes]], *, timeout: float = 10.0) -> None:
    _terminate(children)
    deadline = time.monotonic() + timeout
    for c in children:
        try:
            c.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


async def _relay(
    exposed: Sequence[Exposed],
    forwards: Sequence[tuple[Forward, socket.socket]],
    children: Sequence[subprocess.Popen[bytes]],
) -> int:
    def to_port(port: int) -> Callable[[], Awaitable[_Streams]]:
        return lambda: asyncio.open_connection("127.0.0.1", port)

    def to_socket(path: Path) -> Callable[[], Awaitable[_Streams]]:
        return lambda: asyncio.open_unix_connection(str(path))

    servers = [await asyncio.start_server(_splice(to_socket(f.socket)), sock=s) for f, s in forwards]
    old = os.umask(0o177)  # the socket file is born 0600: no moment where others may connect
    try:
        for item in exposed:
            servers.append(
                await asyncio.start_unix_server(_splice(to_port(item.port)), path=str(item.socket), backlog=128)
            )
    finally:
        os.umask(old)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _terminate, children)
    try:
        while (done := _first_exit(children)) is None:
            await asyncio.sleep(0.2)
    finally:
        for server in servers:
            server.close()
        for item in exposed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.socket)
    _stop(children)  # one went: the others go too, and the supervisor restarts them together
    _end_descendants()
    return done.returncode


def _end_descendants() -> None:
    """Kill and reap whatever is left under the launcher: it is a child subreaper, so a task process
    whose parent went first (a ClientApp of the app guard) was handed to it, not to init."""
    proctree.kill_and_reap(proctree.descendants(os.getpid()))


def _start_also(extra: Command) -> subprocess.Popen[bytes]:
    env = {**os.environ, **extra.env}
    if extra.log is None:
        return subprocess.Popen(list(extra.argv), env=env, preexec_fn=_die_with_parent)
    extra.log.parent.mkdir(parents=True, exist_ok=True)
    with open(extra.log, "ab") as out:
        return subprocess.Popen(
            list(extra.argv), env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )


def launch(
    command: Sequence[str],
    exposed: Sequence[Exposed],
    *,
    timeout: float,
    forwards: Sequence[Forward] = (),
    also: Sequence[Command] = (),
) -> int:
    """The launcher's body: namespace, forwards, command, readiness, further commands, relay
    until a command exits."""
    for item in exposed:
        _check_socket_path(item)
    for fwd in forwards:
        check_socket_path(fwd.socket)
    enter_private_netns()  # before any thread exists: unshare(CLONE_NEWUSER) requires it
    # Orphans of the commands' trees come to the launcher, which ends them when it ends; and it
    # ends when its supervisor dies (PDEATHSIG, set by `federation.ops.supervise`).
    proctree.adopt_orphans()
    listening = [(fwd, _listen_inside(fwd.port)) for fwd in forwards]
    children = [subprocess.Popen(list(command), preexec_fn=_die_with_parent)]
    # Until the relay's handlers are in place, a stop request still stops the commands.
    signal.signal(signal.SIGTERM, lambda *_: _terminate(children))
    try:
        _wait_accepting([e.port for e in exposed], children[0], timeout)
        children += [_start_also(extra) for extra in also]  # what they dial inside is up
    except (NamespaceError, OSError) as exc:
        _stop(children)
        _end_descendants()
        if isinstance(exc, NamespaceError):
            raise
        raise NamespaceError(f"cannot start a command in the namespace: {exc}") from exc
    return asyncio.run(_relay(exposed, listening, children))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--expose", type=Exposed.parse, action="append", default=[], metavar="SOCKET=PORT")
    parser.add_argument("--forward", type=Forward.parse, action="append", default=[], metavar="PORT=SOCKET")
    parser.add_argument("--also", type=Command.parse, action="append", default=[], metavar="JSON")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for every port to accept")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    try:
        return launch(command, args.expose, timeout=args.timeout, forwards=args.forward, also=args.also)
    except NamespaceError as exc:
        print(f"{REFUSAL_PREFIX}{exc}", file=sys.stderr, flush=True)
        return 2


# --- entering a running namespace -----------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]


def _check_launcher(pid: int, uid: int, sock: Path) -> None:
    """`pid` must be this module, run by our user, serving `sock`, in a namespace not ours."""
    if uid != os.geteuid():
        raise NamespaceError(f"{sock} is served by uid {uid}, not by this user ({os.geteuid()})")
    cmd = _cmdline(pid)
    ours = any(cmd[i : i + 2] == ["-m", MODULE] for i in range(len(cmd)))
    serves = any(
        flag == "--expose" and arg.rpartition("=")[0] == os.path.abspath(sock) for flag, arg in itertools.pairwise(cmd)
    )
    if not (ours and serves):
        raise NamespaceError(f"{sock} is not served by a {MODULE} launcher (pid {pid}: {' '.join(cmd)[:200]})")
    if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
        raise NamespaceError(f"the launcher serving {sock} (pid {pid}) shares our network namespace")


def serving_pid(sock: Path) -> tuple[int, int]:
    """(pid, uid) of the process that listens on `sock`, as the kernel records them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(str(sock))
        except OSError as exc:
            raise NamespaceError(f"nothing serves {sock} ({exc.strerror or exc}): is it running?") from exc
        pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


@contextlib.contextmanager
def entered(sock: Path) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """An `nsenter` prefix into the namespace serving `sock`, and the fds it must inherit.

    The namespace files are opened first and the launcher checked after, so the pid cannot be
    swapped for another process's between the check and the join.
    """
    nsenter = shutil.which("nsenter") or shutil.which("nsenter", path="/usr/bin:/bin")
    if nsenter is None:
        raise NamespaceError("nsenter (util-linux) is not installed")
    pid, uid = serving_pid(sock)
    fds: list[int] = []
    try:
        try:
            net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            fds.append(net)
            joins = [f"--net=/proc/self/fd/{net}"]
            if os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino:
                user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
                fds.append(user)  # a non-root launcher's namespace: join its user namespace first
                joins = [f"--user=/proc/self/fd/{user}", "--preserve-credentials", *joins]
        except OSError as exc:
            raise NamespaceError(f"cannot open the namespace of pid {pid} serving {sock}: {exc.strerror}") from exc
        _check_launcher(pid, uid, sock)
        if os.fstat(net).st_ino != os.stat(f"/proc/{pid}/ns/net").st_ino:
            raise NamespaceError(f"pid {pid} changed while joining the namespace serving {sock}")
        yield [nsenter, *joins, "--"], tuple(fds)
    finally:
        for fd in fds:
            os.close(fd)


def run_inside(sock: Path, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(argv, **kwargs)` inside the network namespace that serves `sock`."""
    with entered(sock) as (prefix, fds):
        return subprocess.run([*prefix, *argv], pass_fds=fds, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
