"""A node's Prometheus metrics: the serving engine's, under vLLM's names so existing vLLM dashboards
work, and the site's own (`NodeCollector`): privacy budget per data partition, audit trail
failures, certificate and CRL expiry.

Each `Serving` has its own registry (several nodes may live in one test process). Running and
waiting counts and KV-cache use are read from the engine at scrape time; latencies are observed
per request. The site's metrics are read from the ledger, the audit trail and the PKI files at
scrape time too (`NodeCollector`), so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from federation.security.expiry_metrics import pki_expiry_metrics
from federation.security.pki.layout import CRL_FILE, LEAF_CA, LEAF_CERT
from node.serving import Completion, Engine, Event
from privacy.audit import AuditTrail
from privacy.ledger import LedgerError, PrivacyLedger

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class ServingMetrics:
    def __init__(self, engine: Engine, *, model_name: str, max_lora: int) -> None:
        self.engine = engine
        self.max_lora = max_lora
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def stat(key: str) -> Any:
            return lambda: engine.stats()[key]

        running = Gauge("vllm:num_requests_running", "Requests in the running batch.", labels, registry=r)
        running.labels(model_name).set_function(stat("running"))
        waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", labels, registry=r)
        waiting.labels(model_name).set_function(stat("waiting"))
        capacity = max(1, engine.runner.max_slots * engine.runner.max_len)
        kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage: 1 is every slot's every position.", labels, registry=r)
        kv.labels(model_name).set_function(lambda: engine.kv_tokens() / capacity)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY, registry=r
        ).labels(model_name)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between two output tokens.", labels, buckets=_LATENCY, registry=r
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, queue included.", labels, buckets=_E2E, registry=r
        ).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r).labels(
            model_name
        )
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r).labels(
            model_name
        )
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests (value: scrape time).",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self._lock = threading.Lock()
        self._running: collections.Counter[str] = collections.Counter()
        self._waiting: collections.Counter[str] = collections.Counter()

    def request(self, adapter: str | None) -> RequestTrack:
        return RequestTrack(self, adapter)

    def completed(self, out: Completion) -> None:
        """A request run by `Engine.complete` (no per-token timing)."""
        self.ttft.observe(out.ttft_s)
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generation_tokens.inc(out.completion_tokens)

    def _move(self, adapter: str | None, source: str | None, target: str | None) -> None:
        if adapter is None:
            return
        with self._lock:
            for name, counter in (("waiting", self._waiting), ("running", self._running)):
                if name == source:
                    counter[adapter] -= 1
                    if counter[adapter] <= 0:
                        del counter[adapter]
                if name == target:
                    counter[adapter] += 1

    def render(self) -> bytes:
        with self._lock:
            running, waiting = ",".join(sorted(self._running)), ",".join(sorted(self._waiting))
        self.lora_info.clear()
        self.lora_info.labels(running, waiting, str(self.max_lora)).set(time.time())
        return generate_latest(self.registry)


class RequestTrack:
    """One request's timings: queued at creation, running from its first token."""

    def __init__(self, metrics: ServingMetrics, adapter: str | None) -> None:
        self.metrics = metrics
        self.adapter = adapter
        self.started = time.perf_counter()
        self.admitted = False
        self._last_token: float | None = None
        self._state: str | None = "waiting"
        metrics._move(adapter, None, "waiting")

    def event(self, ev: Event) -> None:
        now = time.perf_counter()
        self.admitted = True
        if self._state == "waiting":
            self.metrics._move(self.adapter, "waiting", "running")
            self._state = "running"
            self.metrics.prompt_tokens.inc(ev.prompt_tokens)
        for _ in ev.token_ids:
            if self._last_token is None:
                self.metrics.ttft.observe(now - self.started)
            else:
                self.metrics.itl.observe(now - self._last_token)
            self._last_token = now
        self.metrics.generation_tokens.inc(len(ev.token_ids))

    def done(self, admitted: bool) -> None:
        self.admitted = admitted
        self.metrics._move(self.adapter, self._state, None)
        self._state = None
        if self.admitted:
            self.metrics.e2e.observe(self.elapsed())

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class NodeCollector(Collector):
    """The site's own metrics, read at scrape time: what an operator alerts on.

    - `fedseek_epsilon_spent` / `fedseek_epsilon_remaining` / `fedseek_epsilon_budget`, per data
      partition (`partition`: its sha256's first 12 hex digits, `label`: its file name), from the
      ledger (`PrivacyLedger.partitions`); `fedseek_ledger_ok` 0 when it cannot be read or disagrees
      with the audit trail (the node then serves but never trains);
    - `fedseek_audit_append_failures_total` and `fedseek_audit_refusing` (the trail refuses every
      append after a failed one, and the node refuses what it cannot audit);
    - certificate and CRL expiry (federation.security.expiry_metrics).
    """

    def __init__(
        self,
        *,
        site: str,
        ledger: PrivacyLedger,
        audit: AuditTrail,
        pki_dir: Path,
        ledger_refusal: str | None = None,
    ) -> None:
        self.site = site
        self.ledger = ledger
        self.audit = audit
        self.party_dir = pki_dir / site
        self.ledger_refusal = ledger_refusal

    def collect(self) -> Iterator[Metric]:
        yield from self._budget()
        failures = CounterMetricFamily(
            "fedseek_audit_append_failures", "Audit records this node could not write (since it started)."
        )
        failures.add_metric([], self.audit.append_failures)
        yield failures
        yield GaugeMetricFamily(
            "fedseek_audit_refusing",
            "1 while the audit trail refuses appends after a failure (reopen it after checking).",
            value=1.0 if self.audit.refusing else 0.0,
        )
        yield from pki_expiry_metrics(
            party=self.site,
            role="node",
            cert=self.party_dir / LEAF_CERT,
            ca_cert=self.party_dir / LEAF_CA,
            crl=self.party_dir / CRL_FILE,
        )

    def _budget(self) -> Iterator[Metric]:
        labels = ["partition", "label"]
        spent = GaugeMetricFamily("fedseek_epsilon_spent", "Epsilon spent on a data partition.", labels=labels)
        left = GaugeMetricFamily("fedseek_epsilon_remaining", "Epsilon left to a data partition.", labels=labels)
        budget = GaugeMetricFamily("fedseek_epsilon_budget", "A data partition's epsilon budget.", labels=labels)
        rounds = GaugeMetricFamily("fedseek_partition_rounds", "DP rounds that sampled a partition.", labels=labels)
        ok = self.ledger_refusal is None
        try:
            for account in self.ledger.partitions():
                key = [account.sha256[:12], account.label]
                spent.add_metric(key, account.epsilon)
                left.add_metric(key, account.remaining)
                budget.add_metric(key, account.budget_epsilon)
                rounds.add_metric(key, account.rounds)
        except LedgerError:  # a damaged ledger: no account is trustworthy, and training is refused
            ok = False
        yield from (spent, left, budget, rounds)
        yield GaugeMetricFamily(
            "fedseek_ledger_ok", "0 when the privacy ledger is unreadable or disagrees with the audit trail.", value=ok
        )


def node_registry(collector: NodeCollector) -> CollectorRegistry:
    """A registry of the site's own metrics, served beside the engine's at `/metrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
