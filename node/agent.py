"""`fedseek node start`: the site's agent daemon.

Start-up order is chosen so that a bad input is refused before anything is touched:
certificate (must chain to the consortium CA), audit trail and ledger (integrity), data,
model. A spent privacy budget does not stop a start: the node serves, and training rounds
are refused. Then the HTTPS API, the mTLS fleet sidecar and
the SuperNode start, and the agent supervises both until it is stopped. The node itself
(model, ledger, audit trail, serving) is built by `node.build`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from federation.errors import FedSeekError
from federation.ops import netns
from federation.ops.atomic import PRIVATE_UMASK, write_atomic
from federation.ops.filewatch import FileWatcher
from federation.ops.layout import NodeLayout
from federation.ops.proctree import adopt_orphans
from federation.ops.supervise import Health, Managed, ProcessError, free_port, stop_all, supervise
from federation.protocol.config import ConfigError, NodeConfig
from federation.security import pki
from federation.security.app_signing import load_publishers
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.mtls_server import HTTPSService, ServerTLS, ServiceStartError, audit_hook
from federation.security.sidecar import TLSFiles, client_config, make_sidecar
from node.api import create_app
from node.api.deps import caller
from node.app_guard.launch import guard_process, write_superexec_secret
from node.build import NodeStartError, build_node, node_access, site_budget
from node.checkpoint_push import CheckpointPush, admin_url, check_interval
from node.service import NodeService
from privacy.audit import head_path, verify
from privacy.ledger import SPENT_BELOW, PrivacyLedger

log = logging.getLogger("fedseek.node")


@dataclass(frozen=True)
class NodeEndpoints:
    name: str
    openai: str
    fleet_sidecar: str
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "openai": self.openai, "fleet_sidecar": self.fleet_sidecar, "pid": self.pid}


def preflight(config: NodeConfig) -> pki.LeafFiles:
    """Checks that need neither the model nor the network; raise NodeStartError."""
    try:
        leaf = pki.load_party(Path(config.pki_dir), config.name, role="node")
    except pki.PKIError as exc:
        raise NodeStartError(f"certificate check failed: {exc}") from exc
    if "127.0.0.1" not in pki.read_identity(leaf.cert).hosts:
        raise NodeStartError(
            f"certificate check failed: {config.name}'s certificate does not name 127.0.0.1, where the fleet "
            "sidecar serves it to the SuperNode; re-issue it (`fedseek ca issue` adds it)"
        )
    if config.coordinator_admin:  # where the audit checkpoints are pushed between rounds
        try:
            admin_url(config.coordinator_admin)
            check_interval(config.checkpoint_push_seconds)
        except ConfigError as exc:
            raise NodeStartError(exc.one_line()) from exc
    try:  # the app guard runs no ClientApp without it
        load_publishers(pki.party_publishers(Path(config.pki_dir), config.name))
    except FedSeekError as exc:
        raise NodeStartError(f"app publisher check failed: {exc.one_line()}") from exc
    # The node key signs the audit trail's checkpoints: made before the trail opens, so a site whose
    # certificate came without one (`pki.issue`) has its first start's records signed too, not noted
    # as an unsigned tail at the next start.
    ensure_auth_keypair(Path(config.pki_dir) / config.name)
    layout = NodeLayout(Path(config.state_dir))
    audit_path = layout.audit
    if audit_path.exists() or head_path(audit_path).exists():
        result = verify(audit_path)
        if not result.ok:
            raise NodeStartError(f"audit trail failed its integrity check: {audit_path}: {result.error}")
    if layout.ledger.exists():
        try:
            ledger = PrivacyLedger(
                layout.ledger, budget=site_budget(config, _count_lines(Path(config.data_dir) / "train.jsonl"))
            )
            spent = ledger.spent()
        except Exception as exc:
            raise NodeStartError(f"privacy ledger refused: {exc}") from exc
        if config.epsilon - spent <= SPENT_BELOW * config.epsilon:  # what the ledger refuses to train on
            # Serving never depends on the training budget: the node starts and serves; the ledger
            # refuses each training round (409, audited `train.refused`).
            log.warning(
                "privacy budget spent (epsilon %.3f of %.3f): serving only, training rounds are refused",
                spent,
                config.epsilon,
            )
    return leaf


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise NodeStartError(f"cannot read training data {path}: {exc.strerror}") from exc


# Ports inside the private network namespace of the SuperNode and app guard, where nothing else listens.
INSIDE_SIDECAR_PORT = 9092  # the fleet sidecar, as the SuperNode dials it (a forward to its Unix socket)
INSIDE_RUNTIME_PORT = 9094  # the SuperNode's Runtime API: the guard's and its task processes'
INSIDE_AGENT_PORT = 9095  # the agent's HTTPS API, as the ClientApp calls it (a forward to its Unix socket)


def prepare_sockets(layout: NodeLayout) -> None:
    """The 0700 directory of the Unix sockets between the host and the SuperNode's namespace."""
    try:
        netns.prepare_socket_dir(layout.sockets)
        for path in (layout.fleet_socket, layout.relay_socket, layout.agent_socket, layout.runtime_socket):
            netns.check_socket_path(path)
    except netns.NamespaceError as exc:
        raise NodeStartError(str(exc)) from exc


