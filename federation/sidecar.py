"""stunnel sidecars that add mutual TLS to Flower's fleet traffic.

Flower's own TLS authenticates only the server, so both ends of the fleet channel run an
existing TLS terminator: the coordinator's sidecar requires a client certificate chained to
the consortium CA; each site's sidecar presents the site certificate and checks the
coordinator's name. Flower itself runs on loopback behind them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from federation.procs import Managed


class SidecarError(RuntimeError):
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


def _stunnel_conf(service: list[str], tls: TLSFiles, tail: list[str]) -> str:
    head = ["foreground = yes", "pid =", "debug = notice", "", "[fleet]"]
    return "\n".join([*head, *service, *_common(tls), *tail, ""])


def server_config(*, tls: TLSFiles, accept: str, connect: str) -> str:
    """Coordinator side: require a consortium client certificate on `accept`, forward to `connect`."""
    return _stunnel_conf([f"accept = {accept}", f"connect = {connect}"], tls, ["requireCert = yes"])


def client_config(*, tls: TLSFiles, accept: str, connect: str, server_name: str) -> str:
    """Site side: accept on loopback `accept`, open mTLS to the coordinator at `connect`."""
    return _stunnel_conf(
        ["client = yes", f"accept = {accept}", f"connect = {connect}"],
        tls,
        [f"checkHost = {server_name}", f"sni = {server_name}"],
    )


def make_sidecar(*, name: str, config_text: str, workdir: Path) -> Managed:
    """Write the stunnel config into `workdir` and return the (not yet started) process."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"{name}.conf"
    conf.write_text(config_text)
    return Managed(name=name, argv=[stunnel_binary(), str(conf)], log_path=workdir / f"{name}.log")
