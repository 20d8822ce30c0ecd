"""A real node agent for the red-team suite: `fedseek node start` as its own process.

Its HTTPS API is the one a site exposes (federation.security.mtls_server + node.api); its
SuperNode points at a coordinator address where nothing listens, so no federation runs, but
every process and file the agent makes is the real one. The agent's memory is read from its
own /proc entry, so a measurement is of the server, not of the attacking client.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from federation.ops.layout import NodeLayout
from federation.ops.supervise import free_port
from federation.protocol import config as cfg
from node.policy import add_members

START_TIMEOUT_S = 180.0


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    key: str
    layout: NodeLayout
    pki_dir: Path
    log: Path

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS for the agent process")

    def tls(self, party: str | None = None) -> ssl.SSLContext:
        """A client context trusting the consortium CA, presenting `party`'s certificate if given."""
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca" / "ca.pem"))
        if party is not None:
            ctx.load_cert_chain(str(self.pki_dir / party / "cert.pem"), str(self.pki_dir / party / "key.pem"))
        return ctx

    def client(self, party: str | None = None, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.tls(party), timeout=60, **kwargs)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.layout.audit.read_text().splitlines() if line.strip()]

    def audit_of(self, resource: str) -> list[dict[str, Any]]:
        """The records about `resource` (a run id, a route), in order. Not "the last records": the
        agent's app guard is its own process and appends `app_guard.started` whenever it is up, which
        on a slow machine is after the test's first requests (CI saw it land after a refusal)."""
        return [a for a in self.audit() if a["resource"] == resource]

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return int(self.proc.returncode)


@contextmanager
def node_agent(root: Path, *, pki_dir: Path, model_dir: Path, data_dir: Path, name: str = "site-a") -> Iterator[Agent]:
    """`fedseek node start` for `name` with its state in `root/state`; stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = cfg.NodeConfig(
        name=name,
        model_dir=str(model_dir),
        data_dir=str(data_dir),
        state_dir=str(root / "state"),
        pki_dir=str(pki_dir),
        coordinator=f"127.0.0.1:{free_port()}",  # nobody there: the agent alone is under test
        api_port=port,
        pki_poll_seconds=1.0,
    )
    path = cfg.save(conf, root / "node.json")
    # The consortium's test reviewer is one of this site's own (node/policy.py: deny by default).
    add_members(NodeLayout(root / "state").access_policy, site=name, org=name, names=("reviewer",))
    log = root / "agent.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    layout = NodeLayout(root / "state")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not layout.endpoints.exists():
            assert proc.poll() is None, f"fedseek node start exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"node not ready in {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        url = str(json.loads(layout.endpoints.read_text())["openai"])
        yield Agent(proc, url, port, layout.api_key.read_text().strip(), layout, pki_dir, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
