"""A FedSeek consortium across separate hosts (`tests.multihost.hosts`): a coordinator, a standby and sites.

Every party has a host (a network namespace) and a directory of its own, `<root>/hosts/<host>/`,
holding its state, its config and the part of the PKI it would hold on a real machine: the
coordinator the CA's public files (certificate, CRL, index), its own certificate and the sites'
Flower keys; a site only its own directory. The CA's keys stay in `<root>/ca-office`. Certificates
name the hosts: the coordinator's the service address (`vip`, which fails over with the service),
each site's its own address. The coordinator's fleet gateway and admin API listen on `vip`; sites
dial `vip`; each site's API listens on its own address. The model files are shared read-only, as a
software install would be. Nothing here reaches a party but through its namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.protocol import config as cfg
from federation.security import pki
from federation.security.app_signing import FEDSEEK_APP_DIR, sign_app_dir
from federation.security.site_binding import register_site_key
from node.policy import add_members
from tests.multihost.hosts import Hosts, wait_for

CONSORTIUM = "fedseek-multihost"
FLEET_PORT = 9443
ADMIN_PORT = 9444
API_PORT = 8443
SITES = ("site-a", "site-b", "site-c")
HOSTS = ("coord", "standby", *SITES)
PARTY_ENV = {
    "OMP_NUM_THREADS": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def fedseek(*args: str) -> list[str]:
    return [sys.executable, "-m", "federation.cli.main", *args]


@dataclass
class Consortium:
    net: Hosts
    root: Path
    model_dir: Path
    n_train: int = 48
    n_eval: int = 12
    vip: str = ""
    office: Path = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.vip = self.vip or self.net.service_address(10)
        self.office = self.root / "ca-office" / "pki"

    # ---- where each party keeps its things ---------------------------------------------------------
    def home(self, host: str) -> Path:
        return self.root / "hosts" / host

    def pki(self, host: str) -> Path:
        return self.home(host) / "pki"

    def state(self, host: str) -> Path:
        return self.home(host) / "state"

    def log(self, host: str, what: str) -> Path:
        return self.home(host) / "logs" / f"{what}.log"

    # ---- set-up -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """CA, certificates naming the hosts, each party's share of the PKI, configs, data, the signed app."""
        from fedseek_examples.demo.data import write_site_dataset

        pki.init_ca(self.office, consortium=CONSORTIUM)
        pki.issue(self.office, "coordinator", role="coordinator", hosts=[self.vip])
        pki.issue(self.office, "operator", role="admin")
        for site in SITES:
            pki.issue(self.office, site, role="node", hosts=[self.net.address(site)])
            register_site_key(self.office, site)
        # The coordinator's host (and the standby's, the same service) gets the CA's public files only.
        for host in ("coord", "standby"):
            dest = self.pki(host)
            (dest / "ca").mkdir(parents=True)
            for name in ("ca.pem", "crl.pem", "index.json", "publishers.json"):
                shutil.copy2(self.office / "ca" / name, dest / "ca" / name)
            shutil.copytree(self.office / "coordinator", dest / "coordinator")
            for party in (*SITES, "operator"):  # the others' certificates (public): who may join
                (dest / party).mkdir()
                for name in ("cert.pem", "ca.pem", "crl.pem"):
                    shutil.copy2(self.office / party / name, dest / party / name)
            shutil.copytree(self.office / "site-keys", dest / "site-keys")
            conf = cfg.CoordinatorConfig(
                pki_dir=str(dest),
                state_dir=str(self.state(host)),
                fleet_host=self.vip,
                fleet_port=FLEET_PORT,
                admin_host=self.vip,
                admin_port=ADMIN_PORT,
                site_keys_dir=str(dest / "site-keys"),
                pki_poll_seconds=2.0,
            )
            cfg.save(conf, self.home(host) / "coordinator.json")
        sign_app_dir(
            FEDSEEK_APP_DIR, CoordinatorLayout(self.state("coord")).signed_app, pki.load_publisher_key(self.office)
        )
        for i, site in enumerate(SITES):
            shutil.copytree(self.office / site, self.pki(site) / site)
            write_site_dataset(
                self.home(site) / "data", site_index=i, n_sites=len(SITES), n_train=self.n_train, n_eval=self.n_eval
            )
            node = cfg.NodeConfig(
                name=site,
                model_dir=str(self.model_dir),
                data_dir=str(self.home(site) / "data"),
                state_dir=str(self.state(site)),
                pki_dir=str(self.pki(site)),
                coordinator=f"{self.vip}:{FLEET_PORT}",
                coordinator_name=pki.coordinator_host(CONSORTIUM),  # SNI; the sidecar pins this role name
                api_host=self.net.address(site),
                api_port=API_PORT,
                pki_poll_seconds=2.0,
            )
            cfg.save(node, self.home(site) / "node.json")
            add_members(NodeLayout(self.state(site)).access_policy, site=site, org=site, names=("operator",))

    # ---- parties --------------------------------------------------------------------------------------
    def start_coordinator(self, host: str = "coord") -> dict[str, Any]:
        """`fedseek coordinator start` on `host` (which must hold `vip`); its coordinator.json once ready."""
        endpoints = CoordinatorLayout(self.state(host)).endpoints
        endpoints.unlink(missing_ok=True)
        proc = self.net.run_in(
            host,
            fedseek("coordinator", "start", "--config", str(self.home(host) / "coordinator.json")),
            log=self.log(host, "coordinator"),
            env=PARTY_ENV,
        )
        self.procs[host] = proc
        return self._ready(proc, endpoints, host, timeout=180)

    def start_site(self, site: str) -> subprocess.Popen[bytes]:
        proc = self.net.run_in(
            site,
            fedseek("node", "start", "--config", str(self.home(site) / "node.json")),
            log=self.log(site, "node"),
            env=PARTY_ENV,
        )
        self.procs[site] = proc
        return proc

    def wait_site(self, site: str, *, timeout: float = 420) -> dict[str, Any]:
        return self._ready(self.procs[site], NodeLayout(self.state(site)).endpoints, site, timeout=timeout)

    def _ready(self, proc: subprocess.Popen[bytes], path: Path, host: str, *, timeout: float) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise AssertionError(f"{host} exited {proc.returncode}:\n{self.tail(host)}")
            return json.loads(path.read_text()) if path.exists() else None

        found: dict[str, Any] = wait_for(ready, timeout=timeout, what=f"{host} ready", interval=0.5)
        return found

    def tail(self, host: str, chars: int = 3000) -> str:
        logs = sorted((self.home(host) / "logs").glob("*.log"))
        return "\n".join(f"== {p}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)

    def activated(self, host: str) -> int:
        """SuperNode activations the SuperLink on `host` has logged (each site's connection counts)."""
        log = CoordinatorLayout(self.state(host)).superlink_log
        return log.read_text(errors="replace").count("Activated node_id") if log.exists() else 0

    def pulling(self, host: str, *, since: float = 0.0) -> set[str]:
        """Sites whose SuperNodes the fleet gateway on `host` has answered (200): connected to that coordinator.
        A SuperNode that moves to a new coordinator keeps its session (the registration came with the
        restored SuperLink database), so it shows here rather than as a new activation. `since`: a Unix
        time; earlier requests are not counted."""
        log = CoordinatorLayout(self.state(host)).gateway / "access.log"
        seen: set[str] = set()
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                fresh = datetime.fromisoformat(rec["time"]).timestamp() >= since
                if fresh and rec.get("status") == 200 and "OU=node" in rec.get("subject", ""):
                    seen.add(rec["subject"].rsplit("CN=", 1)[-1])
        return seen

    # ---- runs ------------------------------------------------------------------------------------------
    def submit(self, host: str, run: str, *, rounds: int, min_nodes: int, extra: tuple[str, ...] = ()) -> None:
        """`fedseek run` on the coordinator's host, in the background (its progress: `summary`)."""
        self.procs[f"run-{run}"] = self.net.run_in(
            host,
            fedseek(
                "run",
                "--state",
                str(self.state(host)),
                "--name",
                run,
                "--rounds",
                str(rounds),
                "--min-nodes",
                str(min_nodes),
                *extra,
            ),
            log=self.log(host, f"run-{run}"),
            env=PARTY_ENV,
        )

    def resume(self, host: str, run: str, *, more_rounds: int | None = None) -> None:
        """`fedseek run --resume RUN` on the coordinator's host, in the background."""
        extra = ("--rounds", str(more_rounds)) if more_rounds is not None else ()
        self.procs[f"resume-{run}"] = self.net.run_in(
            host,
            fedseek("run", "--state", str(self.state(host)), "--resume", run, *extra),
            log=self.log(host, f"resume-{run}"),
            env=PARTY_ENV,
        )

    def summary(self, host: str, run: str) -> dict[str, Any] | None:
        path = CoordinatorLayout(self.state(host)).registry / "runs" / f"{run}.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data

    def wait_rounds(self, host: str, run: str, count: int, *, timeout: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            s = self.summary(host, run)
            if s and s.get("status") == "failed":
                raise AssertionError(f"run {run} failed: {s.get('error')}\n{self.tail(host)}")
            return s if s and len([r for r in s.get("rounds", []) if r.get("version")]) >= count else None

        found: dict[str, Any] = wait_for(done, timeout=timeout, what=f"{count} rounds of {run}", interval=0.5)
        return found

    # ---- what the sites recorded -----------------------------------------------------------------------
    def audit(self, site: str) -> list[dict[str, Any]]:
        path = NodeLayout(self.state(site)).audit
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def charged(self, site: str, round: int) -> bool:
        """Whether the site's ledger was charged for `round` (its training started), by its audit trail."""
        return any(r.get("action") == "ledger.charge" and r["details"].get("round") == round for r in self.audit(site))

    def ledger(self, site: str, *, witness: Path | None = None) -> tuple[int, dict[str, Any], str]:
        """`fedseek budget --json` of a site's ledger (against `witness`, a coordinator state, if given)."""
        args = ["budget", "--state", str(self.state(site)), "--json"]
        if witness is not None:
            args += ["--witness", str(witness), "--site", site]
        done = subprocess.run(fedseek(*args), capture_output=True, text=True, timeout=300, env={**os.environ})
        try:
            data: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
        except ValueError:
            data = {}
        return done.returncode, data, done.stdout + done.stderr

    def train_seconds(self, site: str) -> dict[int, float]:
        """Per round (all runs together): seconds from the ledger's charge (training starts) to the `train`
        record (update made) in the site's audit trail. A round charged but never finished is absent."""
        merged: dict[int, float] = {}
        for per_round in _train_seconds_by_run(self.audit(site)).values():
            merged.update(per_round)
        return merged

    @staticmethod
    def train_seconds_by_run(home: Path) -> dict[str, dict[int, float]]:
        """Training seconds per ledger run and round, from the audit trail of the site whose home is `home`."""
        path = NodeLayout(home / "state").audit
        lines = path.read_text().splitlines() if path.exists() else []
        return _train_seconds_by_run([json.loads(line) for line in lines if line.strip()])


def _train_seconds_by_run(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    start: dict[tuple[str, int], float] = {}
    took: dict[str, dict[int, float]] = {}
    for rec in records:
        rnd = (rec.get("details") or {}).get("round")
        if rnd is None:
            continue
        key = (str(rec.get("resource")), int(rnd))
        if rec.get("action") == "ledger.charge":
            start[key] = _ts(rec["ts"])
        elif rec.get("action") == "train" and key in start:
            took.setdefault(key[0], {})[key[1]] = _ts(rec["ts"]) - start[key]
    return took


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def round_walls(summary: dict[str, Any]) -> list[float]:
    """Each round's wall time at the coordinator: its record's `duration_s` (readiness query to the end of
    its evaluation) where the coordinator records it; else from the previous round's end (the first:
    from the ServerApp's start) to its own, by `traffic_by_round`."""
    if summary.get("rounds") and all(r.get("duration_s") is not None for r in summary["rounds"]):
        return [float(r["duration_s"]) for r in summary["rounds"]]
    ends = [float(r["end_s"]) for r in summary.get("traffic_by_round", [])]
    return [end - (ends[i - 1] if i else 0.0) for i, end in enumerate(ends)]


def settle(seconds: float) -> None:
    time.sleep(seconds)
