"""Monitoring end to end (issue 17): a real Prometheus (Debian's package) scrapes a running consortium,
a coordinator (`fedseek coordinator start`) and two sites (`fedseek node start`), over mutual TLS
with a `monitor` certificate, with FedSeek's alert rules loaded (deploy/monitoring/alerts.yml).

It sees every target up; after one round (`fedseek run`) the coordinator's round, update and site
metrics and each node's privacy budget, audit and certificate metrics hold what the run did; every
metric the alert rules and the Grafana dashboard name is among those Prometheus scraped; no alert
fires on the healthy consortium; a node certificate cannot read the coordinator's metrics, nor the
monitor any other admin route. Then site-b stops: its target goes down and the coordinator reports
it dropped.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fedseek_examples.demo.data import write_site_dataset

from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.prometheus_config import COORDINATOR_JOB, NODE_JOB, ScrapeTLS, prometheus_config
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from federation.security import pki
from node.policy import add_members
from tests.e2e.fleet import start_coordinator, stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b")
MONITOR = "prom"
MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
PROMETHEUS = shutil.which("prometheus")
NAME_RE = re.compile(r"\b((?:fedseek_|vllm:)[A-Za-z0-9_:]+)")


def until(check: Callable[[], Any], what: str, timeout: float, *, detail: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f}s; {detail()}")
        time.sleep(0.5)


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=30)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def targets(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/targets")["activeTargets"])

    def query(self, expr: str) -> dict[str, float]:
        """Instant query: each series' labels (as JSON, sorted) -> value."""
        out = {}
        for row in self.get("/api/v1/query", query=expr)["result"]:
            labels = {k: v for k, v in row["metric"].items() if k != "__name__"}
            out[json.dumps(labels, sort_keys=True)] = float(row["value"][1])
        return out

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {json.loads(k).get(label, ""): v for k, v in self.query(expr).items()}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`: scripts/setup.sh installs it)")
    base = tmp_path_factory.mktemp("monitoring")
    pki_dir, state = signed_consortium(base, SITES)
    pki.issue(pki_dir, MONITOR, role="monitor")
    fleet_port = free_port()
    procs: list[Managed] = []
    try:
        coordinator, info = start_coordinator(
            base, ["--pki", str(pki_dir), "--state", str(state), "--fleet-port", str(fleet_port)]
        )
        procs.append(coordinator)
        nodes: dict[str, Managed] = {}
        for i, site in enumerate(SITES):
            data = base / site / "data"
            write_site_dataset(data, site_index=i, n_sites=2, n_train=48, n_eval=8)
            layout = NodeLayout(base / site / "state")
            add_members(layout.access_policy, site=site, org=site, names=(MONITOR,))  # the site admits the monitor
            config = cfg.save(
                cfg.NodeConfig(
                    name=site,
                    model_dir=str(tiny_model_dir),
                    data_dir=str(data),
                    state_dir=str(layout.root),
                    pki_dir=str(pki_dir),
                    coordinator=f"127.0.0.1:{fleet_port}",
                    api_port=free_port(),
                ),
                base / site / "node.json",
            )
            nodes[site] = Managed(
                name=site,
                argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(config)],
                log_path=base / site / "agent.log",
            ).start()
            procs.append(nodes[site])
        apis = {}
        for site in SITES:
            endpoints = wait_json(NodeLayout(base / site / "state").endpoints, nodes[site], timeout=300)
            apis[site] = str(endpoints["openai"]).removeprefix("https://").rstrip("/")
        assert wait_activated(info, 2, timeout=180), CoordinatorLayout(state).superlink_log.read_text()[-3000:]

        monitor = pki_dir / MONITOR
        text = prometheus_config(
            tls=ScrapeTLS(str(monitor / "ca.pem"), str(monitor / "cert.pem"), str(monitor / "key.pem")),
            consortium="fedseek-redteam",
            coordinator=str(info["admin"]).removeprefix("https://").rstrip("/"),
            nodes=apis,
            rule_files=[str(MONITORING / "alerts.yml")],
            scrape_interval="1s",
        )
        (base / "prometheus.yml").write_text(text)
        port = free_port()
        prometheus = Managed(
            name="prometheus",
            argv=[
                PROMETHEUS,
                f"--config.file={base / 'prometheus.yml'}",
                f"--storage.tsdb.path={base / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.console.templates=/nonexistent",
                "--web.console.libraries=/nonexistent",
            ],
            log_path=base / "prometheus.log",
        ).start()
        procs.append(prometheus)
        prometheus.wait_port("127.0.0.1", port, timeout=60)
        yield {
            "base": base,
            "state": state,
            "pki": pki_dir,
            "info": info,
            "nodes": nodes,
            "apis": apis,
            "prom": Prom(f"http://127.0.0.1:{port}"),
            "prometheus": prometheus,
        }
    finally:
        stop(procs)


def _fedseek(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv], capture_output=True, text=True, timeout=timeout
    )


def _health(prom: Prom) -> dict[str, str]:
    return {f"{t['labels']['job']}/{t['labels'].get('site', '')}": t["health"] for t in prom.targets()}


def _errors(prom: Prom, env: dict[str, Any]) -> Callable[[], str]:
    def detail() -> str:
        errors = {t["scrapeUrl"]: t["lastError"] for t in prom.targets() if t["lastError"]}
        log = env["prometheus"].log_path.read_text()[-1500:]
        return f"targets {_health(prom)}, errors {errors}; prometheus log: {log}"

    return detail


@pytest.fixture(scope="module")
def after_round(consortium: dict[str, Any]) -> dict[str, Any]:
    """Every target up over mutual TLS, then one round run (`fedseek run`)."""
    prom: Prom = consortium["prom"]
    wanted = {f"{COORDINATOR_JOB}/", *(f"{NODE_JOB}/{s}" for s in SITES)}
    until(
        lambda: _health(prom) == dict.fromkeys(wanted, "up"),
        "every target up",
        180,
        detail=_errors(prom, consortium),
    )
    argv = ["run", "--state", str(consortium["state"]), "--rounds", "1", "--min-nodes", "2", "--name", "watched"]
    out = _fedseek(*argv, "--timeout", "600")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return consortium


def test_prometheus_scrapes_every_party_over_mutual_tls(after_round: dict[str, Any]) -> None:
    prom: Prom = after_round["prom"]
    targets = prom.targets()
    assert {t["health"] for t in targets} == {"up"} and len(targets) == 1 + len(SITES)
    assert {t["scrapeUrl"].split("://")[0] for t in targets} == {"https"}
    assert prom.by('up{job=~"fedseek-.*"}', "site") == {"": 1.0, "site-a": 1.0, "site-b": 1.0}


def test_the_round_is_seen_at_the_coordinator(after_round: dict[str, Any]) -> None:
    prom: Prom = after_round["prom"]
    summary = json.loads((CoordinatorLayout(after_round["state"]).registry / "runs" / "watched.json").read_text())
    (rec,) = summary["rounds"]
    until(lambda: prom.by('fedseek_rounds_total{run="watched"}', "run") == {"watched": 1.0}, "the round counted", 60)
    assert prom.by('fedseek_rounds_failed_total{run="watched"}', "run") == {"watched": 0.0}
    assert prom.by('fedseek_updates_accepted_total{run="watched"}', "run") == {"watched": 2.0}
    assert prom.by('fedseek_updates_rejected_total{run="watched"}', "run") == {"watched": 0.0}
    assert prom.by('fedseek_round_duration_seconds_count{run="watched"}', "run") == {"watched": 1.0}
    duration = prom.by('fedseek_round_duration_seconds_sum{run="watched"}', "run")["watched"]
    assert duration == pytest.approx(rec["duration_s"]) and duration > 0
    sizes = prom.by('fedseek_update_bytes_sum{run="watched"}', "run")["watched"]
    assert sizes == sum(rec["update_bytes"].values()) > 0
    assert prom.by('fedseek_run_info{run="watched"}', "status") == {"finished": 1.0}
    assert prom.by("fedseek_site_connected", "site") == {"site-a": 1.0, "site-b": 1.0}
    assert prom.by("fedseek_sites_connected", "job") == {COORDINATOR_JOB: 2.0}
    assert prom.by("fedseek_sites_registered", "job") == {COORDINATOR_JOB: 2.0}


def test_budget_audit_and_certificates_are_seen_at_each_site(after_round: dict[str, Any]) -> None:
    prom: Prom = after_round["prom"]

    def charged() -> dict[str, float] | None:
        got = prom.by("fedseek_epsilon_spent", "site")
        return got if set(got) == set(SITES) and min(got.values()) > 0 else None

    spent = until(charged, "epsilon spent at both sites", 60)
    left = prom.by("fedseek_epsilon_remaining", "site")
    budget = prom.by("fedseek_epsilon_budget", "site")
    for site in SITES:
        assert spent[site] + left[site] == pytest.approx(budget[site])
    assert prom.by("fedseek_audit_append_failures_total", "site") == dict.fromkeys(SITES, 0.0)
    assert prom.by("fedseek_ledger_ok", "site") == dict.fromkeys(SITES, 1.0)
    expiry = prom.query('fedseek_certificate_expiry_timestamp_seconds{cert="leaf"} - time()')
    parties = {json.loads(k)["party"]: v for k, v in expiry.items()}
    assert set(parties) == {"coordinator", *SITES} and min(parties.values()) > 0
    for party in ("coordinator", *SITES):
        not_after = pki.read_identity(after_round["pki"] / party / "cert.pem").not_after.timestamp()
        got = prom.by(f'fedseek_certificate_expiry_timestamp_seconds{{cert="leaf",party="{party}"}}', "party")
        assert got == {party: not_after}
    assert min(prom.by("fedseek_crl_next_update_timestamp_seconds - time()", "party").values()) > 0
    assert len(prom.by("fedseek_crl_next_update_timestamp_seconds", "party")) == 1 + len(SITES)
    by_ca = prom.by("fedseek_party_certificate_expiry_timestamp_seconds", "party")
    assert set(by_ca) == {"coordinator", MONITOR, *SITES}
    assert prom.by("vllm:kv_cache_usage_perc", "site") == dict.fromkeys(SITES, 0.0)  # nothing served now


def test_every_metric_in_rules_and_dashboard_is_scraped(after_round: dict[str, Any]) -> None:
    prom: Prom = after_round["prom"]
    scraped = set(prom.get("/api/v1/label/__name__/values"))
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    named = {m for e in exprs for m in NAME_RE.findall(e)}
    assert not sorted(named - scraped), f"named but never scraped: {sorted(named - scraped)}"
    # No metric label collides with a target label (Prometheus would rename it `exported_...`).
    series = prom.get("/api/v1/series", **{"match[]": '{__name__=~"fedseek_.+|vllm:.+"}'})
    assert series and not {k for s in series for k in s if k.startswith("exported_")}


def test_the_rules_load_and_nothing_fires_on_a_healthy_consortium(after_round: dict[str, Any]) -> None:
    prom: Prom = after_round["prom"]
    groups = prom.get("/api/v1/rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    expected = {
        r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]
    }
    assert loaded == expected
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    firing = [a for a in prom.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def test_only_a_monitor_or_admin_reads_the_coordinators_metrics(after_round: dict[str, Any]) -> None:
    pki_dir: Path = after_round["pki"]
    url = str(after_round["info"]["admin"]).rstrip("/")

    def client(party: str) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
        ctx.load_cert_chain(str(pki_dir / party / "cert.pem"), str(pki_dir / party / "key.pem"))
        ctx.check_hostname = False  # the admin URL is an address; the chain is still verified
        return httpx.Client(base_url=url, verify=ctx, timeout=60)

    with client(MONITOR) as prom:
        assert prom.get("/metrics").status_code == 200
        assert prom.get("/v1/admin/sites").status_code == 403  # a monitor reads metrics, nothing else
    with client("site-a") as node:
        refused = node.get("/metrics")
    assert refused.status_code == 403, refused.text


def test_a_stopped_site_is_down_and_dropped(after_round: dict[str, Any]) -> None:
    prom: Prom = after_round["prom"]
    after_round["nodes"]["site-b"].stop(timeout=60)
    until(lambda: prom.by('up{job="fedseek-node"}', "site") == {"site-a": 1.0, "site-b": 0.0}, "site-b down", 60)
    until(
        lambda: prom.by("fedseek_site_connected", "site") == {"site-a": 1.0, "site-b": 0.0},
        "the coordinator sees site-b gone",
        240,
        detail=lambda: str(prom.by("fedseek_site_connected", "site")),
    )
    assert prom.by("fedseek_sites_dropped", "job") == {COORDINATOR_JOB: 1.0}
    assert prom.by("fedseek_sites_connected", "job") == {COORDINATOR_JOB: 1.0}
