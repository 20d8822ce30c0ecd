"""Finding 5 (last part): "the sidecar's local `[supernode]` service authenticates no client".

Not closed at the socket: the SuperNode (Flower 1.42) speaks TLS over TCP to `--superlink
host:port` and cannot present a client certificate (`--root-certificates` "is not a client
certificate for mTLS"), so stunnel's `requireCert` cannot tell it from another local user, and a
Unix socket or an owner-only namespace is not something it can dial (see the report). What does
authenticate every caller of that service is end to end: each fleet request must carry the
site's registered Flower key (the gateway's binding, per request) and a fresh signature made with
its private key (Flower's SuperNode authentication at the SuperLink), which only the agent's user
can read (`pki/<site>/supernode_auth.key`, 0600).

This test pins that down with real processes: another local user (uid 65534) reaches the site's
sidecar on loopback, as anyone on the host can, and gets nothing from the coordinator: 403 from
the gateway without the site's key header, 401 from the SuperLink with the (public) key header
and a signature it cannot make. It passes before and after this change: it documents what
holds, it does not reproduce a hole.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.node_pb2 import Node

from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.fleet_gateway import KEY_HEADER, flower_key_header
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.sidecar import TLSFiles
from tests.e2e.fleet import activated, site_sidecar, start_coordinator

pytestmark = pytest.mark.e2e

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"]
# The other local user's client: TLS to the sidecar without checking anything, one raw request,
# the status line back. It reads no file of the site's (it could not: the PKI is the agent's).
RAW_CLIENT = r"""
import socket, ssl, sys
request = sys.stdin.buffer.read()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) as raw:
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


@pytest.fixture(scope="module")
def sidecar_port(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path) -> Iterator[tuple[int, dict[str, object]]]:
    """A coordinator with site-a registered, and site-a's fleet sidecar as `fedseek node start` runs it."""
    if shutil.which("setpriv") is None or not Path("/usr/bin/python3").exists() or os.geteuid() != 0:
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another local user")
    tmp_path = tmp_path_factory.mktemp("local-service")
    keys = tmp_path / "site-keys"
    keys.mkdir()
    shutil.copy(ensure_auth_keypair(pki_dir / "site-a").public_key, keys / "site-a.pub")
    argv = ["--pki", str(pki_dir), "--state", str(tmp_path / "coord"), "--fleet-port", str(free_port())]
    coord, info = start_coordinator(tmp_path, [*argv, "--site-keys", str(keys)])
    site_a = pki.load_leaf(pki_dir, "site-a")
    try:
        sidecar, address = site_sidecar(
            tmp_path, "site-a", tls=TLSFiles(site_a.cert, site_a.key, site_a.ca_cert), target=str(info["fleet"])
        )
        try:
            yield int(address.rsplit(":", 1)[1]), info
        finally:
            sidecar.stop()
    finally:
        coord.stop()


def _as_other_user(port: int, headers: dict[str, str]) -> str:
    body = PullMessagesRequest(node=Node(node_id=4242)).SerializeToString()
    head = {
        "Host": "localhost",
        "Content-Type": "application/protobuf",
        "Content-Length": str(len(body)),
        "Connection": "close",
        **headers,
    }
    request = "".join(
        ["POST /v1/fleet/pull-messages HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in head.items()), "\r\n"]
    )
    done = subprocess.run(
        [*NOBODY, RAW_CLIENT, str(port)], input=request.encode() + body, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode().strip()


def test_another_local_user_gets_nothing_through_the_site_sidecar(
    sidecar_port: tuple[int, dict[str, object]], pki_dir: Path
) -> None:
    """Finding 5 (d), what holds: no site key header -> 403 (gateway); the site's public key header
    with a signature not made by its private key -> 401 (SuperLink); no node gets activated."""
    port, coordinator = sidecar_port
    public = flower_key_header(ensure_auth_keypair(pki_dir / "site-a").public_key.read_bytes())
    assert _as_other_user(port, {}).startswith("HTTP/1.1 403")
    forged = {
        KEY_HEADER: public,
        "flwr-timestamp": datetime.now(UTC).isoformat(),
        "flwr-signature": base64.b64encode(os.urandom(64)).decode(),
    }
    assert _as_other_user(port, forged).startswith("HTTP/1.1 401")
    assert activated(coordinator) == 0
