"""nginx as the coordinator's fleet gateway: mTLS, fleet routes only, certificate bound to Flower key.

Flower 1.42's SuperLink serves its Fleet (`/v1/fleet/*`), Control (`/v1/control/*`) and
Runtime APIs as one FastAPI app on one HTTPS port, and a SuperNode speaks protobuf over
HTTP/1.1 (httpx) to it, signing each request and sending its public key in the
`flwr-public-key` header (base64 of the key's PEM SubjectPublicKeyInfo). A byte tunnel cannot
see any of that, so the coordinator's public fleet port is nginx, which terminates the
consortium mTLS itself and then, per request:

- proxies only `/v1/fleet/` to the SuperLink on loopback (TLS, verified against the CA);
  every other route answers 403;
- requires that `flwr-public-key` is the key registered for the client certificate's subject
  (an nginx `map` over "subject|key", rewritten whenever the registered sites change), so
  the certificate-to-Flower-key binding holds on every request, not only at registration.

nginx checks client certificates after the handshake: a missing, foreign, expired or revoked
certificate and plaintext HTTP get 400 on the first request (nginx's internal 496/495/497). `GatewayLog`
turns those, the 403s and failed handshakes (error log) into `Refusal`s for the audit trail.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import shutil
from base64 import b64encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from federation.errors import Unavailable
from federation.ops import proctree
from federation.ops.atomic import write_atomic
from federation.ops.supervise import Managed
from federation.security.mtls_server import Refusal, peer_host
from federation.security.refusal_window import WINDOW_S, RefusalWindow
from federation.security.sidecar import TLSFiles

log = logging.getLogger("fedseek.fleet_gateway")

FLEET_PREFIX = "/v1/fleet/"  # flwr.superlink.routers.fleet.router prefix
# A fleet request as the SuperNode sends it (flwr.supernode.fleet_http_client: fixed paths such
# as /v1/fleet/pull-messages, no query). nginx routes on the normalised URI but forwards the raw
# one, so the raw URI must also be this plain: no dot segments, percent-escapes or query.
FLEET_ROUTE = r"^/v1/fleet/[a-z-]+$"
KEY_HEADER = "flwr-public-key"  # flwr.supercore.constant.FLEET_HTTP_PUBLIC_KEY_HEADER
SHUTDOWN_TIMEOUT_S = 2  # after a reload, old workers (and a revoked site's open requests) end this soon
HEADER_TIMEOUT_S = 10  # TLS handshake and request head
BODY_TIMEOUT_S = 30  # between two reads of a request body / two writes of a response
KEEPALIVE_TIMEOUT_S = 60  # an idle keep-alive connection
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # nginx's defaults are root's paths
_SAFE = re.compile(r"^[A-Za-z0-9=,.+/\-|]+$")  # what goes into the map; nothing nginx would interpret


class GatewayError(Unavailable):
    """nginx is missing or a binding cannot be expressed safely."""


def _workers_user() -> str:
    """Started as root, nginx runs its workers as `nobody`, who must not open the SuperLink's
    socket (0600 in a 0700 directory of the coordinator's user): keep the workers as that user.
    An unprivileged coordinator needs nothing (nginx cannot switch users then)."""
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # sbin: not on users' PATH
    if not found:
        raise GatewayError("nginx is not installed (Debian package nginx)")
    return found


def flower_key_header(openssh_line: bytes) -> str:
    """The `flwr-public-key` header value a SuperNode with this (OpenSSH) public key sends.

    Flower sends `b64encode(public_key_to_bytes(key))`, i.e. base64 of the PEM
    SubjectPublicKeyInfo (flwr.supernode.node_auth_http_interceptor).
    """
    try:
        key = serialization.load_ssh_public_key(openssh_line.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise GatewayError(f"not an OpenSSH public key: {exc}") from exc
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64encode(pem).decode("ascii")


def subject_dn(*, name: str, role: str, consortium: str) -> str:
    """A party certificate's subject as nginx's `$ssl_client_s_dn` prints it (RFC 2253 order)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    return subject.rfc4514_string()


def binding_map(bindings: Mapping[str, str]) -> str:
    """nginx `map` entries: "<certificate subject>|<flwr-public-key value>" -> 1, one per site."""
    lines = []
    for dn, key in sorted(bindings.items()):
        entry = f"{dn}|{key}"
        if not _SAFE.match(entry) or dn.startswith("~"):
            raise GatewayError(f"refusing to put {entry!r} into the gateway's binding map")
        lines.append(f'"{entry}" 1;')
    return "\n".join(lines) + ("\n" if lines else "")


@dataclass(frozen=True)
class Gateway:
    """Where one gateway keeps its config, map, logs, pid and temp files."""

    workdir: Path
    tls: TLSFiles
    listen: str  # host:port, public
    upstream: str  # the SuperLink: "unix:/path/superlink.sock" (its own network namespace's port, relayed)
    upstream_name: str = "localhost"  # a name on the coordinator certificate

    @property
    def conf(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def site_map(self) -> Path:
        return self.workdir / "sites.map"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def config(self) -> str:
        """The whole nginx.conf (unprivileged: every path inside `workdir`)."""
        if self.tls.crl is None:
            raise GatewayError("the fleet gateway needs the consortium CRL")
        w, t = self.workdir, self.tls
        temp = "\n".join(f"    {kind}_temp_path {w}/tmp/{kind};" for kind in _TEMP_KINDS)
        deny = '{"error":{"message":"%s","type":"permission_error","code":403}}'
        only_fleet = "only the Flower Fleet API is served on this port"
        return f"""# written by fedseek (federation/security/fleet_gateway.py); edits are overwritten
daemon off;
{_workers_user()}worker_processes 1;
pid {w}/nginx.pid;
error_log {self.error_log} info;
worker_shutdown_timeout {SHUTDOWN_TIMEOUT_S}s;
events {{ worker_connections 1024; }}
http {{
{temp}
    server_tokens off;
    # Every connection on a clock (nginx's defaults are 60-75 s): the handshake and the request head
    # (nginx 1.22 times the handshake with client_header_timeout), each body read, each response write,
    # and an idle keep-alive connection. Flower's SuperNode sends whole requests and drops idle
    # connections after 5 s (httpx), so these bounds only ever cut slow or silent clients.
    client_header_timeout {HEADER_TIMEOUT_S}s;
    client_body_timeout {BODY_TIMEOUT_S}s;
    send_timeout {BODY_TIMEOUT_S}s;
    keepalive_timeout {KEEPALIVE_TIMEOUT_S}s;
    log_format fleet escape=json '{{"time":"$time_iso8601","peer":"$remote_addr:$remote_port",'
        '"status":$status,"https":"$https","verify":"$ssl_client_verify","subject":"$ssl_client_s_dn",'
        '"serial":"$ssl_client_serial","method":"$request_method","uri":"$request_uri",'
        '"route_ok":"$fleet_route","bound":"$fleet_bound"}}';
    access_log {self.access_log} fleet;
    map_hash_bucket_size 1024;
    map $request_uri $fleet_route {{
        default 0;
        "~{FLEET_ROUTE}" 1;
    }}
    map "$ssl_client_s_dn|$http_{KEY_HEADER.replace("-", "_")}" $fleet_bound {{
        default 0;
        include {self.site_map};
    }}
    upstream superlink {{
        server {self.upstream};
        keepalive 16;
    }}
    server {{
        listen {self.listen} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {t.cert};
        ssl_certificate_key {t.key};
        ssl_client_certificate {t.ca_cert};
        ssl_verify_client on;
        ssl_verify_depth 1;
        ssl_crl {t.crl};
        ssl_session_tickets off;
        ssl_session_cache off;
        default_type application/json;
        client_max_body_size 0;
        location {FLEET_PREFIX} {{
            if ($fleet_route = 0) {{
                return 403 '{deny % only_fleet}';
            }}
            if ($fleet_bound = 0) {{
                return 403 '{deny % "the Flower key does not belong to the site on the client certificate"}';
            }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header {KEY_HEADER} $http_{KEY_HEADER.replace("-", "_")};  # exactly the value checked
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 1;
            proxy_ssl_trusted_certificate {t.ca_cert};
            proxy_ssl_crl {t.crl};
            proxy_ssl_name {self.upstream_name};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.3;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
        location / {{
            return 403 '{deny % only_fleet}';
        }}
    }}
}}
"""

    def write_bindings(self, bindings: Mapping[str, str]) -> bool:
        """Rewrite the binding map (atomically); returns whether it changed (then reload)."""
        text = binding_map(bindings)
        try:
            if self.site_map.read_text() == text:
                return False
        except OSError:
            pass
        write_atomic(self.site_map, text)  # nginx may reload at any moment: never a half-written map
        return True

    def reclaim(self) -> list[int]:
        """Kill and reap what is left of an earlier gateway on this state: an nginx of ours with one
        of its logs open. Its supervisor kills a dead master's worker itself, but a coordinator
        killed together with its master (kill -9 of both, the OOM killer) leaves the worker to init,
        holding the fleet port, so that no new gateway could bind it."""
        ours = {str(path.absolute()) for path in (self.error_log, self.access_log)}
        stale = [pid for pid in _holders(ours) if pid != os.getpid() and _is_nginx(pid)]
        if stale:
            log.warning("killing %d process(es) of an earlier fleet gateway: %s", len(stale), stale)
            proctree.kill_and_reap(stale)
        return stale

    def process(self, bindings: Mapping[str, str] | None = None) -> Managed:
        """Write config and map into `workdir`; the (not yet started) nginx process."""
        for kind in _TEMP_KINDS:
            (self.workdir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config())
        self.write_bindings(bindings or {})
        return Managed(
            name="fleet-gateway",
            argv=[nginx_binary(), "-p", str(self.workdir), "-c", str(self.conf), "-e", str(self.error_log)],
            log_path=self.error_log,  # nginx's own start-up errors land here too
        )


def _holders(paths: set[str]) -> list[int]:
    """Processes of this user with one of `paths` open."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.geteuid():
                continue
            targets = {os.readlink(f"{fd_dir}/{fd}").removesuffix(" (deleted)") for fd in os.listdir(fd_dir)}
        except OSError:
            continue
        if targets & paths:
            found.append(int(entry))
    return found


def _is_nginx(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return argv0.startswith(b"nginx") or argv0.endswith(b"/nginx")  # "nginx: worker process", or not yet renamed


@dataclass(frozen=True)
class GatewayRefusal(Refusal):
    """A refusal with what it was: `tls.refused` (certificate, plaintext, handshake) or
    `access.refused` (a route other than the fleet API, a Flower key not the certificate's)."""

    action: str = "tls.refused"
    status: int | None = None
    route: str | None = None


def audit_refusal(
    append: Callable[..., object], *, window_s: float = WINDOW_S, **details: str
) -> RefusalWindow[Refusal]:
    """Log line and audit record for refusals (`tls.refused` or `access.refused`), at most one per
    (peer host, what, reason, route) and window plus the window's count (`details.count`), as the
    HTTPS endpoints do (federation.security.refusal_window). `close()` writes pending counts."""

    def record(refusal: Refusal, count: int, summary: dict[str, object] | None) -> None:
        action = _action(refusal)
        extra: dict[str, object] = {}
        if isinstance(refusal, GatewayRefusal):
            extra = {k: v for k, v in (("status", refusal.status), ("route", refusal.route)) if v is not None}
        who = refusal.subject or "no valid certificate"
        times = "" if summary is None else f" {count} more times in {window_s:g}s"
        log.warning("fleet gateway refused %s (%s)%s: %s", refusal.peer, who, times, refusal.reason)
        append(
            actor=refusal.subject or refusal.peer,
            action=action,
            resource=str(extra.get("route", "")),
            details={
                "peer": refusal.peer,
                "reason": refusal.reason,
                **extra,
                "count": count,
                **(summary or {}),
                **details,
            },
        )

    def key(refusal: Refusal) -> tuple[object, ...]:
        route = refusal.route if isinstance(refusal, GatewayRefusal) else None
        return (peer_host(refusal.peer), _action(refusal), refusal.subject, refusal.reason, route)

    return RefusalWindow(record, key, window_s=window_s)


def _action(refusal: Refusal) -> str:
    return refusal.action if isinstance(refusal, GatewayRefusal) else "tls.refused"


_HANDSHAKE = re.compile(
    r"SSL_do_handshake\(\) failed \(SSL: (?:error:[0-9A-F]+:[^:]*::)?(?P<reason>[^)]*)\).*?client: (?P<client>[^,\s]+)"
)
_CN = re.compile(r"(?:^|,)CN=(?P<cn>[^,]+)")


def refusal_from_access(entry: Mapping[str, object]) -> GatewayRefusal | None:
    """The refusal one access-log entry records, or None for a request that was served."""
    status = int(str(entry.get("status", 0)))
    if status not in (400, 403, 495, 496, 497):
        return None
    verify, dn = str(entry.get("verify", "")), str(entry.get("subject", ""))
    cn = _CN.search(dn)
    subject = cn["cn"] if cn else None
    peer, route = str(entry.get("peer", "?")), f"{entry.get('method', '')} {entry.get('uri', '')}".strip()
    if entry.get("https") != "on" or status == 497:
        return GatewayRefusal(peer=peer, reason="plaintext HTTP on the mTLS port", status=status, route=route)
    if verify == "NONE" or status == 496:
        return GatewayRefusal(peer=peer, reason="no client certificate", status=status, route=route)
    if verify.startswith("FAILED"):  # the subject is only a claim here: named in the reason, not the actor
        detail = verify.partition(":")[2] or "verification failed"
        claim = f" (certificate subject {dn})" if dn else ""
        reason = f"client certificate rejected: {detail}{claim}"
        return GatewayRefusal(peer=peer, reason=reason, status=status, route=route)
    if status != 403:
        return None  # a malformed request of a verified client: not an access decision
    if entry.get("route_ok") == "1":
        reason = "Flower key header does not match the key registered for the certificate's site"
    else:
        reason = "route not served on the fleet port (Fleet API only)"
    return GatewayRefusal(
        peer=peer, reason=reason, subject=subject, action="access.refused", status=status, route=route
    )


def refusal_from_error(line: str) -> GatewayRefusal | None:
    """A failed TLS handshake in nginx's error log (wrong protocol, plaintext, TLS 1.2...)."""
    m = _HANDSHAKE.search(line)
    if not m:
        return None
    return GatewayRefusal(peer=m["client"], reason=f"TLS handshake failed: {m['reason']}")


@dataclass
class _Tail:
    path: Path
    offset: int = 0

    def __post_init__(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                if f.seek(0, os.SEEK_END) < self.offset:
                    self.offset = 0  # rotated or truncated
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
        self.offset += len(complete)
        return complete.decode("utf-8", "replace").splitlines()


@dataclass
class GatewayLog:
    """Follows the gateway's access and error logs and reports each refusal once.

    Only lines written after this object was created are read (like `sidecar.RefusalLog`).
    """

    access_log: Path
    error_log: Path
    on_refusal: Callable[[Refusal], None]
    _tails: tuple[_Tail, _Tail] = field(init=False)

    def __post_init__(self) -> None:
        self._tails = (_Tail(self.access_log), _Tail(self.error_log))

    def poll(self) -> int:
        """Read what was appended since the last poll; returns how many refusals it reported."""
        found: list[GatewayRefusal] = []
        for line in self._tails[0].lines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and (refusal := refusal_from_access(entry)):
                found.append(refusal)
        found += [r for line in self._tails[1].lines() if (r := refusal_from_error(line))]
        for refusal in found:
            self.on_refusal(refusal)
        return len(found)
