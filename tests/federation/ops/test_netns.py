"""A command in a private network namespace, reached only through its Unix socket: real processes
(the launcher, a small HTTP server inside, `nsenter`), as root and as an unprivileged user."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import federation
from federation.ops import netns
from federation.ops.supervise import Managed, free_port

REPO = Path(federation.__file__).resolve().parents[1]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root, which nobody may not enter
# Connects to 127.0.0.1:argv[1] wherever it runs; prints its network namespace.
PROBE = "import os, socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5).close(); "
PROBE += "print(os.readlink('/proc/self/ns/net'))"


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A directory any local user may traverse (pytest's own is root's 0700): only the socket's
    directory then stands between another user and the socket."""
    base = Path(tempfile.mkdtemp(prefix="fedseek-netns-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def http_server(port: int, python: str = sys.executable) -> list[str]:
    return [python, "-m", "http.server", "--bind", "127.0.0.1", str(port)]


def launcher(
    tmp: Path, sock: Path, port: int, *, prefix: tuple[str, ...] = (), python: str = sys.executable
) -> Managed:
    argv = netns.launcher_argv(http_server(port, python), [netns.Exposed(sock, port)], timeout=30)
    argv[0] = python
    return Managed(
        name="netns",
        argv=[*prefix, *argv],
        log_path=tmp / "netns.log",
        env={"PYTHONPATH": str(REPO)},
    )


def http_get(sock: Path) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(100).decode(errors="replace")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # exited, not yet reaped by its parent
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_the_port_exists_only_inside_and_the_socket_is_the_way_in(public_tmp: Path) -> None:
    sock, port = public_tmp / "control" / "svc.sock", free_port()
    proc = launcher(public_tmp, sock, port).start()
    try:
        proc.wait_socket(sock, timeout=30)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700 and sock.parent.stat().st_uid == os.geteuid()
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert http_get(sock).startswith("HTTP/1.0 200")  # bytes relayed both ways
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)  # not on the host

        inside = netns.run_inside(sock, [sys.executable, "-c", PROBE, str(port)], capture_output=True, text=True)
        assert inside.returncode == 0, inside.stderr
        assert inside.stdout.strip() == os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")

        denied = subprocess.run(
            [
                *NOBODY,
                SYSTEM_PYTHON,
                "-c",
                "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
                str(sock),
            ],
            capture_output=True,
            text=True,
        )
        assert "PermissionError" in denied.stderr, denied
        refused = subprocess.run([*NOBODY, "nsenter", f"--net=/proc/{proc.pid}/ns/net", "true"], capture_output=True)
        assert refused.returncode != 0
    finally:
        server = children(proc.pid)
        proc.stop()
    assert not sock.exists()
    assert server and all(gone(pid) for pid in server)


def test_a_killed_launcher_takes_its_command_along_and_a_new_one_takes_over(public_tmp: Path) -> None:
    sock, port = public_tmp / "control" / "svc.sock", free_port()
    first = launcher(public_tmp, sock, port).start()
    try:
        first.wait_socket(sock, timeout=30)
        server = children(first.pid)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)  # the launcher alone, not its process group
        first.proc.wait(timeout=10)
        assert server and all(gone(pid) for pid in server)  # PR_SET_PDEATHSIG
        assert sock.is_socket()  # left behind: nobody serves it
        with pytest.raises(netns.NamespaceError, match="nothing serves"):
            netns.run_inside(sock, ["true"])
    finally:
        first.stop()
    stale = sock.stat().st_ino
    second = launcher(public_tmp, sock, port).start()
    try:
        deadline = time.monotonic() + 30
        while not (sock.is_socket() and sock.stat().st_ino != stale) and time.monotonic() < deadline:
            time.sleep(0.1)  # the new launcher replaces the stale file once its port accepts
        assert http_get(sock).startswith("HTTP/1.0 200")
    finally:
        second.stop()


