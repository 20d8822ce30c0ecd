"""stunnel sidecars that add mutual TLS to Flower's fleet traffic.

Flower's own TLS authenticates only the server, so both ends of the fleet channel run an
existing TLS terminator: the coordinator's sidecar requires a client certificate chained to
the consortium CA; each site's sidecar presents the site certificate and checks the
coordinator's name. Flower itself runs on loopback behind them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from federation.mtls_server import Refusal
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


_LOG_LINE = re.compile(r"LOG\d\[(?P<conn>[^\]]+)\]: (?P<msg>.*)$")
_ACCEPTED = re.compile(r"accepted connection from (?P<peer>\S+)")
_SUBJECT = re.compile(r"Rejected by CERT at depth=0: CN=(?P<cn>[^,]+)")
_NOT_REFUSALS = ("unexpected eof while reading",)  # a port probe that connects and closes


@dataclass
class RefusalLog:
    """Follows a stunnel server's log and reports each refused handshake once.

    stunnel logs a refusal over several lines of one connection id: the peer address when it
    accepts the connection, the verification error and rejected subject, then `SSL_accept:`
    with OpenSSL's reason. Only lines written after this object was created are read.
    """

    path: Path
    on_refusal: Callable[[Refusal], None]
    _offset: int = field(init=False, default=0)
    _peers: dict[str, str] = field(init=False, default_factory=dict)
    _reasons: dict[str, str] = field(init=False, default_factory=dict)
    _subjects: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def poll(self) -> int:
        """Read what was appended since the last poll; returns how many refusals it reported."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return 0
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
        self._offset += len(complete)
        return sum(self._line(line) for line in complete.decode("utf-8", "replace").splitlines())

    def _line(self, line: str) -> int:
        m = _LOG_LINE.search(line)
        if not m:
            return 0
        conn, msg = m["conn"], m["msg"]
        if accepted := _ACCEPTED.search(msg):
            self._peers[conn] = accepted["peer"]
        elif msg.startswith("CERT: Pre-verification error: "):
            self._reasons[conn] = "client certificate rejected: " + msg.split(": ", 2)[-1]
        elif subject := _SUBJECT.search(msg):
            self._subjects[conn] = subject["cn"]
        elif msg.startswith("SSL_accept:"):
            detail = msg.rsplit("::", 1)[-1]
            peer, subject_cn = self._peers.pop(conn, "?"), self._subjects.pop(conn, None)
            reason = self._reasons.pop(conn, detail)
            if detail in _NOT_REFUSALS:
                return 0
            self.on_refusal(Refusal(peer=peer, reason=reason, subject=subject_cn))
            return 1
        return 0