def _fleet_processes(config: NodeConfig, leaf: pki.LeafFiles) -> list[Managed]:
    """The fleet sidecar (stunnel), on Unix sockets only: neither of its services can tell its caller
    from another local user (the SuperNode presents no client certificate), so only the agent's user
    may open them (`NodeLayout.sockets`, 0700), and the SuperNode reaches them from its namespace."""
    layout = NodeLayout(Path(config.state_dir).absolute())  # paths go to other processes
    sidecar = make_sidecar(
        name="fleet-sidecar",
        config_text=client_config(
            tls=TLSFiles(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl),
            accept=str(layout.fleet_socket),
            relay=str(layout.relay_socket),
            connect=config.coordinator,
            server_name=config.coordinator_name,
        ),
        workdir=layout.sidecar,
        sockets=(layout.fleet_socket, layout.relay_socket),
    )
    return [sidecar, *_supernode_processes(config, leaf)]


def _supernode_processes(config: NodeConfig, leaf: pki.LeafFiles) -> list[Managed]:
    """The SuperNode and its app guard, in one private network namespace under one launcher
    (`federation.ops.netns`); the launcher is the one supervised process.

    With `--isolation process` the SuperNode runs no ClientApp itself and hands tasks only to the
    holder of its SuperExec secret, the guard, which reaches its Runtime API on loopback: so both
    live in the same namespace, where that port is, and nowhere else. One launcher for both (not a
    second process joining later): they always share a namespace, and if either exits the launcher
    stops the other and the agent restarts the pair. Their ways out are forwards to the host's Unix
    sockets: the fleet sidecar's (for the SuperNode) and the agent API's (for the ClientApp)."""
    layout = NodeLayout(Path(config.state_dir).absolute())
    sidecar_port = config.fleet_sidecar_port or INSIDE_SIDECAR_PORT
    runtime_port = config.supernode_port or INSIDE_RUNTIME_PORT
    write_superexec_secret(layout.superexec_secret)
    keys = ensure_auth_keypair(Path(config.pki_dir) / config.name)
    node_config = " ".join(
        f'{key}="{value}"'
        for key, value in {
            "agent-url": f"https://127.0.0.1:{INSIDE_AGENT_PORT}",  # the node certificate names 127.0.0.1
            "agent-token-file": layout.agent_token,
            "agent-ca": leaf.ca_cert,
            "agent-cert": leaf.cert,
            "agent-key": leaf.key,
            "site": config.name,
        }.items()
    )
    supernode = [
        str(Path(sys.executable).parent / "flower-supernode"),
        # TLS to the local sidecar (site certificate), which re-originates mTLS to the gateway
        "--root-certificates",
        str(leaf.ca_cert),
        "--superlink",
        f"127.0.0.1:{sidecar_port}",
        "--auth-supernode-private-key",
        str(keys.private_key),
        "--port",
        str(runtime_port),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(layout.superexec_secret),
        "--node-config",
        node_config,
        "--max-wait-time",
        "3600",
    ]
    guard = guard_process(
        layout,
        runtime_api=f"127.0.0.1:{runtime_port}",
        publishers=pki.party_publishers(Path(config.pki_dir), config.name),
    )
    launcher = Managed(
        name="supernode",
        argv=netns.launcher_argv(
            supernode,
            # up once the Runtime API accepts; the agent's user's way in (`netns.run_inside`)
            [netns.Exposed(layout.runtime_socket, runtime_port)],
            forwards=[
                netns.Forward(sidecar_port, layout.fleet_socket),
                netns.Forward(INSIDE_AGENT_PORT, layout.agent_socket),
            ],
            also=[netns.Command(tuple(guard.argv), log=guard.log_path, env=dict(guard.env or {}))],
        ),
        log_path=layout.supernode_log,
        # PATH: this environment's bin/ first, where Flower looks its commands up by name
        env={
            "FLWR_HOME": str(layout.flwr_home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]),
        },
        sockets=(layout.runtime_socket,),
    )
    return [launcher]


def federation_router(health: Health) -> APIRouter:
    """`/v1/admin/federation`: the supervised fleet processes (the sidecar, the SuperNode and its
    guard). `degraded` while one is down and waiting out its back-off; serving goes on regardless."""
    router = APIRouter(dependencies=[caller("admin")])

    @router.get("/v1/admin/federation", response_model=None)
    def federation() -> dict[str, Any]:
        return health.snapshot()

    return router


