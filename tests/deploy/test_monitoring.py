"""deploy/monitoring/: the alert rules pass `promtool check rules` and their unit test (`promtool test
rules`), which fails when a rule is broken; every panel of the Grafana dashboard is valid PromQL; and
every metric the rules and the dashboard name is one FedSeek exports (the coordinator's and a node's
collectors, read from real PKI files, a real ledger and a real audit trail). The end-to-end check,
a real Prometheus scraping a running consortium, is tests/e2e/test_monitoring.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from coordinator.metrics import CoordinatorCollector, CoordinatorMetrics, site_metrics
from federation.ops.prometheus_config import ScrapeTLS, prometheus_config
from federation.security import pki
from node.metrics import NodeCollector, node_registry
from privacy.audit import AuditError, AuditTrail
from privacy.ledger import Budget, PrivacyLedger

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`: scripts/setup.sh installs it)"
)
SERVING_METRICS = {  # node/metrics.py ServingMetrics (vLLM's names); their export is checked end to end
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
}
NAME_RE = re.compile(r"\b((?:fedseek_|vllm:)[A-Za-z0-9_:]+)")
PROMQL_BUILTIN = {"up"}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_alert_rules_unit_test_passes() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    alerts = {r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without a unit test: {sorted(alerts - tested)}"


@needs_promtool
@pytest.mark.parametrize(
    ("rule", "broken"),
    [
        (
            "fedseek_epsilon_spent / fedseek_epsilon_budget > 0.9",
            "fedseek_epsilon_spent / fedseek_epsilon_budget > 0.99",
        ),
        (
            "fedseek_crl_next_update_timestamp_seconds - time() < 2 * 86400",
            "fedseek_crl_next_update_timestamp_seconds - time() < 0.5 * 86400",
        ),
        (
            "increase(fedseek_audit_append_failures_total[10m]) > 0 or fedseek_audit_refusing == 1",
            "fedseek_audit_refusing == 1",
        ),
        ("fedseek_site_connected == 0", "fedseek_site_connected == 2"),
    ],
)
def test_rule_unit_test_catches_a_broken_rule(tmp_path: Path, rule: str, broken: str) -> None:
    """The unit test is not vacuous: weakening a rule makes it fail."""
    text = (MONITORING / "alerts.yml").read_text()
    assert text.count(rule) == 1
    (tmp_path / "alerts.yml").write_text(text.replace(rule, broken))
    shutil.copy(MONITORING / "alerts_test.yml", tmp_path / "alerts_test.yml")
    out = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert out.returncode != 0, out.stdout


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query as a recording rule's expression (no server needed)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(dashboard_exprs())],
            }
        ]
    }
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The sample names the coordinator's and a node's collectors export, from real files."""
    base = tmp_path_factory.mktemp("exported")
    pki_dir = base / "pki"
    pki.init_ca(pki_dir, consortium="monitoring")
    leaf = pki.issue(pki_dir, "coordinator", role="coordinator")
    pki.issue(pki_dir, "site-a", role="node")
    runs = base / "registry" / "runs"
    runs.mkdir(parents=True)
    round_ = {
        "round": 1,
        "version": "v1",
        "accepted": ["site-a"],
        "rejected": {},
        "not_ready": {},
        "update_bytes": {"site-a": 4096},
        "duration_s": 3.0,
    }
    (runs / "r1.json").write_text(
        json.dumps({"run": "r1", "status": "finished", "rounds_planned": 1, "rounds": [round_]})
    )
    coordinator = CoordinatorMetrics(
        CoordinatorCollector(
            runs_dir=runs,
            superlink_db=base / "none.db",
            leaf=leaf,
            pki_dir=pki_dir,
            registered=lambda: {"site-a": 7},
            allowed=lambda: 1,
        )
    ).render()
    audit = AuditTrail(base / "site-a" / "audit.jsonl")
    ledger = PrivacyLedger(base / "site-a" / "ledger.sqlite", budget=Budget(epsilon=2.0, delta=1e-5), audit=audit)
    node = generate_latest(node_registry(NodeCollector(site="site-a", ledger=ledger, audit=audit, pki_dir=pki_dir)))
    names = {
        s.name for text in (coordinator, node) for f in text_string_to_metric_families(text.decode()) for s in f.samples
    }
    return names | SERVING_METRICS


def test_every_metric_in_rules_and_dashboard_is_exported(exported: set[str]) -> None:
    named = {m for e in alert_exprs() + dashboard_exprs() for m in NAME_RE.findall(e)}
    assert named, "no metric names found"
    missing = sorted(named - exported)
    assert not missing, f"named in deploy/monitoring but exported by no collector: {missing}"


