"""Which sites may join the federation, kept in step with the consortium CA.

A site's SuperNode key (second factor) is registered with the SuperLink only while the CA's
records show a valid `node` certificate for that same site name: the certificate and the
Flower key must name the same site. When the CRL or the CA index changes, `sync()` runs
again: a revoked (or expired) site is unregistered at once, so its open SuperNode session
stops being served, and a newly issued site is registered without a restart.

The coordinator reads only public PKI files: the CA certificate, its index of issued
certificates (names, roles, serials, revocations) and the party certificates; never a key.

`fleet_bindings()` hands the fleet gateway (nginx) the same decision per request: the
certificate subject of each registered site and the Flower key it must present.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from federation.errors import Conflict
from federation.security import pki
from federation.security.fleet_gateway import GatewayError, flower_key_header, subject_dn
from privacy.audit import AuditTrail

log = logging.getLogger("fedseek.coordinator.sites")

Register = Callable[[Path, str], int]


class KeyRetired(Conflict):
    """A site's Flower key was unregistered (its certificate revoked) and the SuperLink never takes
    a key twice: the site needs a new key."""


Unregister = Callable[[int], None]


@dataclass
class SiteAccess:
    pki_dir: Path
    site_keys_dir: Path
    audit: AuditTrail
    register: Register
    unregister: Unregister
    # What the SuperLink already holds for a key (`known_node` on its database), across restarts.
    lookup: Callable[[Path], KnownNode | None] | None = None
    registered: dict[str, int] = field(default_factory=dict)  # site -> SuperLink node id
    bound: dict[str, tuple[str, str]] = field(default_factory=dict)  # site -> (cert subject, key header)

    def allowed(self) -> dict[str, pki.Identity]:
        """Sites with a currently valid node certificate of this consortium (the CA's O), by name."""
        consortium = pki.consortium_of(self.pki_dir / "ca" / "ca.pem")
        return {
            ident.name: ident
            for ident, status in pki.list_status(self.pki_dir)
            if ident.role == "node" and status == "valid" and ident.consortium == consortium
        }

    def sync(self) -> dict[str, int]:
        """Register keys of valid sites, unregister the rest; returns the registered map."""
        allowed = self.allowed()
        keys = {p.stem: p for p in sorted(self.site_keys_dir.glob("*.pub"))} if self.site_keys_dir.is_dir() else {}
        for name, node_id in list(self.registered.items()):
            if name not in allowed:
                self.unregister(node_id)
                del self.registered[name]
                self.bound.pop(name, None)
                log.warning("site %s unregistered (node %d): no valid certificate (revoked or expired)", name, node_id)
                self.audit.append(
                    actor="coordinator", action="site.unregistered", resource=name, details={"node_id": node_id}
                )
        for name, key in keys.items():
            if name in self.registered:
                continue
            if name not in allowed:
                log.warning("site key %s not registered: the CA shows no valid node certificate for it", key)
                self._retire_stale(name, key)
                continue
            try:
                header = flower_key_header(key.read_bytes())
            except (OSError, GatewayError) as exc:
                log.warning("site key %s not registered: %s", key, exc)
                continue
            try:
                node_id = self.register(key, name)
            except KeyRetired as exc:  # this site stays out; the others (and the coordinator) go on
                log.warning("site %s not registered: %s", name, exc.one_line())
                self.audit.append(
                    actor="coordinator", action="site.refused", resource=name, details={"reason": exc.one_line()}
                )
                continue
            self.registered[name] = node_id
            ident = allowed[name]
            self.bound[name] = (subject_dn(name=name, role="node", consortium=ident.consortium), header)
            serial = ident.serial
            self.audit.append(
                actor="coordinator",
                action="site.registered",
                resource=name,
                details={"node_id": node_id, "certificate_serial": f"{serial:x}"},
            )
        return dict(self.registered)

    def _retire_stale(self, name: str, key: Path) -> None:
        """A key the SuperLink still holds from before a restart, for a site revoked meanwhile: out
        of the SuperLink too (the fleet gateway refuses its certificate already)."""
        known = self.lookup(key) if self.lookup is not None else None
        if known is None or known.status == "unregistered":
            return
        self.unregister(known.node_id)
        log.warning("site %s unregistered (node %d): revoked while the coordinator was down", name, known.node_id)
        self.audit.append(
            actor="coordinator", action="site.unregistered", resource=name, details={"node_id": known.node_id}
        )

    def fleet_bindings(self) -> dict[str, str]:
        """Certificate subject -> `flwr-public-key` value of every registered site."""
        return dict(self.bound.values())


FlwrCommand = Callable[
    [list[str]], "subprocess.CompletedProcess[str]"
]  # `flwr ARGS`, run where it may reach the SuperLink


def flwr_supernode(args: list[str], *, flwr: FlwrCommand) -> dict[str, object]:
    """Run `flwr supernode ... --format json` against the SuperLink's Control API."""
    out = flwr(["supernode", *args, "--format", "json"])
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError:
        data = {}
    if out.returncode != 0 or not data.get("success", False):
        # Its JSON error's message, else its last output line (the JSON's closing brace said nothing).
        text = str(data.get("error-message") or out.stdout + out.stderr)
        detail = [line.strip() for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise RuntimeError(f"flwr supernode {args[0]} failed: {detail[0]}")
    return dict(data)


@dataclass(frozen=True)
class KnownNode:
    """A SuperNode key the SuperLink already holds."""

    node_id: int
    status: str  # registered | online | offline | unregistered (Flower's NodeStatus)


def known_node(superlink_db: Path, public_key: Path) -> KnownNode | None:
    """The SuperLink's own record of a SuperNode key (OpenSSH public key file), read from its
    database (read-only), or None.

    Why: registering a key twice is refused (Flower's Control API: 412 "Public key already in
    use"), and `flwr supernode list` shows no keys. A coordinator restarted on its state finds its
    sites' keys there; their node ids are what it registered before, and the database, with the
    run history, stays as it is.
    """
    from cryptography.hazmat.primitives import serialization

    if not superlink_db.is_file():
        return None
    try:  # as Flower stores it: flwr.supercore.primitives.asymmetric.public_key_to_bytes
        stored = serialization.load_ssh_public_key(public_key.read_bytes()).public_bytes(
            encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (OSError, ValueError):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{superlink_db.absolute().as_uri()}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT node_id, status FROM node WHERE public_key = ?", (stored,)).fetchone()
    except sqlite3.Error as exc:
        log.warning("cannot read %s: %s", superlink_db, exc)
        return None
    if row is None or row[0] is None:
        return None
    return KnownNode(node_id=int(row[0]) % 2**64, status=str(row[1]))  # stored as sint64, used as uint64
