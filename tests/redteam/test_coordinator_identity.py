"""Finding 5, with real stunnel, nginx and HTTPS servers: any consortium certificate could pose as
the coordinator, and a CA-signed certificate of another organisation was accepted.

Before: every certificate (node, reviewer, admin) carried `localhost` / `127.0.0.1`, and the
site's sidecar checked only the coordinator's host name (`checkHost = <coordinator_name>`), so a
server presenting any of them was taken for the coordinator. Now:

- the site sidecar pins the coordinator's role name (`checkHost = coordinator.<consortium>.fedseek.internal`),
  which `pki` puts on coordinator certificates only (tests/federation/security/pki/test_hosts.py);
- `pki` no longer issues loopback names to reviewers and admins, nor the coordinator's host
  names or role name to anyone else, so the impostor certificates below cannot be had from
  `pki.issue`: they are forged with the CA key through the lower-level `certs.sign_leaf`,
  i.e. exactly what the old `pki.issue` would have handed out (the site certificate from
  `pki.issue` is tried as well: it names 127.0.0.1, the address dialled here);
- the HTTPS endpoints (`mtls_server`) refuse a certificate whose organisation (O) is not the
  consortium's, and the fleet gateway binds only subjects with the consortium's O.

Out of reach of any check here: a certificate the CA key holder signs with the role name itself
(the CA operator is trusted; with the key one can as well sign a true coordinator certificate).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI, Request

from coordinator.sites import SiteAccess
from federation.ops.supervise import Managed, free_port
from federation.security import pki
from federation.security.fleet_gateway import KEY_HEADER
from federation.security.mtls_server import HTTPSService, Refusal, ServerTLS, peer_of
from federation.security.peer_pin import PeerIdentityError, pinned_client_context
from federation.security.pki.certs import san_entries, sign_leaf
from federation.security.pki.clock import utcnow
from federation.security.pki.pem import cert_pem, leaf_key_pem
from federation.security.pki.signer import SigningCA, open_ca
from federation.security.sidecar import TLSFiles, client_config, make_sidecar, server_config
from federation.security.site_binding import register_site_key
from privacy.audit import AuditTrail
from tests.federation.security.test_fleet_gateway import Running, running  # noqa: F401  (real nginx fixture)

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
COORDINATOR_NAMES = ("localhost", "127.0.0.1", "fl.consortium.example")  # what a site dials / used to check
IO_TIMEOUT = 10.0


class Echo:
    """A TCP echo server standing in for the SuperLink behind the (fake) coordinator; it remembers
    every byte, so a refused connection is proven never to have reached it."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = int(self.sock.getsockname()[1])
        self.received = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(IO_TIMEOUT)
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.received.extend(data)
                conn.sendall(data)

    def saw(self, token: bytes) -> bool:
        with self._lock:
            return token in self.received

    def close(self) -> None:
        self.sock.close()


def _forge(
    pki_dir: Path, out: Path, *, name: str, role: pki.Role, hosts: tuple[str, ...], consortium: str | None = None
) -> TLSFiles:
    """A certificate signed by the consortium CA's key through `certs.sign_leaf`, below `pki.issue`'s
    host-name policy; `consortium` sets another organisation (O) than the CA's."""
    ca = open_ca(pki_dir, None, utcnow())
    signer = SigningCA(cert=ca.cert, key=ca.key, consortium=consortium or ca.consortium, dir=ca.dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    cert = sign_leaf(
        signer,
        key,
        name=name,
        role=role,
        sans=san_entries(hosts),
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=2),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cert.pem").write_bytes(cert_pem(cert))
    (out / "key.pem").write_bytes(leaf_key_pem(key))
    (out / "key.pem").chmod(0o600)
    return TLSFiles(cert=out / "cert.pem", key=out / "key.pem", ca_cert=pki_dir / "ca" / "ca.pem")


def _leaf_tls(leaf: pki.LeafFiles) -> TLSFiles:
    return TLSFiles(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)


def _through_site_sidecar(pki_dir: Path, workdir: Path, server: TLSFiles, echo: Echo) -> tuple[bytes, str]:
    """A fake coordinator (stunnel mTLS server, consortium CA, `server`'s certificate) and site-a's
    sidecar configured as `fedseek node start` configures it; a SuperNode-like client sends a
    token through. Returns what came back and the sidecar's log."""
    coord_port = free_port()
    fake = make_sidecar(
        name="fake-coordinator",
        config_text=server_config(tls=server, accept=f"{HOST}:{coord_port}", connect=f"{HOST}:{echo.port}"),
        workdir=workdir / "coordinator",
    )
    site_port = free_port()
    site = make_sidecar(
        name="fleet-sidecar",
        config_text=client_config(  # as node/agent.py: site certificate + CRL, NodeConfig's default coordinator_name
            tls=_leaf_tls(pki.load_leaf(pki_dir, "site-a")),
            accept=f"{HOST}:{site_port}",
            relay=f"{HOST}:{free_port()}",
            connect=f"{HOST}:{coord_port}",
            server_name="localhost",
        ),
        workdir=workdir / "site",
    )
    procs: list[Managed] = []
    try:
        procs.append(fake.start())
        fake.wait_port(HOST, coord_port, timeout=30)
        procs.append(site.start())
        site.wait_port(HOST, site_port, timeout=30)
        token = f"fedseek-{uuid.uuid4().hex}\n".encode()
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))  # what the SuperNode trusts
        got = b""
        try:
            with (
                socket.create_connection((HOST, site_port), timeout=IO_TIMEOUT) as raw,
                ctx.wrap_socket(raw, server_hostname=HOST) as tls,
            ):
                tls.sendall(token)
                while len(got) < len(token):
                    chunk = tls.recv(len(token) - len(got))
                    if not chunk:
                        break
                    got += chunk
        except (ssl.SSLError, ConnectionError, TimeoutError):
            pass
        assert (got == token) == echo.saw(token)
        time.sleep(0.2)  # let stunnel flush its log line
        return got, site.log_path.read_text(errors="replace")
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


