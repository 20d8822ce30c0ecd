"""The nginx fleet gateway: config builder, binding map, log reader, and a real nginx on loopback.

The real-process tests put a stand-in SuperLink behind nginx (an HTTPS server with the
coordinator certificate that records each request it receives), so a refused request is
proven never to have reached it. Flower's own header code checks the key encoding.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from federation.ops.supervise import Managed, free_port
from federation.security import pki
from federation.security.fleet_gateway import (
    KEY_HEADER,
    Gateway,
    GatewayError,
    GatewayLog,
    GatewayRefusal,
    audit_refusal,
    binding_map,
    flower_key_header,
    nginx_binary,
    refusal_from_access,
    refusal_from_error,
    subject_dn,
)
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.mtls_server import Refusal
from federation.security.pki.ca import issue_at
from federation.security.sidecar import TLSFiles
from privacy.audit import AuditTrail

HOST = "127.0.0.1"


def _tls(leaf: pki.LeafFiles) -> TLSFiles:
    return TLSFiles(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)


# --- what Flower sends, and the binding map ---------------------------------------------------


def test_key_header_is_what_a_flower_supernode_sends(tmp_path: Path) -> None:
    keys = ensure_auth_keypair(tmp_path)
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    sent: dict[str, str] = {}

    def capture(context: object) -> httpx.Response:
        request = context.request  # type: ignore[attr-defined]
        sent.update(request.headers)
        return httpx.Response(200, request=request)

    @dataclass
    class Context:  # what flwr's ProtobufClient hands its interceptors (only .request is read)
        request: httpx.Request

    interceptor = NodeAuthHttpInterceptor(private, private.public_key())  # type: ignore[arg-type]
    interceptor.intercept(Context(httpx.Request("POST", "https://x/v1/fleet/pull-messages")), capture)  # type: ignore[arg-type]
    assert sent[KEY_HEADER] == flower_key_header(keys.public_key.read_bytes())


def test_key_header_refuses_what_is_not_an_openssh_key() -> None:
    with pytest.raises(GatewayError, match="not an OpenSSH public key"):
        flower_key_header(b"-----BEGIN PUBLIC KEY-----\nnope\n")


def test_subject_dn_is_the_issued_certificates(pki_dir: Path) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((pki_dir / "site-a" / "cert.pem").read_bytes())
    assert subject_dn(name="site-a", role="node", consortium="fedseek-test") == cert.subject.rfc4514_string()


def test_binding_map_lists_each_site_once_and_refuses_unsafe_entries() -> None:
    text = binding_map({"OU=node,O=c,CN=site-b": "QkJC", "OU=node,O=c,CN=site-a": "QUFB+/=="})
    assert text == '"OU=node,O=c,CN=site-a|QUFB+/==" 1;\n"OU=node,O=c,CN=site-b|QkJC" 1;\n'
    assert binding_map({}) == ""
    for dn, key in (('CN=a"; default 1; #', "x"), ("CN=a", "x;\ndefault 1"), ("~.*", "x"), ("CN=a", "$host")):
        with pytest.raises(GatewayError, match="refusing"):
            binding_map({dn: key})


# --- the config --------------------------------------------------------------------------------


def _gateway(tmp_path: Path, leaf: pki.LeafFiles, port: int, upstream: int) -> Gateway:
    return Gateway(workdir=tmp_path / "gw", tls=_tls(leaf), listen=f"{HOST}:{port}", upstream=f"{HOST}:{upstream}")


def test_config_requires_client_certificates_and_forwards_only_the_fleet_api(pki_dir: Path, tmp_path: Path) -> None:
    leaf = pki.load_leaf(pki_dir, "coordinator")
    gw = _gateway(tmp_path, leaf, 1, 2)
    lines = [line.strip() for line in gw.config().splitlines()]
    for directive in (
        "daemon off;",
        "ssl_verify_client on;",
        f"ssl_client_certificate {leaf.ca_cert};",
        f"ssl_crl {leaf.crl};",
        "ssl_protocols TLSv1.3;",
        "proxy_ssl_verify on;",
        f"proxy_ssl_trusted_certificate {leaf.ca_cert};",
        "worker_shutdown_timeout 2s;",
        f"include {gw.site_map};",
        '"~^/v1/fleet/[a-z-]+$" 1;',
        "proxy_set_header flwr-public-key $http_flwr_public_key;  # exactly the value checked",
        f"error_log {gw.error_log} info;",
    ):
        assert directive in lines, directive
    assert [line for line in lines if line.startswith("location")] == ["location /v1/fleet/ {", "location / {"]
    assert sum(line.startswith("proxy_pass") for line in lines) == 1
    assert all(str(tmp_path) in line for line in lines if "_temp_path" in line or line.startswith("pid"))
    with pytest.raises(GatewayError, match="CRL"):
        Gateway(gw.workdir, TLSFiles(leaf.cert, leaf.key, leaf.ca_cert), "h:1", "h:2").config()


def test_nginx_accepts_the_config(pki_dir: Path, tmp_path: Path) -> None:
    gw = _gateway(tmp_path, pki.load_leaf(pki_dir, "coordinator"), free_port(), free_port())
    proc = gw.process({subject_dn(name="site-a", role="node", consortium="fedseek-test"): "QUFB"})
    out = subprocess.run([*proc.argv, "-t"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "syntax is ok" in out.stderr


def test_write_bindings_reports_changes_only(pki_dir: Path, tmp_path: Path) -> None:
    gw = _gateway(tmp_path, pki.load_leaf(pki_dir, "coordinator"), 1, 2)
    gw.workdir.mkdir()
    assert gw.write_bindings({"CN=a": "QQ=="})
    assert not gw.write_bindings({"CN=a": "QQ=="})
    assert gw.write_bindings({})
    assert gw.site_map.read_text() == ""


# --- reading refusals out of nginx's logs --------------------------------------------------------


def _entry(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "peer": "10.0.0.9:4242",
        "status": 200,
        "https": "on",
        "verify": "SUCCESS",
        "subject": "OU=node,O=c,CN=site-a",
        "method": "POST",
        "uri": "/v1/fleet/pull-messages",
        "route_ok": "1",
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    ("entry", "action", "reason", "subject"),
    [
        (_entry(status=400, https="", verify="", subject=""), "tls.refused", "plaintext HTTP on the mTLS port", None),
        (_entry(status=400, verify="NONE", subject=""), "tls.refused", "no client certificate", None),
        (
            _entry(status=400, verify="FAILED:certificate revoked"),
            "tls.refused",
            "client certificate rejected: certificate revoked (certificate subject OU=node,O=c,CN=site-a)",
            None,
        ),
        (
            _entry(status=403),
            "access.refused",
            "Flower key header does not match the key registered for the certificate's site",
            "site-a",
        ),
        (
            _entry(status=403, uri="/v1/control/start-run", route_ok="0"),
            "access.refused",
            "route not served on the fleet port (Fleet API only)",
            "site-a",
        ),
    ],
)
def test_access_log_entries_become_refusals(entry: dict[str, object], action: str, reason: str, subject: str) -> None:
    refusal = refusal_from_access(entry)
    assert refusal is not None
    assert (refusal.action, refusal.reason, refusal.subject, refusal.peer) == (action, reason, subject, "10.0.0.9:4242")
    assert refusal.route == f"POST {entry['uri']}" and refusal.status == entry["status"]


def test_served_requests_are_no_refusals() -> None:
    assert refusal_from_access(_entry()) is None
    assert refusal_from_access(_entry(status=502)) is None  # the SuperLink was down: not an access decision
    assert refusal_from_access(_entry(status=401)) is None  # Flower's own SuperNode auth answered


def test_error_log_handshake_failures_become_refusals() -> None:
    line = (
        "2026/11/28 09:57:15 [info] 1#1: *10 SSL_do_handshake() failed (SSL: error:0A000102:SSL routines::"
        "unsupported protocol) while SSL handshaking, client: 10.1.2.3, server: 0.0.0.0:9443"
    )
    assert refusal_from_error(line) == GatewayRefusal(
        peer="10.1.2.3", reason="TLS handshake failed: unsupported protocol"
    )
    probe = "2026/11/28 09:57:14 [info] 1#1: *1 client closed connection while SSL handshaking, client: 10.1.2.3"
    assert refusal_from_error(probe) is None


def test_log_reader_reports_each_refusal_once_from_complete_lines(tmp_path: Path) -> None:
    access, error = tmp_path / "access.log", tmp_path / "error.log"
    access.write_text(json.dumps(_entry(status=403)) + "\n")  # before the reader: not reported
    got: list[Refusal] = []
    reader = GatewayLog(access, error, got.append)
    line = json.dumps(_entry(status=400, verify="NONE", subject=""))
    with access.open("a") as f:
        f.write(json.dumps(_entry()) + "\n" + line[:20])
    assert reader.poll() == 0
    with access.open("a") as f:
        f.write(line[20:] + "\n")
    error.write_text(
        "SSL_do_handshake() failed (SSL: error:0A00010B:SSL routines::wrong version number), client: 1.2.3.4\n"
    )
    assert reader.poll() == 2
    assert [r.reason for r in got] == ["no client certificate", "TLS handshake failed: wrong version number"]
    assert reader.poll() == 0


def test_audit_records_say_what_was_refused(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.jsonl")
    hook = audit_refusal(trail.append, endpoint="fleet")
    route = refusal_from_access(_entry(status=403, uri="/v1/control/list-runs", route_ok="0"))
    assert route is not None
    hook(route)
    hook(Refusal(peer="10.0.0.1:1", reason="TLS handshake failed: unsupported protocol"))
    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["action"], r["actor"], r["resource"]) for r in rows] == [
        ("access.refused", "site-a", "POST /v1/control/list-runs"),
        ("tls.refused", "10.0.0.1:1", ""),
    ]
    assert rows[0]["details"] == {
        "peer": "10.0.0.9:4242",
        "reason": "route not served on the fleet port (Fleet API only)",
        "status": 403,
        "route": "POST /v1/control/list-runs",
        "count": 1,
        "endpoint": "fleet",
    }
    hook.close()


# --- a real nginx -------------------------------------------------------------------------------


@dataclass
class Upstream:
    """Stand-in SuperLink: HTTPS with the coordinator certificate; remembers every request."""

    seen: list[tuple[str, str]] = field(default_factory=list)
    headers: list[Message] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    def start(self, leaf: pki.LeafFiles) -> int:
        seen, headers = self.seen, self.headers

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                seen.append((self.path, self.headers.get(KEY_HEADER, "")))
                headers.append(self.headers)
                if self.path.endswith("/slow"):
                    time.sleep(20)
                body = b'{"ok":true}'
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(leaf.cert, leaf.key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return int(self.server.server_address[1])


@dataclass
class Running:
    root: Path
    gateway: Gateway
    nginx: Managed
    upstream: Upstream
    port: int
    refusals: list[Refusal]
    reader: GatewayLog
    keys: dict[str, str]

    def client(self, name: str | None, *, root: Path | None = None) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.root / "ca" / "ca.pem"))
        if name is not None:
            party = (root or self.root) / name
            ctx.load_cert_chain(party / "cert.pem", party / "key.pem")
        return httpx.Client(verify=ctx, timeout=30, base_url=f"https://localhost:{self.port}")

    def wait_refusals(self, n: int) -> list[Refusal]:
        deadline = time.monotonic() + 10
        while len(self.refusals) < n and time.monotonic() < deadline:
            self.reader.poll()
            time.sleep(0.1)
        return self.refusals


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from federation.security.site_binding import register_site_key

    root = tmp_path_factory.mktemp("gw-pki")
    pki.init_ca(root, consortium="gateway-test")
    coordinator = pki.issue(root, "coordinator", role="coordinator")
    keys = {}
    for site in ("site-a", "site-b"):
        pki.issue(root, site, role="node")
        keys[site] = flower_key_header(register_site_key(root, site).read_bytes())
    issue_at(root, "site-old", role="node", hosts=(), days=1, not_before=datetime.now(UTC) - timedelta(days=5))
    upstream = Upstream()
    upstream_port = upstream.start(coordinator)
    port = free_port()
    gw = _gateway(tmp_path_factory.mktemp("gw"), coordinator, port, upstream_port)
    nginx = gw.process({subject_dn(name="site-a", role="node", consortium="gateway-test"): keys["site-a"]})
    refusals: list[Refusal] = []
    reader = GatewayLog(gw.access_log, gw.error_log, refusals.append)
    try:
        nginx.start().wait_port(HOST, port, timeout=30)
        yield Running(root, gw, nginx, upstream, port, refusals, reader, keys)
    finally:
        nginx.stop()
        assert upstream.server is not None
        upstream.server.shutdown()


def test_nginx_binary_is_found() -> None:
    assert Path(nginx_binary()).is_file()


def test_fleet_request_with_its_sites_key_is_forwarded(running: Running) -> None:
    with running.client("site-a") as c:
        r = c.post("/v1/fleet/pull-messages", headers={KEY_HEADER: running.keys["site-a"]}, content=b"x")
    assert r.status_code == 200, r.text
    assert ("/v1/fleet/pull-messages", running.keys["site-a"]) in running.upstream.seen


def test_control_route_and_foreign_key_are_refused_and_never_forwarded(running: Running) -> None:
    seen, before = len(running.upstream.seen), len(running.refusals)
    with running.client("site-a") as a, running.client("site-b") as b:
        control = a.post("/v1/control/start-run", headers={KEY_HEADER: running.keys["site-a"]}, content=b"x")
        stolen = b.post("/v1/fleet/pull-messages", headers={KEY_HEADER: running.keys["site-a"]}, content=b"x")
        no_key = a.post("/v1/fleet/pull-messages", content=b"x")
    for r in (control, stolen, no_key):
        assert r.status_code == 403
        assert r.json()["error"]["type"] == "permission_error"
    assert "only the Flower Fleet API" in control.json()["error"]["message"]
    assert len(running.upstream.seen) == seen
    got = running.wait_refusals(before + 3)[before:]
    assert [(r.subject, getattr(r, "action", None)) for r in got] == [
        ("site-a", "access.refused"),
        ("site-b", "access.refused"),
        ("site-a", "access.refused"),
    ]
    assert got[0].reason == "route not served on the fleet port (Fleet API only)"
    assert "does not match" in got[1].reason and "does not match" in got[2].reason


def _raw_request(running: Running, name: str, target: str, headers: list[tuple[str, str]]) -> int:
    """Send exactly `POST target` (httpx would normalise the path); the response status."""
    ctx = ssl.create_default_context(cafile=str(running.root / "ca" / "ca.pem"))
    ctx.load_cert_chain(running.root / name / "cert.pem", running.root / name / "key.pem")
    lines = [f"POST {target} HTTP/1.1", "Host: localhost", "Content-Length: 0", "Connection: close"]
    request = "\r\n".join([*lines, *(f"{k}: {v}" for k, v in headers), "", ""]).encode()
    with (
        socket.create_connection((HOST, running.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request)
        return int(tls.recv(64).split()[1])


def test_only_plain_fleet_paths_are_forwarded(running: Running) -> None:
    """nginx routes on the normalised path but forwards the raw one, so the raw one must be plain."""
    seen, before = len(running.upstream.seen), len(running.refusals)
    key = [(KEY_HEADER, running.keys["site-a"])]
    tricks = [
        "/v1/control/../fleet/pull-messages",  # normalises into /v1/fleet/
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/pull-messages?x=1",
        "/v1/fleet/pull%2Dmessages",
    ]
    assert [_raw_request(running, "site-a", target, key) for target in tricks] == [403] * len(tricks)
    assert len(running.upstream.seen) == seen
    reasons = {r.reason for r in running.wait_refusals(before + len(tricks))[before:]}
    assert reasons == {"route not served on the fleet port (Fleet API only)"}
    # A second key header cannot slip past the check: the SuperLink gets the checked value only.
    stolen = [(KEY_HEADER, running.keys["site-a"]), (KEY_HEADER, running.keys["site-b"])]
    assert _raw_request(running, "site-a", "/v1/fleet/pull-messages", stolen) == 200
    assert running.upstream.seen[-1] == ("/v1/fleet/pull-messages", running.keys["site-a"])
    assert running.upstream.headers[-1].get_all(KEY_HEADER) == [running.keys["site-a"]]


def test_each_bad_client_is_refused_with_its_reason(running: Running, tmp_path: Path) -> None:
    seen, before = len(running.upstream.seen), len(running.refusals)
    other = tmp_path / "other"
    pki.init_ca(other, consortium="gateway-test")
    pki.issue(other, "site-a", role="node")
    statuses = []
    for name, root in ((None, None), ("site-a", other), ("site-old", None)):
        with running.client(name, root=root) as c:
            statuses.append(c.post("/v1/fleet/pull-messages", headers={KEY_HEADER: running.keys["site-a"]}).status_code)
    statuses.append(httpx.post(f"http://{HOST}:{running.port}/v1/fleet/pull-messages").status_code)
    tls12 = ssl.create_default_context(cafile=str(running.root / "ca" / "ca.pem"))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError), socket.create_connection((HOST, running.port), timeout=5) as raw:
        tls12.wrap_socket(raw, server_hostname="localhost")
    assert statuses == [400, 400, 400, 400]
    assert len(running.upstream.seen) == seen
    reasons = [r.reason for r in running.wait_refusals(before + 5)[before:]]
    assert reasons[0] == "no client certificate"
    assert reasons[1].startswith("client certificate rejected: unable to verify the first certificate")
    assert reasons[2].startswith("client certificate rejected: certificate has expired")
    assert "CN=site-old" in reasons[2]
    assert reasons[3] == "plaintext HTTP on the mTLS port"
    assert reasons[4] == "TLS handshake failed: unsupported protocol"


def test_reload_applies_crl_and_binding_map_and_ends_old_requests(running: Running) -> None:
    """Last: it revokes site-a. A new map (site-b bound) and the new CRL take effect on
    SIGHUP, and a request that was in flight on an old worker ends within seconds."""
    slow_result: list[BaseException | int] = []

    def slow() -> None:
        try:
            with running.client("site-a") as c:
                r = c.post("/v1/fleet/slow", headers={KEY_HEADER: running.keys["site-a"]})
            slow_result.append(r.status_code)
        except httpx.HTTPError as exc:
            slow_result.append(exc)

    slow_thread = threading.Thread(target=slow)
    slow_thread.start()
    deadline = time.monotonic() + 10
    while ("/v1/fleet/slow", running.keys["site-a"]) not in running.upstream.seen:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pki.revoke(running.root, "site-a")
    bindings = {subject_dn(name="site-b", role="node", consortium="gateway-test"): running.keys["site-b"]}
    assert running.gateway.write_bindings(bindings)
    reloaded = time.monotonic()
    assert running.nginx.reload()
    slow_thread.join(timeout=15)
    assert not slow_thread.is_alive() and time.monotonic() - reloaded < 15  # not the upstream's 20 s
    assert isinstance(slow_result[0], httpx.HTTPError), slow_result
    before = len(running.refusals)
    deadline = time.monotonic() + 10
    while True:
        with running.client("site-a") as a, running.client("site-b") as b:
            revoked = a.post("/v1/fleet/pull-messages", headers={KEY_HEADER: running.keys["site-a"]})
            bound = b.post("/v1/fleet/pull-messages", headers={KEY_HEADER: running.keys["site-b"]})
        if revoked.status_code == 400 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (revoked.status_code, bound.status_code) == (400, 200)
    assert any("certificate revoked" in r.reason for r in running.wait_refusals(before + 1)[before:])
    assert running.nginx.alive()
