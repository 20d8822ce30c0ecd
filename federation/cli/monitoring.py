"""`fedseek monitoring prometheus-config`: a prometheus.yml that scrapes the consortium over mutual TLS.

Prometheus presents a `monitor` certificate (`fedseek ca issue NAME --role monitor`), which may read
`/metrics` and nothing else: at the coordinator's admin API, and at each site that admits it in
its access policy (`g, NAME, SITE`). The alert rules and the Grafana dashboard are in
deploy/monitoring/; federation/ops/prometheus_config.py writes the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from federation.errors import InvalidInput
from federation.ops.prometheus_config import ScrapeTLS, prometheus_config
from federation.security import pki


def add_monitoring_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `monitoring` and its subcommands on the root parser's subcommands."""
    mon = sub.add_parser("monitoring", help="Prometheus and Grafana for a consortium").add_subparsers(
        dest="monitoring_command", required=True
    )
    p = mon.add_parser(
        "prometheus-config",
        help="write a prometheus.yml scraping the coordinator and the sites over mutual TLS",
        description="Write a prometheus.yml that scrapes the coordinator's admin API and each site's node API "
        "with a monitor certificate (fedseek ca issue NAME --role monitor). Each site must admit the monitor "
        "in its access policy: a line `g, NAME, SITE`.",
    )
    p.add_argument("--pki", required=True, type=Path, help="PKI directory holding the monitor's certificate")
    p.add_argument("--monitor", required=True, help="the monitor certificate's name (its directory under --pki)")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's admin API")
    p.add_argument(
        "--node", action="append", default=[], metavar="SITE=HOST:PORT", help="a site's node API (repeatable)"
    )
    p.add_argument("--rules", action="append", metavar="FILE", help="alert rule file (repeatable; default: alerts.yml)")
    p.add_argument("--interval", default="15s", help="scrape and rule evaluation interval (default: 15s)")
    p.add_argument("--out", type=Path, help="file to write (default: standard output)")
    p.set_defaults(func=_prometheus_config)


def _target(text: str, what: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInput(f"{what} {text!r} is not HOST:PORT")
    return text


def _prometheus_config(args: argparse.Namespace) -> int:
    party = args.pki / args.monitor
    try:
        ident = pki.read_identity(party / "cert.pem")
        consortium = pki.consortium_of(args.pki / "ca" / "ca.pem")
    except (OSError, pki.PKIError) as exc:
        raise InvalidInput(f"cannot read the monitor certificate {party / 'cert.pem'}: {exc}") from exc
    if ident.role != "monitor":
        raise InvalidInput(
            f"{args.monitor} is a {ident.role} certificate; issue a monitor one: "
            f"fedseek ca issue NAME --role monitor --pki {args.pki}"
        )
    nodes: dict[str, str] = {}
    for item in args.node:
        site, sep, target = item.partition("=")
        if not sep or not site:
            raise InvalidInput(f"--node {item!r} is not SITE=HOST:PORT")
        nodes[site] = _target(target, f"--node {site}")
    text = prometheus_config(
        tls=ScrapeTLS(
            str((party / "ca.pem").absolute()),
            str((party / "cert.pem").absolute()),
            str((party / "key.pem").absolute()),
        ),
        consortium=consortium,
        coordinator=_target(args.coordinator, "--coordinator"),
        nodes=nodes,
        rule_files=args.rules or ["alerts.yml"],
        scrape_interval=args.interval,
    )
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
