"""Finding 5 (last part), real processes: "the sidecar's local `[supernode]` service authenticates no
client", and with it the rest of the SuperNode's path at a site.

Before: the site's fleet sidecar served its `[supernode]` service (TLS with the site certificate,
relayed to the coordinator with the site's mTLS) and its plain relay on 127.0.0.1 TCP ports, and
the SuperNode its Runtime API on another: any local user could connect to all three. The SuperNode
cannot present a client certificate, so stunnel cannot tell it from anyone else.

Now the SuperNode and the app guard (and the guard's task processes) run in one private network
namespace (`federation.ops.netns`, the launcher the coordinator's SuperLink uses); the sidecar's
services and the agent API's way in for the ClientApp are Unix sockets in the state directory's
`sockets/` (0700, the agent's user), which the namespace reaches through its launcher's forwards;
the Runtime API port exists only inside. One real `fedseek node start`; the other local user is
uid 65534.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.ops.layout import NodeLayout
from federation.ops.supervise import free_port
from federation.protocol import config as cfg
from tests.redteam.locked_down import fedseek_without_sys_admin
from tests.redteam.node_agent import Agent, node_agent
from tests.redteam.procnet import process_tree, tree_listeners

pytestmark = pytest.mark.e2e

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root, which nobody may not enter
CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"


def _needs_root() -> None:
    if shutil.which("setpriv") is None or not Path(SYSTEM_PYTHON).exists() or os.geteuid() != 0:
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another local user")


@pytest.fixture(scope="module")
def public_root() -> Iterator[Path]:
    """A directory any local user may traverse (pytest's own is root's 0700), so that only what the
    agent makes stands between another user and its sockets."""
    base = Path(tempfile.mkdtemp(prefix="fedseek-site-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(public_root: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path) -> Iterator[Agent]:
    _needs_root()
    with node_agent(public_root / "site", pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir) as a:
        yield a


def _pid_of(root: int, marker: str) -> int:
    """The process of `root`'s tree whose command line holds `marker`."""
    for pid in sorted(process_tree(root)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if any(marker in a for a in argv[:3]):
            return pid
    raise AssertionError(f"no {marker} in the process tree of {root}")


def _netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=60)


def _sockets(layout: NodeLayout) -> list[Path]:
    return [layout.fleet_socket, layout.relay_socket, layout.agent_socket, layout.runtime_socket]


def test_nothing_of_the_supernode_path_listens_on_a_host_port(agent: Agent) -> None:
    """Finding 5: the agent's process tree listens on one host TCP port, its HTTPS API; the
    sidecar's services and the SuperNode's Runtime API are on none, and the SuperNode and the guard
    share a network namespace that is not the host's."""
    root = agent.proc.pid
    listeners = tree_listeners(root)
    assert listeners == {("127.0.0.1", agent.port)}, listeners  # the enumeration sees the API; nothing else
    supernode, guard = _pid_of(root, "flower-supernode"), _pid_of(root, "node.app_guard.superexec")
    stunnel = _pid_of(root, "stunnel")
    assert _netns(supernode) == _netns(guard) != _netns(os.getpid())
    assert _netns(stunnel) == _netns(root) == _netns(os.getpid())  # the sidecar speaks to the network
    conf = (agent.layout.sidecar / "fleet-sidecar.conf").read_text()
    accepts = [line.split("=", 1)[1].strip() for line in conf.splitlines() if line.startswith("accept")]
    assert accepts == [str(agent.layout.fleet_socket.absolute()), str(agent.layout.relay_socket.absolute())]


