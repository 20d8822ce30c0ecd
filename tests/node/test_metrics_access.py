"""Who may read a node's `/metrics` at its real HTTPS API (issue 17, monitoring).

Prometheus scrapes over mutual TLS with a `monitor` certificate: a monitor the site's access policy
admits (`g, prom, site-a`) reads `/metrics` with its certificate alone, also where the OpenAI routes
take API keys; it may read nothing else, not even where the policy would let its organisation in.
A monitor the site did not list, and another hospital's node, are refused (and audited). An API key
with the `metrics` scope still works, whatever certificate the client also shows.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.mtls_server import HTTPSService, ServerTLS, audit_hook
from node.access import AccessPolicy
from node.api import create_app
from node.build import node_access
from node.service import NodeService
from tests.node.tiny_service import tiny_service

PARTIES = {"site-a": "node", "site-b": "node", "prom": "monitor", "stranger": "monitor"}


@dataclass
class Site:
    service: NodeService
    pki_dir: Path
    api_key_url: str
    mtls_url: str
    metrics_key: str
    chat_key: str

    def client(self, url: str, party: str | None = None, *, key: str | None = None) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca" / "ca.pem"))
        if party is not None:
            ctx.load_cert_chain(str(self.pki_dir / party / "cert.pem"), str(self.pki_dir / party / "key.pem"))
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=url, verify=ctx, timeout=120, headers=headers)

    def refusals(self) -> list[dict[str, Any]]:
        lines = self.service.layout.audit.read_text().splitlines()
        return [r for r in map(json.loads, filter(None, lines)) if r["action"] == "access.refused"]


@pytest.fixture(scope="module")
def site(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("metrics-access")
    pki_dir = root / "pki"
    pki.init_ca(pki_dir, consortium="fedseek-test")
    for name, role in PARTIES.items():
        pki.issue(pki_dir, name, role=role)  # type: ignore[arg-type]
    service = tiny_service(tiny_model_dir, site_data_dir, root / "state", n_train=8, n_eval=2)
    keyed = node_access(service)
    text = service.layout.access_policy.read_text() + "g, prom, site-a\n"  # the site admits its monitor
    service.layout.access_policy.write_text(text)
    mutual = AccessPolicy(
        site="site-a",
        audit=service.audit,
        api_keys=keyed.api_keys,
        agent_token=service.token,
        policy=keyed.policy,
        openai_auth="mtls",
    )
    leaf = pki.load_leaf(pki_dir, "site-a")
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)
    servers = [
        HTTPSService.start(
            create_app(service, access=access),
            tls,
            host="127.0.0.1",
            port=free_port(),
            on_refusal=audit_hook(service.audit.append),
        )
        for access in (keyed, mutual)
    ]
    digest = hashlib.sha256(text.encode()).hexdigest()
    deadline = time.monotonic() + 30
    while keyed.policy.sha256 != digest:
        assert time.monotonic() < deadline, "the policy edit was not applied"
        time.sleep(0.05)
    metrics_key, _ = keyed.api_keys.issue(scopes=["metrics"])
    chat_key, _ = keyed.api_keys.issue(scopes=["chat"])
    try:
        yield Site(service, pki_dir, servers[0].url, servers[1].url, metrics_key, chat_key)
    finally:
        for server in servers:
            server.stop()
        keyed.policy.close()


@pytest.mark.parametrize("mode", ["api_key", "mtls"])
def test_an_admitted_monitor_reads_metrics_with_its_certificate(site: Site, mode: str) -> None:
    url = site.api_key_url if mode == "api_key" else site.mtls_url
    with site.client(url, "prom") as prom:
        r = prom.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    body = r.text
    for name in (
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "fedseek_epsilon_budget",
        "fedseek_audit_append_failures_total",
        "fedseek_ledger_ok",
    ):
        assert f"\n{name}" in body or body.startswith(name), f"{name} missing from /metrics"


def test_a_monitor_reads_nothing_but_metrics(site: Site) -> None:
    before = len(site.refusals())
    with site.client(site.mtls_url, "prom") as prom:  # its organisation's certificates may chat here
        models = prom.get("/v1/models")
        status = prom.get("/v1/admin/status")
    assert models.status_code == 403, models.text
    assert models.json()["error"]["message"] == "a monitor certificate may read /metrics only"
    assert status.status_code == 403, status.text
    assert [(r["actor"], r["resource"]) for r in site.refusals()[before:]] == [
        ("prom", "/v1/models"),
        ("prom", "/v1/admin/status"),
    ]


@pytest.mark.parametrize("party", ["stranger", "site-b"])
def test_a_monitor_or_node_the_site_did_not_admit_is_refused(site: Site, party: str) -> None:
    before = len(site.refusals())
    with site.client(site.api_key_url, party) as other:
        r = other.get("/metrics")
    assert r.status_code == 403, r.text
    assert "access policy does not allow" in r.json()["error"]["message"]
    assert [(r["actor"], r["resource"]) for r in site.refusals()[before:]] == [(party, "/metrics")]


def test_api_keys_on_metrics(site: Site) -> None:
    with site.client(site.api_key_url, "site-b", key=site.metrics_key) as keyed:  # the key is what it chose
        assert keyed.get("/metrics").status_code == 200
    with site.client(site.api_key_url, key=site.chat_key) as chat_only:
        r = chat_only.get("/metrics")
    assert r.status_code == 403 and "lacks the 'metrics' scope" in r.json()["error"]["message"]
    with site.client(site.api_key_url) as nobody:
        assert nobody.get("/metrics").status_code == 401
