"""Finding 1 (first half), real processes: the SuperLink's Control API belongs to the
coordinator's operator alone.

Before: the SuperLink listened on 127.0.0.1:L of the coordinator host, and Flower 1.42's
Control API authenticates nobody there, so any local user could `flwr run` an arbitrary app
bundle. Now the SuperLink lives in its own network namespace (`federation.ops.netns`): L
exists only there, the fleet gateway reaches it through a Unix socket in a 0700 directory of
the coordinator's user, and the operator's `flwr` commands run inside the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.service import CONNECTION, flwr_bin, flwr_env, write_cli_config
from federation.ops.supervise import free_port
from federation.protocol import config as cfg
from federation.security.flower_auth import ensure_auth_keypair
from tests.e2e.fleet import start_coordinator
from tests.redteam.locked_down import fedseek_without_sys_admin
from tests.redteam.procnet import tree_listeners

pytestmark = pytest.mark.e2e

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root, which nobody may not enter
LIST_RUNS = "/v1/control/list-runs"


@pytest.fixture(scope="module")
def coordinator(pki_dir: Path) -> Iterator[dict[str, object]]:
    """A running coordinator whose state directory any local user may traverse, so that only the
    socket's own directory and mode stand between another user and the SuperLink."""
    base = Path(tempfile.mkdtemp(prefix="fedseek-redteam-", dir="/tmp"))
    base.chmod(0o755)
    keys = base / "site-keys"
    keys.mkdir()
    shutil.copy(ensure_auth_keypair(pki_dir / "site-a").public_key, keys / "site-a.pub")
    link_port = free_port()
    conf = cfg.CoordinatorConfig(
        pki_dir=str(pki_dir),
        state_dir=str(base / "coord"),
        fleet_port=free_port(),
        superlink_port=link_port,
        site_keys_dir=str(keys),
    )
    proc, info = start_coordinator(base, ["--config", str(cfg.save(conf, base / "coordinator-config.json"))])
    try:
        yield {**info, "link_port": link_port, "tree": proc.pid, "base": str(base)}
    finally:
        proc.stop()
        shutil.rmtree(base, ignore_errors=True)


def flwr_ls(flwr_home: Path, address: str, ca: Path) -> subprocess.CompletedProcess[str]:
    write_cli_config(flwr_home, address, ca_cert=ca)
    return subprocess.run(
        [flwr_bin("flwr"), "ls", CONNECTION, "--format", "json"],
        env=flwr_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=60,
    )


def control_status(host: str, port: int, *, tls: bool, cert: tuple[Path, Path] | None) -> int | None:
    """Status of POST /v1/control/list-runs (an empty ListRunsRequest, what `flwr ls` sends), or
    None when the listener gives no HTTP answer at all (handshake refused, connection closed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # an attacker does not care who answers
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    host = f"[{host}]" if ":" in host else ("127.0.0.1" if host == "0.0.0.0" else host)
    url = f"{'https' if tls else 'http'}://{host}:{port}{LIST_RUNS}"
    try:
        with httpx.Client(verify=ctx, timeout=10) as client:
            return client.post(url, content=b"", headers={"content-type": "application/protobuf"}).status_code
    except httpx.HTTPError:
        return None


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=30)


def test_the_superlink_port_is_closed_on_the_host(
    tmp_path: Path, pki_dir: Path, coordinator: dict[str, object]
) -> None:
    """Finding 1: the reproduction's first step, `flwr ls` against 127.0.0.1:L, now finds nothing."""
    port = int(str(coordinator["link_port"]))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    ls = flwr_ls(tmp_path / "flwr-attacker", f"127.0.0.1:{port}", pki_dir / "ca" / "ca.pem")
    assert ls.returncode != 0 or not json.loads(ls.stdout).get("success"), ls.stdout


