"""What a node behind a vLLM server counts of the requests it forwards (`fedseek_upstream_*`).

vLLM exports its own engine metrics (`vllm:*`: running and waiting requests, KV-cache use, token
latencies) on its `/metrics`; the site scrapes that directly. The node adds what only it knows:
requests per model id the node serves (version ids, not vLLM's names) and status, their end-to-end
and first-chunk latency seen from the node, tokens from vLLM's usage, whether vLLM answered the last
call, and how many adapter versions it holds. Its own registry, so several nodes live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["UpstreamMetrics"]

_E2E = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)
_FIRST = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class UpstreamMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        model = ["model"]
        self.requests = Counter(
            "fedseek_upstream_requests",
            "Requests forwarded to vLLM, by model and HTTP status.",
            [*model, "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fedseek_upstream_request_seconds",
            "Forwarded requests, end to end, seen from the node.",
            model,
            buckets=_E2E,
            registry=r,
        )
        self.first_chunk = Histogram(
            "fedseek_upstream_first_chunk_seconds",
            "Streamed requests: time to vLLM's first chunk.",
            model,
            buckets=_FIRST,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "fedseek_upstream_prompt_tokens", "Prompt tokens (vLLM's usage).", model, registry=r
        )
        self.generation_tokens = Counter(
            "fedseek_upstream_generation_tokens", "Generated tokens (vLLM's usage).", model, registry=r
        )
        self.up = Gauge("fedseek_upstream_up", "1 when the last call reached vLLM, 0 when it could not.", registry=r)
        self.adapters = Gauge(
            "fedseek_upstream_adapters_loaded", "Adapter versions the node has loaded into vLLM.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
