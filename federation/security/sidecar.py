"""stunnel sidecars that add mutual TLS to Flower's fleet traffic at the sites.

Flower's own TLS authenticates only the server. Each site's sidecar terminates its
SuperNode's TLS (the site certificate, which always names 127.0.0.1, where the SuperNode dials it)
and re-originates the fleet traffic as mTLS with the site certificate, checking the
coordinator's role name (only a coordinator certificate carries it, see `client_config`); the
coordinator's gateway (`federation.security.fleet_gateway`, nginx) can then read every HTTP
request. `server_config` is a plain stunnel mTLS server, kept as the counterpart the sidecar
tests talk to.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from federation.errors import Unavailable
from federation.ops.supervise import Managed
from federation.security import pki


class SidecarError(Unavailable):
    """stunnel is missing or misconfigured."""


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    ca_cert: Path
    crl: Path | None = None


def stunnel_binary() -> str:
    for name in ("stunnel4", "stunnel"):
        found = shutil.which(name)
        if found:
            return found
    raise SidecarError("stunnel is not installed (Debian package stunnel4)")


def _common(tls: TLSFiles) -> list[str]:
    lines = [
        f"cert = {tls.cert}",
        f"key = {tls.key}",
        f"CAfile = {tls.ca_cert}",
        "verifyChain = yes",
        "sslVersionMin = TLSv1.3",
    ]
    if tls.crl is not None:
        lines.append(f"CRLfile = {tls.crl}")
    return lines


_HEAD = ["foreground = yes", "pid =", "debug = notice", ""]
# Every service's connections on a clock (stunnel's defaults keep an idle one 12 hours): TIMEOUTbusy
# for data a peer owes (the handshake included), TIMEOUTidle for a quiet connection (above the fleet
# gateway's 60 s keep-alive, which ends an idle fleet connection first), TIMEOUTclose for close_notify.
_TIMEOUTS = ["TIMEOUTbusy = 30", "TIMEOUTidle = 120", "TIMEOUTclose = 5"]


def server_config(*, tls: TLSFiles, accept: str, connect: str) -> str:
    """A stunnel mTLS server: require a consortium client certificate on `accept`, forward to `connect`."""
    service = ["[fleet]", f"accept = {accept}", f"connect = {connect}", *_common(tls), "requireCert = yes", *_TIMEOUTS]
    return "\n".join([*_HEAD, *service, ""])


def coordinator_addresses(value: str | Sequence[str]) -> list[str]:
    """The coordinator's fleet addresses a site dials, in order: `NodeConfig.coordinator` may list a
    standby after the primary, comma-separated ("10.0.0.1:9443,10.0.0.2:9443"). SidecarError names a
    malformed one."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [item.strip() for item in items if item.strip()]
    for addr in out:
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in addr):
            raise SidecarError(f"coordinator address {addr!r} is not host:port")
    if not out:
        raise SidecarError("no coordinator address given")
    return out


def client_config(*, tls: TLSFiles, accept: str, relay: str, connect: str | Sequence[str], server_name: str) -> str:
    """Site side, two services in one stunnel.

    `[supernode]` terminates the SuperNode's TLS on `accept` with the site certificate and
    passes plain HTTP to `relay`; `[fleet]` takes it there and opens mTLS to the coordinator at
    `connect` (one address, or several: a standby coordinator after the primary, tried in that
    order for each new connection, `failover = prio`), presenting the site certificate. So the
    coordinator's gateway sees each request, and nothing leaves the host unencrypted. `accept`
    and `relay` may be host:port or a Unix socket path: the agent uses paths in a 0700 directory
    (`NodeLayout.sockets`), since neither service can tell its caller from another local user
    (the SuperNode presents no client certificate); its SuperNode reaches `accept` from its
    private namespace (`federation.ops.netns`).

    Who may answer as the coordinator: a certificate of the consortium CA carrying the
    coordinator's role name (`pki.coordinator_host`, from the CA's O), which the CA puts on
    coordinator certificates only. A host-name check alone let any consortium certificate
    naming the coordinator's host (every one carried `localhost`) stand in for it; stunnel has
    no subject (OU) check, so the role is pinned through this name. `server_name` (the host the
    site dials) is sent as SNI only.
    """
    try:
        role_name = pki.coordinator_host(pki.consortium_of(tls.ca_cert))
    except pki.PKIError as exc:
        raise SidecarError(f"cannot pin the coordinator: {exc}") from exc
    terminate = [
        "[supernode]",
        f"accept = {accept}",
        f"connect = {relay}",
        f"cert = {tls.cert}",
        f"key = {tls.key}",
        "sslVersionMin = TLSv1.3",
        *_TIMEOUTS,
    ]
    fleet = [
        "[fleet]",
        "client = yes",
        f"accept = {relay}",
        *(f"connect = {addr}" for addr in coordinator_addresses(connect)),
        # A standby coordinator (restored from a backup, `fedseek restore`) is dialled only while the
        # primary refuses or does not answer within TIMEOUTconnect; a live primary always comes first.
        "failover = prio",
        "TIMEOUTconnect = 5",
        *_common(tls),
        f"checkHost = {role_name}",
        f"sni = {server_name}",
        *_TIMEOUTS,
    ]
    return "\n".join([*_HEAD, *terminate, "", *fleet, ""])


def make_sidecar(*, name: str, config_text: str, workdir: Path, sockets: Sequence[Path] = ()) -> Managed:
    """Write the stunnel config into `workdir` and return the (not yet started) process.

    `sockets`: the Unix socket paths the config accepts on (stunnel takes a path wherever it takes
    host:port, creates the socket under its umask and removes it when it exits, but will not bind
    over one a killed stunnel left behind).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"{name}.conf"
    conf.write_text(config_text)
    return Managed(
        name=name, argv=[stunnel_binary(), str(conf)], log_path=workdir / f"{name}.log", sockets=tuple(sockets)
    )