def _impostors(pki_dir: Path, root: Path) -> dict[str, TLSFiles]:
    return {
        "node (forged with the coordinator's names)": _forge(
            pki_dir, root / "node", name="site-b", role="node", hosts=COORDINATOR_NAMES
        ),
        "node (as pki.issue makes it)": _leaf_tls(pki.load_leaf(pki_dir, "site-b")),
        "reviewer (forged with the coordinator's names)": _forge(
            pki_dir, root / "reviewer", name="reviewer", role="reviewer", hosts=COORDINATOR_NAMES
        ),
        "coordinator of another organisation": _forge(
            pki_dir,
            root / "foreign",
            name="coordinator",
            role="coordinator",
            hosts=(*COORDINATOR_NAMES, pki.coordinator_host("evil")),
            consortium="evil",
        ),
    }


def test_site_sidecar_takes_no_other_certificate_for_the_coordinator(pki_dir: Path, tmp_path: Path, echo: Echo) -> None:
    """Finding 5: a node, a reviewer and another organisation's certificate, each signed by the
    consortium CA and carrying the coordinator's host names, are refused by the real site sidecar;
    no byte reaches the service behind them."""
    for what, tls in _impostors(pki_dir, tmp_path / "certs").items():
        got, log = _through_site_sidecar(pki_dir, tmp_path / what.split()[0], tls, echo)
        assert got == b"", f"{what} was taken for the coordinator"
        assert "Rejected by CERT" in log or "certificate verify failed" in log, (what, log[-1500:])


def test_site_sidecar_accepts_the_real_coordinator(pki_dir: Path, tmp_path: Path, echo: Echo) -> None:
    """Control: the same sidecar, same client, and the coordinator's own certificate."""
    got, log = _through_site_sidecar(pki_dir, tmp_path, _leaf_tls(pki.load_leaf(pki_dir, "coordinator")), echo)
    assert got.startswith(b"fedseek-"), log[-1500:]


# ---- the organisation (O) at the HTTPS endpoints and the fleet gateway ------------------------------


def _whoami_app() -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    def whoami(request: Request) -> dict[str, str | None]:
        ident = peer_of(request)
        return {"name": ident.name if ident else None, "o": ident.consortium if ident else None}

    return app


def test_https_endpoint_refuses_a_ca_signed_certificate_of_another_organisation(pki_dir: Path, tmp_path: Path) -> None:
    """Finding 5: the node's (and the coordinator's admin) HTTPS endpoint, `mtls_server`, takes a
    reviewer certificate of the consortium and refuses the same one signed for O=evil."""
    leaf = pki.load_leaf(pki_dir, "site-a")
    refusals: list[Refusal] = []
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)
    service = HTTPSService.start(_whoami_app(), tls, host=HOST, port=free_port(), on_refusal=refusals.append)
    foreign = _forge(pki_dir, tmp_path / "foreign", name="reviewer", role="reviewer", hosts=(), consortium="evil")
    try:
        for cert, key in (
            (pki_dir / "reviewer" / "cert.pem", pki_dir / "reviewer" / "key.pem"),
            (foreign.cert, foreign.key),
        ):
            ctx = ssl.create_default_context(cafile=str(leaf.ca_cert))
            ctx.load_cert_chain(cert, key)
            try:
                with httpx.Client(verify=ctx, timeout=10) as http:
                    answer: object = http.get(f"{service.url}/whoami").json()
            except httpx.HTTPError as exc:
                answer = exc
            if cert == foreign.cert:
                assert isinstance(answer, httpx.HTTPError), answer
            else:
                assert answer == {"name": "reviewer", "o": "fedseek-test"}
        deadline = time.monotonic() + 10
        while not refusals and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.reason for r in refusals] == [
            "certificate 'reviewer' is from organisation 'evil', not consortium 'fedseek-test'"
        ]
    finally:
        service.stop()


