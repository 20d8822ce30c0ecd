"""`fedseek node start`: the site's agent daemon.

Start-up order is chosen so that a bad input is refused before anything is touched:
certificate (must chain to the consortium CA), audit trail and ledger (integrity), privacy
budget (must have room left), data, model. Then the HTTPS API, the mTLS fleet sidecar and
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

from federation.errors import FedSeekError
from federation.ops.atomic import PRIVATE_UMASK, write_atomic
from federation.ops.filewatch import FileWatcher
from federation.ops.layout import NodeLayout
from federation.ops.supervise import Managed, ProcessError, free_port, stop_all, supervise
from federation.protocol.config import NodeConfig
from federation.security import pki
from federation.security.app_signing import load_publishers
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.mtls_server import HTTPSService, ServerTLS, ServiceStartError, audit_hook
from federation.security.sidecar import TLSFiles, client_config, make_sidecar
from node.api import create_app
from node.app_guard.launch import guard_process, write_superexec_secret
from node.build import NodeStartError, build_node, node_access, site_budget
from node.service import NodeService
from privacy.audit import head_path, verify
from privacy.ledger import PrivacyLedger

log = logging.getLogger("fedseek.node")


# A remainder below this share of the budget is too small to train on: treat it as spent.
MIN_ROUND_FRACTION = 0.01


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
    try:  # the app guard runs no ClientApp without it
        load_publishers(pki.party_publishers(Path(config.pki_dir), config.name))
    except FedSeekError as exc:
        raise NodeStartError(f"app publisher check failed: {exc.one_line()}") from exc
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
        if config.epsilon - spent < MIN_ROUND_FRACTION * config.epsilon:
            raise NodeStartError(
                f"privacy budget exhausted: epsilon {spent:.3f} of {config.epsilon:.3f} spent; "
                "this site cannot train again"
            )
    return leaf


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise NodeStartError(f"cannot read training data {path}: {exc.strerror}") from exc


def _fleet_processes(config: NodeConfig, leaf: pki.LeafFiles, api_url: str) -> tuple[list[Managed], int]:
    layout = NodeLayout(Path(config.state_dir))
    sidecar_port = config.fleet_sidecar_port or free_port()
    sidecar = make_sidecar(
        name="fleet-sidecar",
        config_text=client_config(
            tls=TLSFiles(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl),
            accept=f"127.0.0.1:{sidecar_port}",
            relay=f"127.0.0.1:{free_port()}",
            connect=config.coordinator,
            server_name=config.coordinator_name,
        ),
        workdir=layout.sidecar,
    )
    return [sidecar, *_supernode_processes(config, leaf, api_url, superlink=f"127.0.0.1:{sidecar_port}")], sidecar_port


def _supernode_processes(config: NodeConfig, leaf: pki.LeafFiles, api_url: str, *, superlink: str) -> list[Managed]:
    """The SuperNode and its app guard, launched together: with `--isolation process` the SuperNode runs
    no ClientApp itself and hands tasks only to the holder of its SuperExec secret, the guard, which
    reaches its Runtime API on loopback (so wherever the SuperNode's network goes, the guard's must too)."""
    layout = NodeLayout(Path(config.state_dir))
    runtime_port = config.supernode_port or free_port()
    write_superexec_secret(layout.superexec_secret)
    keys = ensure_auth_keypair(Path(config.pki_dir) / config.name)
    node_config = " ".join(
        f'{key}="{value}"'
        for key, value in {
            "agent-url": api_url,
            "agent-token-file": layout.agent_token,
            "agent-ca": leaf.ca_cert,
            "agent-cert": leaf.cert,
            "agent-key": leaf.key,
            "site": config.name,
        }.items()
    )
    supernode = Managed(
        name="supernode",
        argv=[
            str(Path(sys.executable).parent / "flower-supernode"),
            # TLS to the local sidecar (site certificate), which re-originates mTLS to the gateway
            "--root-certificates",
            str(leaf.ca_cert),
            "--superlink",
            superlink,
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
        ],
        log_path=layout.supernode_log,
        # PATH: this environment's bin/ first, where Flower looks its commands up by name
        env={
            "FLWR_HOME": str(layout.flwr_home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]),
        },
    )
    guard = guard_process(
        layout,
        runtime_api=f"127.0.0.1:{runtime_port}",
        publishers=pki.party_publishers(Path(config.pki_dir), config.name),
    )
    return [supernode, guard]


def start_api(
    service: NodeService, leaf: pki.LeafFiles, *, host: str, port: int, poll_seconds: float = 2.0
) -> HTTPSService:
    """The node's HTTPS API: TLS 1.3, consortium client certificates checked against the CRL,
    refusals in the audit trail, certificate and CRL changes picked up without a restart."""
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl, poll_interval=poll_seconds)
    return HTTPSService.start(
        create_app(service, access=node_access(service)),
        tls,
        host=host,
        port=port,
        on_refusal=audit_hook(service.audit.append),
    )


def run_node(config: NodeConfig) -> None:
    """Run the agent until SIGTERM/SIGINT; raises NodeStartError on refused start-up."""
    os.umask(PRIVATE_UMASK)  # everything the agent and its children write: its user's alone
    leaf = preflight(config)
    service = build_node(config)
    port = config.api_port or free_port()
    try:
        api = start_api(service, leaf, host=config.api_host, port=port, poll_seconds=config.pki_poll_seconds)
    except ServiceStartError as exc:
        raise NodeStartError(str(exc)) from exc
    api_url = api.url
    procs, sidecar_port = _fleet_processes(config, leaf, api_url)
    stopping = threading.Event()
    watcher: FileWatcher | None = None
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        procs[0].start().wait_port("127.0.0.1", sidecar_port, timeout=30)
        for proc in procs[1:]:
            proc.start()
        # A new CRL (or renewed certificate) reaches the fleet sidecar without dropping the tunnel.
        watcher = FileWatcher([leaf.crl, leaf.cert], procs[0].reload, interval=config.pki_poll_seconds).start()
        endpoints = NodeEndpoints(config.name, api_url, f"127.0.0.1:{sidecar_port}", os.getpid())
        write_atomic(service.layout.endpoints, json.dumps(endpoints.to_json(), indent=2))
        log.info("node %s ready: api %s, fleet sidecar %s", config.name, api_url, endpoints.fleet_sidecar)
        print(f"node {config.name} ready: {api_url}", flush=True)
        supervise(procs, stopping)
    except ProcessError as exc:
        raise NodeStartError(str(exc).splitlines()[0]) from exc
    finally:
        if watcher is not None:
            watcher.stop()
        stop_all(procs)
        api.stop()
        service.layout.endpoints.unlink(missing_ok=True)
