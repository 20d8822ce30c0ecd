"""`fedseek coordinator start`: SuperLink on loopback behind the nginx fleet gateway.

The SuperLink listens on 127.0.0.1 only, with TLS (the coordinator certificate). The public
fleet port is nginx (`federation.security.fleet_gateway`): it requires a client certificate chained to
the consortium CA and not on its CRL, forwards only the Fleet API, and only when the
request's Flower key is the one registered for the certificate's site. SuperNode
authentication stays on as a second factor: each site's key is registered through the
Control API, which is served to the operator on loopback only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from coordinator.admin_api import create_admin_app
from coordinator.registry import AdapterRegistry
from coordinator.sites import SiteAccess, flwr_supernode
from federation.errors import Unavailable
from federation.ops.atomic import write_atomic
from federation.ops.filewatch import FileWatcher
from federation.ops.layout import CoordinatorLayout
from federation.ops.supervise import Managed, ProcessError, free_port, stop_all, supervise
from federation.protocol.config import CoordinatorConfig
from federation.security import pki
from federation.security.fleet_gateway import Gateway, GatewayError, GatewayLog, audit_refusal
from federation.security.mtls_server import HTTPSService, ServerTLS, ServiceStartError, audit_hook
from federation.security.sidecar import TLSFiles
from privacy.audit import AuditTrail

log = logging.getLogger("fedseek.coordinator")

CONNECTION = "fedseek"


class CoordinatorError(Unavailable):
    """The coordinator refuses to start or a run failed; one line for the operator."""


def flwr_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _bin_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


def write_cli_config(flwr_home: Path, superlink: str, *, ca_cert: Path) -> Path:
    """A Flower CLI config naming the local SuperLink's Control API (TLS, consortium CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{superlink}"\nroot-certificates = "{ca_cert.resolve()}"\n'
    )
    return path


def flwr_env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1"}


def register_site(flwr_cli: Path, public_key: Path, *, name: str) -> int:
    """Register a site's SuperNode key (second factor) with the running SuperLink; its node id."""
    try:
        out = flwr_supernode(
            ["register", str(public_key), CONNECTION, "--name", name],
            env=flwr_env(flwr_cli),
            flwr=flwr_bin("flwr"),
        )
    except RuntimeError as exc:
        raise CoordinatorError(f"registering {name}: {exc}") from exc
    return int(str(out["node-id"]))


def unregister_site(flwr_cli: Path, node_id: int) -> None:
    try:
        flwr_supernode(["unregister", str(node_id), CONNECTION], env=flwr_env(flwr_cli), flwr=flwr_bin("flwr"))
    except RuntimeError as exc:
        raise CoordinatorError(f"unregistering node {node_id}: {exc}") from exc


def _start_admin_api(
    config: CoordinatorConfig, leaf: pki.LeafFiles, *, sites: SiteAccess, audit: AuditTrail, registry: Path
) -> HTTPSService:
    """The admin API on its own HTTPS port (admin certificates only), in a thread."""
    tls = ServerTLS(
        cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl, poll_interval=config.pki_poll_seconds
    )
    app = create_admin_app(sites=sites, registry=AdapterRegistry(registry), audit=audit)
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
    pki_dir = Path(config.pki_dir)
    try:
        leaf = pki.load_party(pki_dir, config.name, role="coordinator")
    except pki.PKIError as exc:
        raise CoordinatorError(f"certificate check failed: {exc}") from exc
    layout = CoordinatorLayout(Path(config.state_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    link_port = config.superlink_port or free_port()
    superlink = Managed(
        name="superlink",
        argv=[
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
        ],
        log_path=layout.superlink_log,
        # PATH: the SuperLink starts `flower-superexec` by name, from this environment's bin/
        env={"FLWR_HOME": str(layout.flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": _bin_path()},
    )
    gateway = Gateway(
        workdir=layout.gateway,
        tls=TLSFiles(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl),
        listen=f"{config.fleet_host}:{config.fleet_port}",
        upstream=f"127.0.0.1:{link_port}",
    )
    try:
        nginx = gateway.process()
    except GatewayError as exc:
        raise CoordinatorError(str(exc)) from exc
    procs = [superlink, nginx]
    watcher: FileWatcher | None = None
    follower: FileWatcher | None = None
    admin: HTTPSService | None = None
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        superlink.start().wait_port("127.0.0.1", link_port, timeout=60)
        write_cli_config(layout.flwr_cli, f"127.0.0.1:{link_port}", ca_cert=leaf.ca_cert)
        audit = AuditTrail(layout.audit)
        sites = SiteAccess(
            pki_dir=pki_dir,
            site_keys_dir=Path(config.site_keys_dir or pki_dir / pki.SITE_KEYS_DIR),
            audit=audit,
            register=lambda key, name: register_site(layout.flwr_cli, key, name=name),
            unregister=lambda node_id: unregister_site(layout.flwr_cli, node_id),
        )
        registered = sorted(sites.sync())
        gateway.write_bindings(sites.fleet_bindings())
        # Every request the gateway refuses becomes a log line and an audit record.
        refusals = GatewayLog(gateway.access_log, gateway.error_log, audit_refusal(audit.append, endpoint="fleet"))
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
        admin = _start_admin_api(config, leaf, sites=sites, audit=audit, registry=layout.registry)
        info: dict[str, Any] = {
            "superlink": f"127.0.0.1:{link_port}",
            "fleet": f"{config.fleet_host}:{config.fleet_port}",
            "registry": str(layout.registry),
            "flwr_home": str(layout.flwr_cli),
            "registered_sites": registered,
            "admin": admin.url,
            "pid": os.getpid(),
        }
        write_atomic(layout.endpoints, json.dumps(info, indent=2))
        print(f"coordinator ready: fleet (mTLS, nginx) {info['fleet']}, sites {registered}", flush=True)
        supervise(procs, stopping)
    except ProcessError as exc:
        raise CoordinatorError(str(exc).splitlines()[0]) from exc
    finally:
        for w in (watcher, follower):
            if w is not None:
                w.stop()
        if admin is not None:
            admin.stop()
        stop_all(procs)
        layout.endpoints.unlink(missing_ok=True)