def test_another_local_user_opens_none_of_the_sockets_nor_enters_the_namespace(agent: Agent) -> None:
    """Finding 5: the sockets that lead to the SuperNode's path (the sidecar's two services, the
    SuperNode's Runtime API, the agent API's way in for the ClientApp) are refused to uid 65534
    even when the state directory is left traversable: their 0700 directory decides. Nor can that
    user join the namespace. The agent's own user connects (positive control)."""
    layout = agent.layout
    folder = layout.sockets.stat()
    assert folder.st_uid == os.geteuid() and stat.S_IMODE(folder.st_mode) == 0o700
    for sock in _sockets(layout):
        mode = sock.stat().st_mode
        assert stat.S_ISSOCK(mode) and not mode & 0o077, (sock, oct(mode))
    supernode = _pid_of(agent.proc.pid, "flower-supernode")
    layout.root.chmod(0o711)  # as if the operator had opened the state directory: the socket directory holds
    try:
        for sock in _sockets(layout):
            denied = _as_nobody(SYSTEM_PYTHON, "-c", CONNECT, str(sock))
            assert denied.returncode != 0 and "PermissionError" in denied.stderr, (sock, denied)
            allowed = subprocess.run([SYSTEM_PYTHON, "-c", CONNECT, str(sock)], capture_output=True, text=True)
            assert allowed.stdout.strip() == "connected", (sock, allowed)
        for enter in ([f"--net=/proc/{supernode}/ns/net"], ["-t", str(supernode), "-n"]):
            refused = _as_nobody("nsenter", *enter, "true")
            assert refused.returncode != 0, (enter, refused)
    finally:
        layout.root.chmod(0o700)


def test_the_site_fails_closed_where_no_namespace_may_be_made(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path
) -> None:
    """Finding 5: where the SuperNode cannot get a namespace of its own (root without CAP_SYS_ADMIN,
    as in a locked-down container), the agent refuses to start with one line saying why, before it
    starts anything: the SuperNode and the guard never run on the host's network."""
    _needs_root()
    state = tmp_path / "state"
    conf = cfg.NodeConfig(
        name="site-a",
        model_dir=str(tiny_model_dir),
        data_dir=str(site_data_dir),
        state_dir=str(state),
        pki_dir=str(pki_dir),
        coordinator=f"127.0.0.1:{free_port()}",
        api_port=free_port(),
    )
    out = fedseek_without_sys_admin(
        "node",
        "start",
        config=cfg.save(conf, tmp_path / "node.json"),
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"},
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        "fedseek: error: cannot start the SuperNode: netns: cannot create a private network namespace "
        "(unshare: Operation not permitted); root needs CAP_SYS_ADMIN for it (a container must allow unshare)"
    )
    layout = NodeLayout(state)
    assert not layout.endpoints.exists()
    assert not layout.supernode_log.exists() and not layout.app_guard_log.exists()  # they never ran
    assert not (layout.sidecar / "fleet-sidecar.log").exists()  # nor anything else: refused before starting
    assert not layout.sockets.exists()


# Inside the namespace: TLS to the agent's URL (the consortium CA, name 127.0.0.1), a request with no
# key; prints the status line.
HTTPS_PROBE = r"""
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
host, port = sys.argv[1].removeprefix("https://").rsplit(":", 1)
with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host) as tls:
    tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    print(tls.recv(100).split(b"\r\n", 1)[0].decode())
"""


def test_the_namespace_ports_answer_inside_only(agent: Agent) -> None:
    """Finding 5, the other side: the ports the SuperNode and the ClientApp dial (the sidecar, the
    Runtime API, the agent's URL) answer inside the namespace (its owner joins it), the agent's URL
    with the agent's own TLS service; none of them is a host listener of the agent's."""
    supernode = _pid_of(agent.proc.pid, "flower-supernode")
    argv = Path(f"/proc/{supernode}/cmdline").read_bytes().decode().split("\0")
    agent_url = re.search(r'agent-url="([^"]+)"', argv[argv.index("--node-config") + 1])
    assert agent_url is not None
    inside = {
        int(argv[argv.index("--superlink") + 1].rsplit(":", 1)[1]),
        int(argv[argv.index("--port") + 1]),
        int(agent_url.group(1).rsplit(":", 1)[1]),
    }
    assert not inside & {port for _, port in tree_listeners(agent.proc.pid)}
    join = ["nsenter", f"--net=/proc/{supernode}/ns/net", SYSTEM_PYTHON, "-c"]
    for port in inside:
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5).close(); print('inside')"
        joined = subprocess.run([*join, probe], capture_output=True, text=True, timeout=30)
        assert joined.stdout.strip() == "inside", (port, joined)
    ca = str(agent.pki_dir / "ca" / "ca.pem")
    api = subprocess.run([*join, HTTPS_PROBE, agent_url.group(1), ca], capture_output=True, text=True, timeout=30)
    assert api.stdout.strip() == "HTTP/1.1 401 Unauthorized", api  # the agent's API answered, and wants a key