def test_fleet_gateway_binds_and_forwards_only_the_consortiums_organisation(
    running: Running,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Finding 5: through the real nginx gateway, a CA-signed site-a certificate with O=evil and
    site-a's own Flower key is refused (403) and never forwarded; and the coordinator's site
    registry never binds such a certificate."""
    forged = _forge(running.root, tmp_path / "evil-site-a", name="site-a", role="node", hosts=(), consortium="evil")
    ctx = ssl.create_default_context(cafile=str(running.root / "ca" / "ca.pem"))
    ctx.load_cert_chain(forged.cert, forged.key)
    seen = len(running.upstream.seen)
    with httpx.Client(verify=ctx, timeout=30, base_url=f"https://localhost:{running.port}") as http:
        r = http.post("/v1/fleet/pull-messages", headers={KEY_HEADER: running.keys["site-a"]}, content=b"x")
    assert r.status_code == 403, r.text
    assert len(running.upstream.seen) == seen

    # The registry side (coordinator/sites.py): a party directory holding a foreign-O node
    # certificate is not a site, so no binding for it ever reaches the gateway's map.
    root = tmp_path / "pki"
    pki.init_ca(root, consortium="sites-test")
    pki.issue(root, "site-a", role="node")
    register_site_key(root, "site-a")
    _forge(root, root / "site-x", name="site-x", role="node", hosts=(), consortium="evil")  # as a party directory
    register_site_key(root, "site-x")
    sites = SiteAccess(
        pki_dir=root,
        site_keys_dir=root / "site-keys",
        audit=AuditTrail(tmp_path / "audit.jsonl"),
        register=lambda key, name: 1,
        unregister=lambda node_id: None,
    )
    assert sorted(sites.sync()) == ["site-a"]
    assert all("evil" not in dn for dn in sites.fleet_bindings())


def test_client_app_talks_only_to_its_own_sites_agent(pki_dir: Path, tmp_path: Path) -> None:
    """Finding 5 (Python as the client): the ClientApp's agent client pins role `node` and its own
    site's name, so another site's certificate on 127.0.0.1 (every node certificate names it)
    gets no connection, and the agent token is never sent to it."""
    from node.client_app import agent_client

    seen: list[str] = []
    app = FastAPI()

    @app.post("/internal/deploy")
    def deploy(request: Request) -> dict[str, str]:
        seen.append(request.headers.get("authorization", ""))
        return {}

    token = tmp_path / "agent.token"
    token.write_text("secret-agent-token")
    site_a = pki.load_leaf(pki_dir, "site-a")
    for server, expect_ok in (("site-b", False), ("site-a", True)):
        leaf = pki.load_leaf(pki_dir, server)
        tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)
        service = HTTPSService.start(app, tls, host=HOST, port=free_port(), on_refusal=None)
        config = {
            "agent-url": service.url,
            "agent-token-file": str(token),
            "agent-ca": str(site_a.ca_cert),
            "agent-cert": str(site_a.cert),
            "agent-key": str(site_a.key),
        }
        try:
            with agent_client(config, timeout=10) as http:
                if expect_ok:
                    assert http.post("/internal/deploy").status_code == 200
                else:
                    with pytest.raises(httpx.ConnectError, match="node 'site-b', not node 'site-a'"):
                        http.post("/internal/deploy")
        finally:
            service.stop()
    assert seen == ["Bearer secret-agent-token"]  # only site-a's own agent got the token


def test_pinned_context_refuses_a_reviewer_posing_as_a_node(pki_dir: Path) -> None:
    """`fedseek explain` (reviewer -> node) pins role `node`: a reviewer certificate serving on the
    node's address is refused in the handshake."""
    leaf = pki.load_leaf(pki_dir, "reviewer")
    forged_tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)
    service = HTTPSService.start(_whoami_app(), forged_tls, host=HOST, port=free_port(), on_refusal=None)
    try:
        ctx = pinned_client_context(ca_cert=leaf.ca_cert, role="node")
        ctx.check_hostname = False  # a reviewer certificate names no host: isolate the role check
        with (
            socket.create_connection((HOST, int(service.url.rsplit(":", 1)[1])), timeout=IO_TIMEOUT) as raw,
            pytest.raises(PeerIdentityError, match="server certificate is reviewer 'reviewer', not a node"),
        ):
            ctx.wrap_socket(raw, server_hostname=HOST)
    finally:
        service.stop()
