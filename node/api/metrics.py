"""`/metrics` (Prometheus text format): the serving engine's metrics, and at a node agent the site's
own (node.metrics.NodeCollector: privacy budget, audit failures, certificate and CRL expiry).

Its own rule (node/access.py, `metrics`): an API key with the `metrics` scope, or, when no key is
sent, a consortium certificate the site's access policy allows on `metrics` (a `monitor`
certificate: Prometheus scraping over mutual TLS, deploy/monitoring/).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest

from node.api.deps import caller, serving_of
from node.metrics import CONTENT_TYPE

router = APIRouter(dependencies=[caller("metrics")])

SITE_METRICS_STATE = "site_metrics"
"""The app state key of the site's own registry (`node.metrics.node_registry`); absent for `fedseek serve`."""


@router.get("/metrics")
def metrics(request: Request) -> Response:
    body = serving_of(request).metrics.render()
    site: CollectorRegistry | None = getattr(request.app.state, SITE_METRICS_STATE, None)
    if site is not None:
        body += generate_latest(site)  # other names than the engine's (fedseek_*): one valid exposition
    return Response(body, media_type=CONTENT_TYPE)
