"""Serving through an engine the site runs (vLLM) instead of the node's own: see node/upstream/vllm.py.

`open_backend` makes what `NodeConfig.serving_backend` names (None: the node's own engine); the routes
that forward to it are node/api/upstream.py.
"""

from node.upstream.metrics import UpstreamMetrics
from node.upstream.relay import Outcome, SseRelay
from node.upstream.vllm import (
    BACKENDS,
    LoraSync,
    UpstreamError,
    UpstreamUnavailable,
    VllmBackend,
    VllmClient,
    VllmSettings,
    open_backend,
)

__all__ = [
    "BACKENDS",
    "LoraSync",
    "Outcome",
    "SseRelay",
    "UpstreamError",
    "UpstreamMetrics",
    "UpstreamUnavailable",
    "VllmBackend",
    "VllmClient",
    "VllmSettings",
    "open_backend",
]