def test_node_collector_reads_ledger_audit_and_pki(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir, consortium="monitoring")
    site = pki.issue(pki_dir, "site-a", role="node")
    audit = AuditTrail(tmp_path / "audit.jsonl")
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite", budget=Budget(epsilon=2.0, delta=1e-5), audit=audit)
    registry = node_registry(NodeCollector(site="site-a", ledger=ledger, audit=audit, pki_dir=pki_dir))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    (partition,) = ledger.partitions()
    key = {"partition": partition.sha256[:12], "label": partition.label}
    assert value("fedseek_epsilon_budget", **key) == 2.0
    assert value("fedseek_epsilon_spent", **key) == 0.0 and value("fedseek_epsilon_remaining", **key) == 2.0
    assert value("fedseek_ledger_ok") == 1.0
    not_after = pki.read_identity(site.cert).not_after.timestamp()
    assert value("fedseek_certificate_expiry_timestamp_seconds", party="site-a", role="node", cert="leaf") == not_after
    assert value("fedseek_crl_next_update_timestamp_seconds", party="site-a") > 0  # type: ignore[operator]
    assert value("fedseek_pki_read_errors") == 0.0
    assert value("fedseek_audit_append_failures_total") == 0.0 and value("fedseek_audit_refusing") == 0.0

    # An insider appends a forged line: the trail's next append finds its chain broken and refuses.
    with (tmp_path / "audit.jsonl").open("a") as log:
        log.write('{"forged": true}\n')
    with pytest.raises(AuditError):
        audit.append(actor="site-a", action="serve")
    assert value("fedseek_audit_append_failures_total") == 1.0 and value("fedseek_audit_refusing") == 1.0

    (pki_dir / "site-a" / "crl.pem").unlink()  # a lost CRL is counted, not silently left out
    assert value("fedseek_pki_read_errors") == 1.0
    assert value("fedseek_crl_next_update_timestamp_seconds", party="site-a") is None


def test_site_metrics_connected_and_dropped() -> None:
    registry = CollectorRegistry(auto_describe=False)

    class Sites(Collector):
        def collect(self) -> Any:
            return site_metrics(
                allowed=3,
                registered={"site-a": 1, "site-b": 2, "site-c": 3},
                states={1: ("online", 1000.0), 2: ("offline", 500.0), 3: ("online", 10.0)},  # site-c's heartbeat lapsed
                now=100.0,
            )

    registry.register(Sites())
    assert registry.get_sample_value("fedseek_site_connected", {"site": "site-a"}) == 1.0
    assert registry.get_sample_value("fedseek_site_connected", {"site": "site-b"}) == 0.0
    assert registry.get_sample_value("fedseek_site_connected", {"site": "site-c"}) == 0.0
    assert registry.get_sample_value("fedseek_sites_connected") == 1.0
    assert registry.get_sample_value("fedseek_sites_dropped") == 2.0
    assert registry.get_sample_value("fedseek_sites_registered") == 3.0


@needs_promtool
def test_generated_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("placeholder\n")  # promtool checks that the files exist, not their contents
    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    text = prometheus_config(
        tls=ScrapeTLS(str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
        consortium="acme",
        coordinator="coord.example.org:9443",
        nodes={"site-a": "site-a.example.org:8443", "site-b": "10.0.0.2:8443"},
    )
    (tmp_path / "prometheus.yml").write_text(text)
    out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    parsed = yaml.safe_load(text)
    coordinator, nodes = parsed["scrape_configs"]
    assert coordinator["tls_config"]["server_name"] == "coordinator.acme.fedseek.internal"
    assert [c["labels"]["site"] for c in nodes["static_configs"]] == ["site-a", "site-b"]


def test_checked_in_prometheus_yml_is_the_generators_output() -> None:
    """deploy/monitoring/prometheus.yml is `prometheus_config` for the paths its header names."""
    text = (MONITORING / "prometheus.yml").read_text()
    expected = prometheus_config(
        tls=ScrapeTLS(
            "/etc/fedseek/pki/prometheus/ca.pem",
            "/etc/fedseek/pki/prometheus/cert.pem",
            "/etc/fedseek/pki/prometheus/key.pem",
        ),
        consortium="fedseek",
        coordinator="coordinator.example.org:9443",
        nodes={"site-a": "site-a.example.org:8443", "site-b": "site-b.example.org:8443"},
    )
    assert text.endswith(expected), "regenerate deploy/monitoring/prometheus.yml (see its header)"