def start_api(
    service: NodeService,
    leaf: pki.LeafFiles,
    *,
    host: str,
    port: int,
    poll_seconds: float = 2.0,
    unix_socket: Path | None = None,
    health: Health | None = None,
) -> HTTPSService:
    """The node's HTTPS API: TLS 1.3, consortium client certificates checked against the CRL,
    refusals in the audit trail, certificate and CRL changes picked up without a restart; also on
    `unix_socket`, the same service, for the ClientApp in the SuperNode's namespace."""
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl, poll_interval=poll_seconds)
    app = create_app(service, access=node_access(service))
    if health is not None:
        app.include_router(federation_router(health))
    return HTTPSService.start(
        app,
        tls,
        host=host,
        port=port,
        on_refusal=audit_hook(service.audit.append),
        unix_socket=unix_socket,
    )


def _start_fleet_process(proc: Managed, ready: Path, *, timeout: float) -> None:
    """Start a fleet process and wait for its socket. If it fails, the node still starts, serving
    with federation degraded: `supervise` retries it with its back-off. Except where the namespace
    launcher refused (no namespace may be made here): that fails closed, nothing runs."""
    try:
        proc.start().wait_socket(ready, timeout=timeout)
    except ProcessError as exc:
        if netns.refusal_in(str(exc)):
            raise
        proc.stop()
        log.error("%s failed to start; federation degraded, retried with back-off: %s", proc.name, exc)


def run_node(config: NodeConfig) -> None:
    """Run the agent until SIGTERM/SIGINT; raises NodeStartError on refused start-up."""
    os.umask(PRIVATE_UMASK)  # everything the agent and its children write: its user's alone
    adopt_orphans()  # what a dead child leaves comes back to the agent to be killed and reaped, not to init
    leaf = preflight(config)
    try:  # fail closed before anything starts: the SuperNode runs only in a namespace of its own
        netns.check_available()
    except netns.NamespaceError as exc:
        raise NodeStartError(f"cannot start the SuperNode: {netns.REFUSAL_PREFIX}{exc}") from exc
    service = build_node(config)
    port = config.api_port or free_port()
    layout = service.layout
    prepare_sockets(layout)
    procs = _fleet_processes(config, leaf)  # not started yet: the API is up first
    health = Health([p.name for p in procs])
    try:
        api = start_api(
            service,
            leaf,
            host=config.api_host,
            port=port,
            poll_seconds=config.pki_poll_seconds,
            unix_socket=layout.agent_socket,
            health=health,
        )
    except ServiceStartError as exc:
        raise NodeStartError(str(exc)) from exc
    api_url = api.url
    stopping = threading.Event()
    watcher: FileWatcher | None = None
    push: CheckpointPush | None = None
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        _start_fleet_process(procs[0], layout.fleet_socket, timeout=30)
        _start_fleet_process(procs[1], layout.runtime_socket, timeout=90)
        # A new CRL (or renewed certificate) reaches the fleet sidecar without dropping the tunnel.
        watcher = FileWatcher([leaf.crl, leaf.cert], procs[0].reload, interval=config.pki_poll_seconds).start()
        if config.coordinator_admin:  # the audit log witnessed between rounds too (at most 60 s behind)
            push = CheckpointPush(
                service.audit.latest_checkpoint,
                url=config.coordinator_admin,
                leaf=leaf,
                interval_s=config.checkpoint_push_seconds,
            ).start()
        endpoints = NodeEndpoints(config.name, api_url, str(layout.fleet_socket), os.getpid())

        def health_changed(now: Health) -> None:
            """node.json says which fleet process is down and when it is retried (as the API does)."""
            info = {**endpoints.to_json(), "federation": now.snapshot()}
            write_atomic(service.layout.endpoints, json.dumps(info, indent=2))

        health_changed(health)
        log.info("node %s ready: api %s, fleet sidecar %s", config.name, api_url, endpoints.fleet_sidecar)
        print(f"node {config.name} ready: {api_url}", flush=True)
        # A sidecar or SuperNode that keeps failing is restarted with a back-off, for ever: federation
        # is degraded meanwhile, serving never stops for it.
        supervise(procs, stopping, health=health, on_change=health_changed)
    except ProcessError as exc:
        first, refusal = str(exc).splitlines()[0], netns.refusal_in(str(exc))
        raise NodeStartError(f"{first} {refusal}" if refusal else first) from exc
    finally:
        if watcher is not None:
            watcher.stop()
        if push is not None:
            push.stop()
        stop_all(procs)
        api.stop()
        service.layout.endpoints.unlink(missing_ok=True)
