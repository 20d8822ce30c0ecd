"""`fedseek coordinator start`: the SuperLink in its own network namespace, behind the nginx fleet gateway.

The SuperLink listens, with TLS (the coordinator certificate), on 127.0.0.1 of a network
namespace of its own (`federation.ops.netns`): no process on the host reaches that port. Its
one way out is a Unix socket in the state directory's `control/` (0700, the coordinator's
user). The public fleet port is nginx (`federation.security.fleet_gateway`), which connects to
that socket: it requires a client certificate chained to the consortium CA and not on its CRL,
forwards only the Fleet API, and only when the request's Flower key is the one registered for
the certificate's site. SuperNode authentication stays on as a second factor: each site's key
is registered through the Control API, which Flower's open-source SuperLink serves to anyone
who reaches its port; so every `flwr` command of the operator runs inside the namespace
(`flwr_control`), which only the coordinator's user may enter.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.admin_api import create_admin_app
from coordinator.metrics import CoordinatorCollector, CoordinatorMetrics
from coordinator.registry import AdapterRegistry
from coordinator.sites import KeyRetired, SiteAccess, flwr_supernode, known_node
from coordinator.witness import LedgerWitness, WitnessStore
from federation.errors import Unavailable
from federation.ops import netns
from federation.ops.atomic import PRIVATE_UMASK, private_dir, write_atomic
from federation.ops.filewatch import FileWatcher
from federation.ops.layout import CoordinatorLayout
from federation.ops.proctree import adopt_orphans
from federation.ops.supervise import Health, Managed, ProcessError, free_port, stop_all, supervise
from federation.protocol.config import CoordinatorConfig
from federation.security import pki
from federation.security.fleet_gateway import Gateway, GatewayError, GatewayLog, audit_refusal
from federation.security.mtls_server import HTTPSService, Refusal, ServerTLS, ServiceStartError, audit_hook
from federation.security.refusal_window import RefusalWindow
from federation.security.sidecar import TLSFiles
from privacy.audit import AuditTrail

log = logging.getLogger("fedseek.coordinator")

CONNECTION = "fedseek"
# The SuperLink's port inside its own network namespace, where nothing else listens.
SUPERLINK_PORT = 9093


class CoordinatorError(Unavailable):
    """The coordinator refuses to start or a run failed; one line for the operator."""


def flwr_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _bin_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


def write_cli_config(flwr_home: Path, superlink: str, *, ca_cert: Path) -> Path:
    """A Flower CLI config naming a SuperLink's Control API (TLS, consortium CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{superlink}"\nroot-certificates = "{ca_cert.resolve()}"\n'
    )
    return path


def flwr_env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flwr_control(
    socket: Path, flwr_home: Path, args: Sequence[str], *, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`flwr ARGS` inside the SuperLink's network namespace, the only place its Control API is.

    `socket` is the SuperLink's (`CoordinatorLayout.superlink_socket`): the namespace joined is
    the one whose launcher serves it, checked to be ours (`federation.ops.netns.run_inside`).
    """
    try:
        return netns.run_inside(
            socket, [flwr_bin("flwr"), *args], env=flwr_env(flwr_home), capture_output=True, text=True, timeout=timeout
        )
    except netns.NamespaceError as exc:
        raise CoordinatorError(f"cannot reach the SuperLink's Control API: {exc}") from exc


def register_site(socket: Path, flwr_cli: Path, public_key: Path, *, name: str, superlink_db: Path) -> int:
    """Register a site's SuperNode key (second factor) with the running SuperLink; its node id.

    A key the SuperLink already holds (a restart on the same state) is that registration: its
    node id is read back from `superlink_db`, which is kept as it is (the run history)."""
    try:
        out = flwr_supernode(
            ["register", str(public_key), CONNECTION, "--name", name],
            flwr=lambda args: flwr_control(socket, flwr_cli, args),
        )
    except RuntimeError as exc:
        known = known_node(superlink_db, public_key)
        if known is None:
            raise CoordinatorError(f"registering {name}: {exc}") from exc
        if known.status == "unregistered":
            raise KeyRetired(
                f"registering {name}: its Flower key was unregistered before (node {known.node_id}) and the "
                "SuperLink never takes a key twice; give the site a new key (site-keys/NAME.pub)"
            ) from exc
        log.info("site %s: key already registered as node %d (kept from %s)", name, known.node_id, superlink_db)
        return known.node_id
    return int(str(out["node-id"]))


def unregister_site(socket: Path, flwr_cli: Path, node_id: int) -> None:
    try:
        flwr_supernode(["unregister", str(node_id), CONNECTION], flwr=lambda args: flwr_control(socket, flwr_cli, args))
    except RuntimeError as exc:
        raise CoordinatorError(f"unregistering node {node_id}: {exc}") from exc


def _process_failure(exc: ProcessError) -> str:
    """One line for the operator: the namespace launcher's own reason when it refused (say, no
    network namespace allowed here: the SuperLink then never starts), else the error's first line."""
    first, refusal = str(exc).splitlines()[0], netns.refusal_in(str(exc))
    return f"{first} {refusal}" if refusal else first


