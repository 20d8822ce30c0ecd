"""Prometheus gauges for when a party's certificates and CRL run out, read from its files at scrape time.

Both the coordinator's and a node's `/metrics` export them (coordinator/metrics.py, node/metrics.py),
so one alert rule covers every party: `fedseek_certificate_expiry_timestamp_seconds - time()` and
`fedseek_crl_next_update_timestamp_seconds - time()` (deploy/monitoring/alerts.yml). The files are
read at every scrape, never cached: a renewed certificate or a refreshed CRL shows at the next one.
A file that cannot be read is left out of the scrape and counted in `fedseek_pki_read_errors`,
whose alert says so (an absent series would fire no threshold alert).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from federation.security import pki
from federation.security.pki.pem import load_cert

log = logging.getLogger("fedseek.metrics")

CERT_EXPIRY = "fedseek_certificate_expiry_timestamp_seconds"
CRL_NEXT_UPDATE = "fedseek_crl_next_update_timestamp_seconds"
READ_ERRORS = "fedseek_pki_read_errors"


def pki_expiry_metrics(*, party: str, role: str, cert: Path, ca_cert: Path, crl: Path | None) -> Iterator[Metric]:
    """The expiry of the party's own certificate and of its CA's, and its CRL's next update (Unix time)."""
    certs = GaugeMetricFamily(
        CERT_EXPIRY, "When a certificate this party uses expires (Unix time).", labels=["party", "role", "cert"]
    )
    crls = GaugeMetricFamily(
        CRL_NEXT_UPDATE, "When this party's copy of the consortium CRL goes stale (Unix time).", labels=["party"]
    )
    errors = 0
    for which, path, who in (("leaf", cert, role), ("ca", ca_cert, "ca")):
        try:
            certs.add_metric([party, who, which], load_cert(path).not_valid_after_utc.timestamp())
        except (OSError, ValueError, pki.PKIError) as exc:
            errors += 1
            log.warning("metrics: cannot read certificate %s: %s", path, exc)
    try:
        if crl is None:  # a party without a CRL checks no revocation: worth an alert, not silence
            raise pki.PKIError("no CRL configured")
        next_update = pki.load_crl(crl).next_update_utc
        if next_update is not None:
            crls.add_metric([party], next_update.timestamp())
        else:
            errors += 1  # a CRL without nextUpdate is never fresh for fedseek (pki.crl.check_crl)
    except (OSError, ValueError, pki.PKIError) as exc:
        errors += 1
        log.warning("metrics: cannot read CRL %s: %s", crl, exc)
    yield certs
    yield crls
    yield GaugeMetricFamily(
        READ_ERRORS, "Certificate or CRL files this party could not read at this scrape.", value=errors
    )
