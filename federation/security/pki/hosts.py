"""Which host names a party certificate may carry, by role: what lets a certificate stand in for a server.

A TLS client that checks only a host name accepts any consortium certificate carrying that
name, so names are handed out by role:

- Loopback names only where a server is reached on loopback: the coordinator (`localhost`,
  `127.0.0.1`: nginx and the `flwr` CLI reach the SuperLink there) and a node (`127.0.0.1`: its
  sidecar serves the SuperNode there). Reviewers, admins and monitors are clients only and carry none.
- Every coordinator certificate carries the coordinator's role name,
  `coordinator.<consortium>.fedseek.internal`, and no other certificate may: a site's sidecar
  checks that name (`federation.security.sidecar`), so only a coordinator certificate of this
  consortium can stand in for the coordinator, whatever host names it also carries. `.internal`
  is reserved for private use, so no public CA issues it and no real host is named so.
- A coordinator's other host names are never put on a non-coordinator certificate (nor a site's
  on a coordinator's), and wildcards are refused, so no certificate answers to both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from federation.security.pki.errors import PKIError
from federation.security.pki.identity import Identity, Role

__all__ = ["LOOPBACK_BY_ROLE", "ROLE_NAME_SUFFIX", "check_hosts", "coordinator_host", "is_loopback", "renewable"]

ROLE_NAME_SUFFIX = "fedseek.internal"

LOOPBACK_BY_ROLE: dict[str, tuple[str, ...]] = {
    "coordinator": ("localhost", "127.0.0.1"),
    "node": ("127.0.0.1",),
    "reviewer": (),
    "admin": (),
    "monitor": (),
}
"""The loopback names each role's certificate needs, added by `pki.issue`, and the only ones it may carry."""


def coordinator_host(consortium: str) -> str:
    """The name only this consortium's coordinator certificates carry (what site sidecars check)."""
    return f"coordinator.{consortium}.{ROLE_NAME_SUFFIX}"


def _norm(host: str) -> str:
    return host.strip().lower().rstrip(".")


def is_loopback(host: str) -> bool:
    """`localhost` (and its subdomains), a loopback or unspecified address (IPv4-mapped included)."""
    name = _norm(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _is_role_name(host: str) -> bool:
    name = _norm(host)
    return name == ROLE_NAME_SUFFIX or name.endswith("." + ROLE_NAME_SUFFIX)


def check_hosts(
    name: str, role: Role, consortium: str, hosts: Sequence[str], *, others: Iterable[Identity]
) -> tuple[str, ...]:
    """The host names `name`'s certificate gets (the coordinator's role name added), or PKIError.

    `others`: the consortium's current party certificates, whose host names must not be shared
    across the coordinator / non-coordinator line.
    """
    if isinstance(hosts, str):
        raise PKIError("hosts must be a sequence of host names, not a single string")
    wanted = [h for h in (_norm(h) for h in hosts) if h]
    allowed_loopback = LOOPBACK_BY_ROLE[role]
    for host in wanted:
        if "*" in host:
            raise PKIError(f"wildcard host '{host}' refused: a party certificate names its hosts one by one")
        if is_loopback(host) and host not in allowed_loopback:
            which = ", ".join(allowed_loopback) or "none"
            raise PKIError(
                f"a {role} certificate may not name '{host}' (loopback names it may carry: {which}); "
                "a certificate that names loopback can stand in for any local server"
            )
        if _is_role_name(host) and (role != "coordinator" or host != coordinator_host(consortium)):
            raise PKIError(
                f"'{host}' is a role name: only the coordinator certificate carries '{coordinator_host(consortium)}'"
            )
    mine = {h for h in wanted if not is_loopback(h)}
    for other in others:
        if other.name == name or (other.role == "coordinator") == (role == "coordinator"):
            continue
        shared = sorted(mine & {_norm(h) for h in other.hosts if not is_loopback(h)})
        if shared:
            raise PKIError(
                f"host '{shared[0]}' is on {other.role} certificate '{other.name}': a {role} certificate "
                "may not share host names with " + ("a site or client" if role == "coordinator" else "the coordinator")
            )
    if role == "coordinator" and coordinator_host(consortium) not in wanted:
        wanted.append(coordinator_host(consortium))
    return tuple(dict.fromkeys(wanted))


def renewable(role: Role, hosts: Sequence[str]) -> tuple[str, ...]:
    """A certificate's host names minus loopback names its role may no longer carry (renewing a
    certificate issued before this rule drops them instead of failing)."""
    return tuple(h for h in hosts if not is_loopback(h) or _norm(h) in LOOPBACK_BY_ROLE[role])