def _start_admin_api(
    config: CoordinatorConfig,
    leaf: pki.LeafFiles,
    *,
    sites: SiteAccess,
    audit: AuditTrail,
    registry: Path,
    health: Health,
    superlink_db: Path,
    witness: Path,
) -> HTTPSService:
    """The admin API on its own HTTPS port (admin certificates; `/metrics` for monitors too; sites push
    their audit checkpoints to the `witness` store between rounds), in a thread."""
    tls = ServerTLS(
        cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl, poll_interval=config.pki_poll_seconds
    )
    metrics = CoordinatorMetrics(
        CoordinatorCollector(
            runs_dir=registry / "runs",
            superlink_db=superlink_db,
            leaf=leaf,
            pki_dir=sites.pki_dir,
            registered=lambda: sites.registered,
            allowed=lambda: len(sites.allowed()),
        )
    )
    app = create_admin_app(
        sites=sites,
        registry=AdapterRegistry(registry),
        audit=audit,
        health=health.snapshot,
        metrics=metrics.render,
        witness=LedgerWitness(WitnessStore(witness), site_keys_dir=sites.site_keys_dir, audit=audit),
    )
    try:
        return HTTPSService.start(
            app,
            tls,
            host=config.admin_host,
            port=config.admin_port or free_port(),
            on_refusal=audit_hook(audit.append, endpoint="admin"),
        )
    except ServiceStartError as exc:
        raise CoordinatorError(str(exc)) from exc