def test_no_host_listener_of_the_coordinator_answers_the_control_api(
    pki_dir: Path, coordinator: dict[str, object]
) -> None:
    """Finding 1: every TCP port the coordinator's process tree listens on in the host network
    namespace refuses `list-runs`, with no client certificate and with a site's node certificate."""
    listeners = tree_listeners(int(str(coordinator["tree"])))
    ports = {port for _, port in listeners}
    fleet = int(str(coordinator["fleet"]).rsplit(":", 1)[1])
    admin = int(str(coordinator["admin"]).rsplit(":", 1)[1])
    assert {fleet, admin} <= ports, listeners  # the enumeration sees the tree's real listeners
    node_cert = (pki_dir / "site-a" / "cert.pem", pki_dir / "site-a" / "key.pem")
    answers = {
        (host, port, tls, cert is not None): control_status(host, port, tls=tls, cert=cert)
        for host, port in listeners
        for tls in (True, False)
        for cert in (None, node_cert)
    }
    served = {probe: status for probe, status in answers.items() if status is not None and 200 <= status < 300}
    assert not served, answers
    assert int(str(coordinator["link_port"])) not in ports, listeners
    assert answers[("127.0.0.1", fleet, True, True)] == 403  # the gateway: fleet routes only


def test_another_local_user_cannot_open_the_socket_nor_enter_the_namespace(coordinator: dict[str, object]) -> None:
    """Finding 1: the only ways in (the gateway's Unix socket, the SuperLink's network
    namespace) are closed to another local user, and open to the coordinator's own user."""
    sock, pid = Path(str(coordinator["superlink_socket"])), int(str(coordinator["superlink_pid"]))
    port = int(str(coordinator["link_port"]))
    assert stat.S_ISSOCK(sock.stat().st_mode)
    folder = sock.parent.stat()
    assert folder.st_uid == os.geteuid() and stat.S_IMODE(folder.st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    connect = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"
    denied = as_nobody(SYSTEM_PYTHON, "-c", connect, str(sock))
    assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied
    for enter in ([f"--net=/proc/{pid}/ns/net"], ["-t", str(pid), "-U", "-n", "--preserve-credentials"]):
        refused = as_nobody("nsenter", *enter, "true")
        assert refused.returncode != 0, (enter, refused)

    # Positive controls: the same socket and namespace serve the coordinator's user.
    allowed = subprocess.run([SYSTEM_PYTHON, "-c", connect, str(sock)], capture_output=True, text=True, timeout=30)
    assert allowed.stdout.strip() == "connected", allowed
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5).close(); print('inside')"
    inside = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30
    )
    assert inside.stdout.strip() == "inside", inside


def test_the_operator_still_reaches_the_control_api(coordinator: dict[str, object]) -> None:
    """Finding 1, the other side: `flwr` run through the coordinator's operator path works."""
    from coordinator.service import flwr_control

    out = flwr_control(
        Path(str(coordinator["superlink_socket"])),
        Path(str(coordinator["flwr_home"])),
        ["ls", CONNECTION, "--format", "json"],
    )
    assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr


def test_the_coordinator_fails_closed_where_no_namespace_may_be_made(tmp_path: Path, pki_dir: Path) -> None:
    """Finding 1: where the SuperLink cannot get a namespace of its own (root without
    CAP_SYS_ADMIN, as in a locked-down container), the coordinator refuses to start, saying why,
    rather than serving the Control API on the host."""
    link_port = free_port()
    conf = cfg.CoordinatorConfig(
        pki_dir=str(pki_dir), state_dir=str(tmp_path / "coord"), fleet_port=free_port(), superlink_port=link_port
    )
    out = fedseek_without_sys_admin(
        "coordinator", "start", config=cfg.save(conf, tmp_path / "coordinator.json"), timeout=120
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("fedseek: error: superlink exited during start-up: netns: cannot create a private network")
    assert "CAP_SYS_ADMIN" in last
    assert not (tmp_path / "coord" / "coordinator.json").exists()
    assert "Flower" not in (tmp_path / "coord" / "logs" / "superlink.log").read_text()  # it never ran
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", link_port), timeout=5).close()
