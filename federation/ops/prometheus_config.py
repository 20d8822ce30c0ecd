"""A Prometheus configuration that scrapes a FedSeek consortium over mutual TLS.

Prometheus presents a `monitor` certificate of the consortium (`fedseek ca issue NAME --role
monitor`): it may read `/metrics` at the coordinator's admin API and at every node that admits it
(a site's access policy: `g, NAME, SITE`), and nothing else. It checks each server against the
consortium CA; the coordinator is checked under its role name
(`coordinator.<consortium>.fedseek.internal`), which only a coordinator certificate carries, so no
site's certificate can stand in for it. A node is checked under the host name it is scraped at
(its certificate's subjectAltNames). Prometheus does not read CRLs: the servers do, and a revoked
monitor certificate is refused at the handshake.

The text is YAML written by hand (every string JSON-quoted, which YAML reads as is), so this
module needs no YAML library; deploy/monitoring/prometheus.yml is its output for example paths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["COORDINATOR_JOB", "NODE_JOB", "ScrapeTLS", "prometheus_config"]

COORDINATOR_JOB = "fedseek-coordinator"
NODE_JOB = "fedseek-node"


@dataclass(frozen=True)
class ScrapeTLS:
    """The monitor's certificate files (as `fedseek ca issue` lays them out: PKI/NAME/{ca,cert,key}.pem)."""

    ca_file: str
    cert_file: str
    key_file: str


def _q(value: str) -> str:
    return json.dumps(value)


def _tls(tls: ScrapeTLS, server_name: str | None) -> list[str]:
    lines = [
        "    tls_config:",
        f"      ca_file: {_q(tls.ca_file)}",
        f"      cert_file: {_q(tls.cert_file)}",
        f"      key_file: {_q(tls.key_file)}",
        "      min_version: TLS13",  # the parties' servers speak TLS 1.3 only
    ]
    if server_name:
        lines.append(f"      server_name: {_q(server_name)}")
    return lines


def prometheus_config(
    *,
    tls: ScrapeTLS,
    consortium: str,
    coordinator: str,
    nodes: Mapping[str, str],
    rule_files: Sequence[str] = ("alerts.yml",),
    scrape_interval: str = "15s",
    evaluation_interval: str | None = None,
) -> str:
    """prometheus.yml for the coordinator's admin API at `coordinator` (HOST:PORT) and each site's node
    API at `nodes[site]` (HOST:PORT), whose series get the label `site`. (No `party` target label: the
    certificate metrics carry their own `party`, which Prometheus would rename `exported_party`.)"""
    lines = [
        "# FedSeek: Prometheus scraping a consortium over mutual TLS (federation/ops/prometheus_config.py).",
        "global:",
        f"  scrape_interval: {_q(scrape_interval)}",
        f"  evaluation_interval: {_q(evaluation_interval or scrape_interval)}",
        "rule_files:",
        *(f"  - {_q(path)}" for path in rule_files),
        "scrape_configs:",
        f"  - job_name: {_q(COORDINATOR_JOB)}",
        "    scheme: https",
        '    metrics_path: "/metrics"',
        *_tls(tls, f"coordinator.{consortium}.fedseek.internal"),
        "    static_configs:",
        f"      - targets: [{_q(coordinator)}]",
    ]
    if nodes:
        lines += [
            f"  - job_name: {_q(NODE_JOB)}",
            "    scheme: https",
            '    metrics_path: "/metrics"',
            *_tls(tls, None),
            "    static_configs:",
        ]
        for site, target in sorted(nodes.items()):
            lines += [
                f"      - targets: [{_q(target)}]",
                "        labels:",
                f"          site: {_q(site)}",
            ]
    return "\n".join(lines) + "\n"