def run_coordinator(config: CoordinatorConfig) -> None:
    """Run until SIGTERM/SIGINT."""
    os.umask(PRIVATE_UMASK)  # everything the coordinator and its children write: its user's alone
    adopt_orphans()  # what a dead child leaves comes back to us to be killed and reaped, not to init
    pki_dir = Path(config.pki_dir)
    try:
        leaf = pki.load_party(pki_dir, config.name, role="coordinator")
    except pki.PKIError as exc:
        raise CoordinatorError(f"certificate check failed: {exc}") from exc
    layout = CoordinatorLayout(Path(config.state_dir).absolute())  # paths go to other processes
    private_dir(layout.root)
    try:
        netns.prepare_socket_dir(layout.control)
    except netns.NamespaceError as exc:
        raise CoordinatorError(str(exc)) from exc
    link_port = config.superlink_port or SUPERLINK_PORT
    link_socket = layout.superlink_socket
    superlink_cmd = [
        flwr_bin("flower-superlink"),
        # TLS end to end with each SuperNode (Flower requires it for SuperNode auth);
        # the sidecar wraps it in the consortium's mTLS on the public port.
        "--ssl-certfile",
        str(leaf.cert),
        "--ssl-keyfile",
        str(leaf.key),
        "--ssl-ca-certfile",
        str(leaf.ca_cert),
        "--host",
        "127.0.0.1",
        "--port",
        str(link_port),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        str(layout.superlink_db),
    ]
    superlink = Managed(
        name="superlink",
        # Its own network namespace: 127.0.0.1:link_port exists only there; the socket is the way in.
        argv=netns.launcher_argv(superlink_cmd, [netns.Exposed(link_socket, link_port)]),
        log_path=layout.superlink_log,
        # PATH: the SuperLink starts `flower-superexec` by name, from this environment's bin/
        env={"FLWR_HOME": str(layout.flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": _bin_path()},
    )
    gateway = Gateway(
        workdir=layout.gateway,
        tls=TLSFiles(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl),
        listen=f"{config.fleet_host}:{config.fleet_port}",
        upstream=f"unix:{link_socket}",
    )
    try:
        nginx = gateway.process()
    except GatewayError as exc:
        raise CoordinatorError(str(exc)) from exc
    procs = [superlink, nginx]
    watcher: FileWatcher | None = None
    follower: FileWatcher | None = None
    admin: HTTPSService | None = None
    fleet_refusals: RefusalWindow[Refusal] | None = None
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        link_socket.unlink(missing_ok=True)  # a killed launcher's: readiness is this path appearing
        superlink.start().wait_socket(link_socket, timeout=60)
        write_cli_config(layout.flwr_cli, f"127.0.0.1:{link_port}", ca_cert=leaf.ca_cert)  # as seen inside
        audit = AuditTrail(layout.audit)
        sites = SiteAccess(
            pki_dir=pki_dir,
            site_keys_dir=Path(config.site_keys_dir or pki_dir / pki.SITE_KEYS_DIR),
            audit=audit,
            register=lambda key, name: register_site(
                link_socket, layout.flwr_cli, key, name=name, superlink_db=layout.superlink_db
            ),
            unregister=lambda node_id: unregister_site(link_socket, layout.flwr_cli, node_id),
            lookup=lambda key: known_node(layout.superlink_db, key),
        )
        registered = sorted(sites.sync())
        gateway.write_bindings(sites.fleet_bindings())
        # Every request the gateway refuses becomes a log line and an audit record.
        fleet_refusals = audit_refusal(audit.append, endpoint="fleet")  # counted per peer and minute
        refusals = GatewayLog(gateway.access_log, gateway.error_log, fleet_refusals)
        gateway.reclaim()  # an orphaned worker of a coordinator killed with its gateway holds the port
        nginx.start().wait_port(config.fleet_host, config.fleet_port, timeout=30)

        def pki_changed() -> None:
            """A new CRL, index or site key: nginx re-reads the CRL at once (its old workers, and
            a revoked site's open connections, end within seconds), then who may join is
            re-decided and nginx reloads again if the binding map changed."""
            nginx.reload()
            sites.sync()
            if gateway.write_bindings(sites.fleet_bindings()):
                nginx.reload()

        watcher = FileWatcher(
            [leaf.crl, pki_dir / "ca" / "index.json", sites.site_keys_dir],
            pki_changed,
            interval=config.pki_poll_seconds,
        ).start()
        follower = FileWatcher([gateway.access_log, gateway.error_log], refusals.poll, interval=1.0).start()
        health = Health([p.name for p in procs])
        admin = _start_admin_api(
            config,
            leaf,
            sites=sites,
            audit=audit,
            registry=layout.registry,
            health=health,
            superlink_db=layout.superlink_db,
            witness=layout.witness,
        )
        info: dict[str, Any] = {
            # The operator's way in (`flwr_control`); the pid is the namespace's launcher at
            # start (after a restart `netns.run_inside` asks the socket for the live one).
            "superlink_socket": str(link_socket),
            "superlink_pid": superlink.pid,
            "fleet": f"{config.fleet_host}:{config.fleet_port}",
            "registry": str(layout.registry),
            "site_keys": str(sites.site_keys_dir),  # the ServerApp checks signed ledger heads with them
            "flwr_home": str(layout.flwr_cli),
            "registered_sites": registered,
            "admin": admin.url,
            "pid": os.getpid(),
        }
        info["health"] = health.snapshot()
        write_atomic(layout.endpoints, json.dumps(info, indent=2))
        print(f"coordinator ready: fleet (mTLS, nginx) {info['fleet']}, sites {registered}", flush=True)

        def health_changed(now: Health) -> None:
            """A child died or came back: the fleet is degraded, never the admin API (it is in this
            process); coordinator.json says which part is down and when it is retried."""
            info["health"] = now.snapshot()
            write_atomic(layout.endpoints, json.dumps(info, indent=2))

        supervise(procs, stopping, health=health, on_change=health_changed)
    except ProcessError as exc:
        raise CoordinatorError(_process_failure(exc)) from exc
    finally:
        for w in (watcher, follower):
            if w is not None:
                w.stop()
        if fleet_refusals is not None:
            fleet_refusals.close()  # the counts of refusal windows still open
        if admin is not None:
            admin.stop()
        stop_all(procs)
        layout.endpoints.unlink(missing_ok=True)
