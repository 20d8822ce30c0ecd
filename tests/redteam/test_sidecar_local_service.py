"""Finding 5 (last part): "the sidecar's local `[supernode]` service authenticates no client".

The SuperNode (Flower 1.42) speaks TLS over TCP to `--superlink host:port` and cannot present a
client certificate (`--root-certificates` "is not a client certificate for mTLS"), so stunnel's
`requireCert` cannot tell it from another local user. So the service is not reachable by another
local user at all: the site's sidecar accepts on Unix sockets in a 0700 directory of the agent's
user (both services, `[supernode]` and the plain relay to `[fleet]`), and the SuperNode reaches
them from its private network namespace through the namespace launcher's forward
(`node.agent`, `federation.ops.netns`; the real agent: `test_site_local_service.py`).

With real processes (a coordinator with site-a registered, site-a's sidecar configured as the
agent configures it): uid 65534 cannot open either socket, even with every directory above
theirs traversable. What whoever does reach the service still needs (the second factor, as
before): the site's registered Flower key (the gateway's binding, per request) and a fresh
signature made with its private key (the SuperLink), `pki/<site>/supernode_auth.key`, 0600.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.node_pb2 import Node

from federation.ops.netns import prepare_socket_dir
from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.fleet_gateway import KEY_HEADER, flower_key_header
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.sidecar import TLSFiles, client_config, make_sidecar
from tests.e2e.fleet import activated, start_coordinator

pytestmark = pytest.mark.e2e

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root, which nobody may not enter
# A client with no file of the site's: TLS to the sidecar's Unix socket without checking anything,
# one raw request, the status line back.
RAW_CLIENT = r"""
import socket, ssl, sys
request = sys.stdin.buffer.read()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
raw = socket.socket(socket.AF_UNIX)
raw.settimeout(30)
raw.connect(sys.argv[1])
with ctx.wrap_socket(raw) as tls:
    tls.sendall(request)
    data = b""
    while b"\r\n" not in data:
        chunk = tls.recv(4096)
        if not chunk:
            break
        data += chunk
print(data.split(b"\r\n", 1)[0].decode())
"""
CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path) -> Iterator[tuple[Path, Path, dict[str, object]]]:
    """A coordinator with site-a registered, and site-a's fleet sidecar as `fedseek node start`
    configures it: both services on Unix sockets in a 0700 directory (under directories anyone may
    traverse, so that directory alone decides). Yields (accept socket, relay socket, coordinator)."""
    if shutil.which("setpriv") is None or not Path(SYSTEM_PYTHON).exists() or os.geteuid() != 0:
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another local user")
    tmp_path = tmp_path_factory.mktemp("local-service")
    keys = tmp_path / "site-keys"
    keys.mkdir()
    shutil.copy(ensure_auth_keypair(pki_dir / "site-a").public_key, keys / "site-a.pub")
    argv = ["--pki", str(pki_dir), "--state", str(tmp_path / "coord"), "--fleet-port", str(free_port())]
    coord, info = start_coordinator(tmp_path, [*argv, "--site-keys", str(keys)])
    site_a = pki.load_leaf(pki_dir, "site-a")
    public = Path(tempfile.mkdtemp(prefix="fedseek-sidecar-", dir="/tmp"))
    public.chmod(0o755)
    folder = public / "sockets"
    prepare_socket_dir(folder)
    accept, relay = folder / "fleet.sock", folder / "relay.sock"
    try:
        proc = make_sidecar(
            name="site-a-sidecar",
            config_text=client_config(
                tls=TLSFiles(site_a.cert, site_a.key, site_a.ca_cert),
                accept=str(accept),
                relay=str(relay),
                connect=str(info["fleet"]),
                server_name="localhost",
            ),
            workdir=tmp_path / "site-a",
            sockets=(accept, relay),
        )
        proc.start().wait_socket(accept, timeout=20)
        try:
            yield accept, relay, info
        finally:
            proc.stop()
    finally:
        coord.stop()
        shutil.rmtree(public, ignore_errors=True)


def _request(headers: dict[str, str]) -> bytes:
    body = PullMessagesRequest(node=Node(node_id=4242)).SerializeToString()
    head = {
        "Host": "localhost",
        "Content-Type": "application/protobuf",
        "Content-Length": str(len(body)),
        "Connection": "close",
        **headers,
    }
    lines = ["POST /v1/fleet/pull-messages HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in head.items()), "\r\n"]
    return "".join(lines).encode() + body


def _send(sock: Path, headers: dict[str, str], *, as_nobody: bool) -> subprocess.CompletedProcess[bytes]:
    prefix = NOBODY if as_nobody else []
    return subprocess.run(
        [*prefix, SYSTEM_PYTHON, "-c", RAW_CLIENT, str(sock)], input=_request(headers), capture_output=True, timeout=60
    )


def test_another_local_user_cannot_reach_the_site_sidecar(sidecar: tuple[Path, Path, dict[str, object]]) -> None:
    """Finding 5: uid 65534 opens neither the `[supernode]` service nor the plain relay to `[fleet]`
    (their 0700 directory); the agent's user does (positive control)."""
    accept, relay, coordinator = sidecar
    assert stat.S_IMODE(accept.parent.stat().st_mode) == 0o700
    for sock in (accept, relay):
        assert stat.S_ISSOCK(sock.stat().st_mode)  # its mode is stunnel's umask's: the directory decides
        denied = subprocess.run([*NOBODY, SYSTEM_PYTHON, "-c", CONNECT, str(sock)], capture_output=True, text=True)
        assert denied.returncode != 0 and "PermissionError" in denied.stderr, (sock, denied)
        allowed = subprocess.run([SYSTEM_PYTHON, "-c", CONNECT, str(sock)], capture_output=True, text=True)
        assert allowed.stdout.strip() == "connected", (sock, allowed)
    refused = _send(accept, {}, as_nobody=True)  # the whole request, as the attacker would send it
    assert refused.returncode != 0 and b"PermissionError" in refused.stderr
    assert activated(coordinator) == 0


def test_the_coordinator_still_demands_the_sites_key_and_signature(
    sidecar: tuple[Path, Path, dict[str, object]], pki_dir: Path
) -> None:
    """Finding 5, the second factor behind the socket: a caller that reaches the service without the
    site's private key gets nothing: no key header -> 403 (gateway); the site's public key header
    with a signature not made by its private key -> 401 (SuperLink); no node gets activated."""
    accept, _, coordinator = sidecar
    public = flower_key_header(ensure_auth_keypair(pki_dir / "site-a").public_key.read_bytes())
    no_key = _send(accept, {}, as_nobody=False)
    assert no_key.stdout.decode().startswith("HTTP/1.1 403"), no_key
    forged = {
        KEY_HEADER: public,
        "flwr-timestamp": datetime.now(UTC).isoformat(),
        "flwr-signature": base64.b64encode(os.urandom(64)).decode(),
    }
    forged_out = _send(accept, forged, as_nobody=False)
    assert forged_out.stdout.decode().startswith("HTTP/1.1 401"), forged_out
    assert activated(coordinator) == 0