def test_the_launcher_refuses_a_socket_directory_others_may_enter(public_tmp: Path) -> None:
    folder = public_tmp / "open"
    folder.mkdir()
    folder.chmod(0o755)  # whatever the umask
    marker = public_tmp / "ran"
    out = subprocess.run(
        netns.launcher_argv(["touch", str(marker)], [netns.Exposed(folder / "svc.sock", free_port())]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"netns: {folder} must be a directory owned by uid 0 with mode 0700 (found uid 0, mode 755)"
    ]
    assert not marker.exists()
    with pytest.raises(netns.NamespaceError, match="mode 0700"):
        netns.prepare_socket_dir(folder)


def test_run_inside_joins_only_a_launcher_of_ours_in_another_namespace(public_tmp: Path) -> None:
    """An impostor that serves the socket from our own namespace, and one that only has the
    launcher's name, are both refused before anything runs."""
    folder = public_tmp / "control"
    netns.prepare_socket_dir(folder)
    sock, marker = folder / "svc.sock", public_tmp / "ran"
    serve = (
        "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[-1].rpartition('=')[0]); "
        "s.listen(); print('up', flush=True); time.sleep(60)"
    )
    for disguise in (["-m", netns.MODULE, "--expose"], ["--expose"]):  # argv after -c is just sys.argv
        sock.unlink(missing_ok=True)
        impostor = subprocess.Popen(
            [sys.executable, "-c", serve, *disguise, f"{sock}=9"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert impostor.stdout is not None and impostor.stdout.readline().strip() == "up"
            reason = "shares our network namespace" if "-m" in disguise else "not served by a federation.ops.netns"
            with pytest.raises(netns.NamespaceError, match=reason):
                netns.run_inside(sock, ["touch", str(marker)])
        finally:
            impostor.kill()
            impostor.wait()
    assert not marker.exists()


def test_an_unprivileged_user_gets_a_namespace_only_it_can_enter(public_tmp: Path) -> None:
    """The launcher as uid 65534: a user namespace (identity map) owns its network namespace;
    that user reaches the port through `run_inside`; root's `run_inside` refuses its socket."""
    os.chown(public_tmp, 65534, 65534)
    sock, port = public_tmp / "control" / "svc.sock", free_port()
    proc = launcher(public_tmp, sock, port, prefix=tuple(NOBODY), python=SYSTEM_PYTHON)
    proc.log_path = public_tmp / "logs" / "netns.log"  # written by root, outside nobody's directory
    proc.start()
    try:
        proc.wait_socket(sock, timeout=30)
        assert sock.stat().st_uid == 65534 and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert sock.parent.stat().st_uid == 65534
        assert os.stat(f"/proc/{proc.pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        with pytest.raises(netns.NamespaceError, match="served by uid 65534"):
            netns.run_inside(sock, ["true"])

        operator = (
            "import sys; from pathlib import Path; from federation.ops import netns; "
            "out = netns.run_inside(Path(sys.argv[1]), [sys.executable, '-c', sys.argv[2], sys.argv[3]], "
            "capture_output=True, text=True); print(out.returncode, out.stdout.strip(), out.stderr.strip())"
        )
        inside = subprocess.run(
            [*NOBODY, SYSTEM_PYTHON, "-c", operator, str(sock), PROBE, str(port)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=30,
        )
        assert inside.stdout.split()[:2] == ["0", os.readlink(f"/proc/{proc.pid}/ns/net")], inside
    finally:
        proc.stop()
    assert not sock.exists()


def test_where_no_namespace_may_be_made_nothing_runs(public_tmp: Path) -> None:
    """Fail closed: root without CAP_SYS_ADMIN (a container that forbids unshare) gets one line
    saying why, and the command never runs outside a private namespace."""
    marker = public_tmp / "ran"
    out = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-sys_admin",
            *netns.launcher_argv(["touch", str(marker)], [netns.Exposed(public_tmp / "c" / "svc.sock", 9)]),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "netns: cannot create a private network namespace (unshare: Operation not permitted); "
        "root needs CAP_SYS_ADMIN for it (a container must allow unshare)"
    )
    assert not marker.exists()


# Inside: dials the exposed port (HTTP) and the forward (a host Unix socket that answers "pong:" +
# what it got), prints both answers, its namespace and $X, then waits to be stopped.
ALSO_PROBE = r"""
import os, socket, sys, time
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    http = s.recv(12).decode()
with socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=10) as s:
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    out = s.recv(100).decode()
print(http, out, os.readlink("/proc/self/ns/net"), os.environ.get("X"), flush=True)
time.sleep(120)
"""


def pong_server(path: Path) -> socket.socket:
    """A host Unix socket answering each connection with b"pong:" + what it sent (one thread)."""
    import threading

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(100):
                    data += chunk
                conn.sendall(b"pong:" + data)

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_forwards_lead_out_and_further_commands_share_the_namespace(public_tmp: Path) -> None:
    """The site's shape: a further command (`--also`) starts in the same namespace once the exposed
    port accepts, and reaches a host Unix socket through a forward; when it exits, the launcher stops
    the main command too and exits with its status."""
    folder = public_tmp / "control"
    netns.prepare_socket_dir(folder)
    sock, port, fport = folder / "svc.sock", free_port(), free_port()
    pong = pong_server(folder / "host.sock")
    also_log = public_tmp / "logs" / "also.log"
    also = netns.Command((sys.executable, "-c", ALSO_PROBE, str(port), str(fport)), log=also_log, env={"X": "1"})
    argv = netns.launcher_argv(
        http_server(port),
        [netns.Exposed(sock, port)],
        forwards=[netns.Forward(fport, folder / "host.sock")],
        also=[also],
    )
    proc = Managed(name="netns", argv=argv, log_path=public_tmp / "netns.log", env={"PYTHONPATH": str(REPO)}).start()
    try:
        proc.wait_socket(sock, timeout=30)
        deadline = time.monotonic() + 30
        while not (also_log.exists() and also_log.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        words = also_log.read_text().split()
        assert words[:3] == ["HTTP/1.0", "200", "pong:ping"], words  # the exposed port, and out through the forward
        assert words[3] == os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert words[4] == "1"  # its own environment over the launcher's
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", fport), timeout=5)  # the forward is inside only
        kids = children(proc.pid)
        (extra,) = [k for k in kids if b"http.server" not in Path(f"/proc/{k}/cmdline").read_bytes()]
        os.kill(extra, signal.SIGTERM)  # the further command exits ...
        assert proc.proc is not None
        assert proc.proc.wait(timeout=20) == 256 - signal.SIGTERM  # ... so the launcher ends, with its status
        assert all(gone(pid) for pid in kids)  # the main command too
        assert not sock.exists()
    finally:
        proc.stop()
        pong.close()


def test_command_and_forward_arguments_round_trip(tmp_path: Path) -> None:
    cmd = netns.Command(("guard", "--x", "a=b"), log=tmp_path / "g.log", env={"FLWR_HOME": "/h"})
    assert netns.Command.parse(cmd.arg()) == cmd
    fwd = netns.Forward(9092, tmp_path / "fleet.sock")
    assert netns.Forward.parse(fwd.arg()) == fwd
    for bad in ('{"argv": []}', '{"argv": "guard"}', "guard", '{"argv": ["g"], "env": {"A": 1}}'):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            netns.Command.parse(bad)


# A stand-in for the app guard: starts a "ClientApp" in a session of its own that ignores SIGTERM
# (as a task busy in native code may), writes its pid and start time, then waits.
_GUARD = r"""
import pathlib, subprocess, sys, time
task = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True,
)
time.sleep(0.5)
start = pathlib.Path(f"/proc/{task.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
pathlib.Path(sys.argv[1]).write_text(f"{task.pid} {start}")
time.sleep(600)
"""


def _task_of(marker: Path, timeout: float = 60) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline, "the guard stand-in never started its task"
        time.sleep(0.2)
    pid, start = marker.read_text().split()
    return int(pid), start


def _same_process(pid: int, start: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == start
    except OSError:
        return False


@pytest.mark.parametrize("killed", ["launcher", "guard"])
def test_nothing_the_namespace_runs_outlives_its_launcher(public_tmp: Path, killed: str) -> None:
    """Issue 15, finding 4: a killed agent left its ClientApp orphaned. The launcher is a child
    subreaper and ends every process left under it when it ends: whether it is stopped (SIGTERM,
    which is what PDEATHSIG sends it when its agent is killed) or the guard dies under it, the
    guard's task, in a session of its own and deaf to SIGTERM, goes too and is reaped."""
    sock, port, marker = public_tmp / "ctl" / "s.sock", free_port(), public_tmp / "task"
    argv = netns.launcher_argv(
        http_server(port),
        [netns.Exposed(sock, port)],
        also=[netns.Command((sys.executable, "-c", _GUARD, str(marker)))],
        timeout=30,
    )
    proc = Managed(name="netns", argv=argv, log_path=public_tmp / "netns.log", env={"PYTHONPATH": str(REPO)}).start()
    try:
        task, start = _task_of(marker)
        assert _same_process(task, start)
        if killed == "launcher":
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
        else:
            os.kill(_guard_pid(proc.pid, marker), signal.SIGKILL)
        assert proc.proc is not None
        proc.proc.wait(60)  # one command gone: the launcher stops the rest and exits
        assert not _same_process(task, start), "the task outlived its launcher"
    finally:
        proc.stop()


def _guard_pid(launcher_pid: int, marker: Path) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ppid == launcher_pid and str(marker) in argv:
            return int(entry.name)
    raise AssertionError("no guard stand-in under the launcher")
