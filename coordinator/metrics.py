"""The coordinator's Prometheus metrics, read at scrape time from what the coordinator already keeps.

The rounds are run by the ServerApp, a process the SuperLink starts in its own network namespace
for each run; it writes the run's summary (`<registry>/runs/<run>.json`, coordinator/server_app.py)
after every round. The collector reads those summaries at each scrape, so the coordinator
process needs no channel from the ServerApp, a metric survives a coordinator restart (the
summaries are the record), and a crashed ServerApp leaves its last rounds counted. Per run:

- `fedseek_rounds_total` (rounds that made a global adapter), `fedseek_rounds_failed_total`;
- `fedseek_round_duration_seconds` (histogram over the run's finished rounds: readiness query
  to the end of evaluation, `RoundRecord.duration_s`);
- `fedseek_updates_accepted_total`, `fedseek_updates_rejected_total`,
  `fedseek_sites_not_ready_total` (left out of a round before it started, and why is in the summary);
- `fedseek_update_bytes` (histogram: the array bytes of each accepted update);
- `fedseek_run_info{run,status}` (1), `fedseek_run_rounds_planned`.

Sites, from the CA's records and the SuperLink's own database (read-only, as
`coordinator.sites.known_node` reads it): `fedseek_sites_allowed` (a valid node certificate),
`fedseek_sites_registered`, `fedseek_site_connected{site}` (1 while the SuperLink counts its
SuperNode online), `fedseek_sites_connected`, `fedseek_sites_dropped` (registered, seen, now offline).
Certificates: the coordinator's own and its CRL (federation.security.expiry_metrics), and every
party's current certificate in the CA's records (`fedseek_party_certificate_expiry_timestamp_seconds`),
so one alert watches every site's certificate from the coordinator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from federation.security import pki
from federation.security.expiry_metrics import pki_expiry_metrics

log = logging.getLogger("fedseek.coordinator.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
BYTES_BUCKETS = tuple(float(4**k * 1024) for k in range(11))  # 1 KiB to 1 GiB, x4
"""An adapter update is tens of KiB (a tiny model) to hundreds of MiB (a large model's LoRA)."""


def _observe(family: HistogramMetricFamily, run: str, values: Sequence[float], buckets: Sequence[float]) -> None:
    """Add run `run`'s histogram of `values` (cumulative bucket counts, as Prometheus wants them)."""
    counts = [(str(b), float(sum(1 for v in values if v <= b))) for b in buckets]
    family.add_metric([run], [*counts, ("+Inf", float(len(values)))], sum_value=float(sum(values)))


def read_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run summary (`runs/*.json`) that parses; an unreadable one is logged and skipped."""
    out: list[dict[str, Any]] = []
    for path in sorted(runs_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("metrics: unreadable run summary %s: %s", path, exc)
            continue
        if isinstance(data, dict):
            out.append(data)
    return out


def run_metrics(summaries: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    """The per-run round metrics of the run summaries the ServerApp writes."""
    labels = ["run"]
    made = CounterMetricFamily("fedseek_rounds", "Rounds that made a global adapter.", labels=labels)
    failed = CounterMetricFamily("fedseek_rounds_failed", "Rounds that made no global adapter.", labels=labels)
    accepted = CounterMetricFamily("fedseek_updates_accepted", "Site updates aggregated.", labels=labels)
    rejected = CounterMetricFamily("fedseek_updates_rejected", "Site updates refused or missing.", labels=labels)
    not_ready = CounterMetricFamily(
        "fedseek_sites_not_ready", "Sites left out of a round before it started (not ready, gone).", labels=labels
    )
    info = GaugeMetricFamily(
        "fedseek_run_info", "A run and its status (running, finished, failed).", labels=["run", "status"]
    )
    planned = GaugeMetricFamily("fedseek_run_rounds_planned", "Rounds a run is to make.", labels=labels)
    durations_h = HistogramMetricFamily(
        "fedseek_round_duration_seconds", "Round duration, readiness query to the end of evaluation.", labels=labels
    )
    bytes_h = HistogramMetricFamily("fedseek_update_bytes", "Array bytes of each accepted site update.", labels=labels)
    for summary in summaries:
        run = str(summary.get("run", ""))
        rounds = [r for r in summary.get("rounds", []) if isinstance(r, dict)]
        status = str(summary.get("status", "unknown"))
        made.add_metric([run], sum(1 for r in rounds if r.get("version")))
        # A round without a version that is not the one running now failed (a running run's last is in flight).
        settled = rounds if status != "running" else [r for r in rounds if r.get("duration_s") is not None]
        failed.add_metric([run], sum(1 for r in settled if not r.get("version")))
        accepted.add_metric([run], sum(len(r.get("accepted", [])) for r in rounds))
        rejected.add_metric([run], sum(len(r.get("rejected", {})) for r in rounds))
        not_ready.add_metric([run], sum(len(r.get("not_ready", {})) for r in rounds))
        info.add_metric([run, status], 1)
        planned.add_metric([run], float(summary.get("rounds_planned", 0) or 0))
        durations = [float(r["duration_s"]) for r in rounds if isinstance(r.get("duration_s"), int | float)]
        sizes = [float(b) for r in rounds for b in dict(r.get("update_bytes", {})).values()]
        _observe(durations_h, run, durations, DURATION_BUCKETS)
        _observe(bytes_h, run, sizes, BYTES_BUCKETS)
    yield from (made, failed, accepted, rejected, not_ready, info, planned, durations_h, bytes_h)


def node_states(superlink_db: Path) -> dict[int, tuple[str, float]]:
    """The SuperLink's SuperNodes: node id (unsigned, as the coordinator registered it) -> (status,
    online until, Unix time). Read-only; {} while the database is missing or unreadable."""
    if not superlink_db.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"{superlink_db.absolute().as_uri()}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT node_id, status, online_until FROM node").fetchall()
    except sqlite3.Error as exc:
        log.warning("metrics: cannot read %s: %s", superlink_db, exc)
        return {}
    out: dict[int, tuple[str, float]] = {}
    for node_id, status, until in rows:
        if node_id is None:
            continue
        try:
            online_until = float(until) if until is not None else 0.0
        except (TypeError, ValueError):
            online_until = 0.0
        out[int(node_id) % 2**64] = (str(status), online_until)
    return out


def site_metrics(
    *, allowed: int, registered: Mapping[str, int], states: Mapping[int, tuple[str, float]], now: float
) -> Iterator[Metric]:
    """Connected and dropped sites: a registered site is connected while the SuperLink has its SuperNode
    online (status `online` and within its heartbeat's `online_until`); dropped once it was seen and is not."""
    connected = GaugeMetricFamily(
        "fedseek_site_connected", "1 while a registered site's SuperNode is connected.", labels=["site"]
    )
    up = dropped = 0
    for site, node_id in sorted(registered.items()):
        status, until = states.get(node_id, ("registered", 0.0))
        online = status == "online" and until > now
        up += online
        dropped += not online and status in ("online", "offline")  # seen before, gone now
        connected.add_metric([site], 1.0 if online else 0.0)
    yield connected
    yield GaugeMetricFamily("fedseek_sites_allowed", "Sites with a valid node certificate.", value=allowed)
    yield GaugeMetricFamily("fedseek_sites_registered", "Sites registered with the SuperLink.", value=len(registered))
    yield GaugeMetricFamily("fedseek_sites_connected", "Registered sites connected now.", value=up)
    yield GaugeMetricFamily("fedseek_sites_dropped", "Registered sites seen before and offline now.", value=dropped)


def party_certificates(pki_dir: Path) -> Iterator[Metric]:
    """Every current party certificate's expiry, from the CA's records (public files only)."""
    family = GaugeMetricFamily(
        "fedseek_party_certificate_expiry_timestamp_seconds",
        "When a party's current certificate expires (Unix time); revoked ones are left out.",
        labels=["party", "role"],
    )
    try:
        for ident, status in pki.list_status(pki_dir):
            if status != "revoked":
                family.add_metric([ident.name, ident.role], ident.not_after.timestamp())
    except (OSError, ValueError, pki.PKIError) as exc:
        log.warning("metrics: cannot list the certificates in %s: %s", pki_dir, exc)
    yield family


class CoordinatorCollector(Collector):
    """All of the coordinator's metrics (see the module's docstring), collected at scrape time."""

    def __init__(
        self,
        *,
        runs_dir: Path,
        superlink_db: Path,
        leaf: pki.LeafFiles,
        pki_dir: Path,
        registered: Callable[[], Mapping[str, int]],
        allowed: Callable[[], int],
    ) -> None:
        self.runs_dir = runs_dir
        self.superlink_db = superlink_db
        self.leaf = leaf
        self.pki_dir = pki_dir
        self.registered = registered
        self.allowed = allowed

    def collect(self) -> Iterator[Metric]:
        yield from run_metrics(read_runs(self.runs_dir))
        try:
            allowed = self.allowed()
        except (OSError, ValueError, pki.PKIError) as exc:
            log.warning("metrics: cannot read which sites are allowed: %s", exc)
            allowed = 0
        yield from site_metrics(
            allowed=allowed, registered=dict(self.registered()), states=node_states(self.superlink_db), now=time.time()
        )
        yield from pki_expiry_metrics(
            party=self.leaf.name, role="coordinator", cert=self.leaf.cert, ca_cert=self.leaf.ca_cert, crl=self.leaf.crl
        )
        yield from party_certificates(self.pki_dir)


class CoordinatorMetrics:
    """The registry behind the admin API's `/metrics`."""

    def __init__(self, collector: CoordinatorCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
