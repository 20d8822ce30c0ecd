"""The audit log's signed checkpoint, pushed to the coordinator between rounds.

Rounds carry the site's latest checkpoint to its witness (`node.witness_statements`), but a site
may serve for days with no round. So the agent also POSTs the checkpoint beside its audit log
(`privacy.checkpoints`, signed each second while records arrive) to the coordinator's admin API,
`POST /v1/witness/audit-checkpoint`, every `checkpoint_push_seconds` (at most 60) when it changed
since the last one the coordinator accepted: records are witnessed off the site within about a
minute. The connection is mutual TLS with the site's node certificate, and the server must be this
consortium's coordinator: its certificate must carry the coordinator's role name (sent as SNI and
checked as the host name, as the fleet sidecar checks it) and the `coordinator` role, and must not
be on the CRL. A failure (coordinator down, a refusal) is logged and retried with a back-off of at
most 60 s; it never touches serving or the log.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

import httpx

from federation.errors import FedSeekError
from federation.protocol.config import ConfigError
from federation.security import pki
from federation.security.peer_pin import pinned_client_context

__all__ = ["CHECKPOINT_ROUTE", "MAX_INTERVAL_S", "CheckpointPush", "PushError", "admin_url", "check_interval"]

log = logging.getLogger("fedseek.node.checkpoint_push")

CHECKPOINT_ROUTE = "/v1/witness/audit-checkpoint"  # coordinator.admin_api.CHECKPOINT_ROUTE (no import across)
MAX_INTERVAL_S = 60.0  # the bound: witnessed at least every 60 s while there are new records


class PushError(FedSeekError):
    """A push that did not land: the coordinator unreachable, or its refusal (one line)."""


def check_interval(seconds: float) -> float:
    """`checkpoint_push_seconds`, or ConfigError unless 0 < seconds <= 60."""
    if not 0 < seconds <= MAX_INTERVAL_S:
        raise ConfigError(f"checkpoint_push_seconds must be above 0 and at most {MAX_INTERVAL_S:g}, not {seconds:g}")
    return float(seconds)


def admin_url(address: str) -> str:
    """`https://host:port` for a config's `coordinator_admin` ("host:port", or the URL `coordinator.json` shows)."""
    address = address.strip().rstrip("/")
    if address.startswith("https://"):
        return address
    if "://" in address or not address:
        raise ConfigError(f"coordinator_admin must be host:port of the coordinator's admin API, not {address!r}")
    return f"https://{address}"


def client_context(leaf: pki.LeafFiles) -> ssl.SSLContext:
    """TLS 1.3 with the site's certificate; only a coordinator of this consortium, not revoked, answers."""
    ctx = pinned_client_context(ca_cert=leaf.ca_cert, role="coordinator", cert=leaf.cert, key=leaf.key)
    if leaf.crl is not None and leaf.crl.exists():
        ctx.load_verify_locations(cafile=str(leaf.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


class CheckpointPush:
    """Pushes `latest()` (the audit log's latest signed checkpoint) to the coordinator's admin API."""

    def __init__(
        self,
        latest: Callable[[], dict[str, Any] | None],
        *,
        url: str,
        leaf: pki.LeafFiles,
        interval_s: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._latest = latest
        self.url = admin_url(url)
        self._leaf = leaf
        self.interval_s = check_interval(interval_s)
        self._timeout = timeout_s
        self._role_name = pki.coordinator_host(pki.consortium_of(leaf.ca_cert))
        self._accepted: dict[str, Any] | None = None  # the last checkpoint the coordinator took
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0  # in a row; the back-off grows with it

    def push_once(self) -> bool:
        """Push the latest checkpoint if it changed since the last accepted: True if one was taken now,
        False if there was nothing new; PushError if it did not land."""
        statement = self._latest()
        if statement is None or statement == self._accepted:
            return False
        body = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
        try:
            # A fresh context each push: the CRL and a renewed certificate are read as they are now.
            with httpx.Client(verify=client_context(self._leaf), timeout=self._timeout) as http:
                response = http.post(
                    self.url + CHECKPOINT_ROUTE,
                    content=body,
                    headers={"content-type": "application/json"},
                    extensions={"sni_hostname": self._role_name},  # checked as the host name too
                )
        except (httpx.HTTPError, ssl.SSLError, OSError, FedSeekError) as exc:
            raise PushError(f"audit checkpoint not pushed to {self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise PushError(f"audit checkpoint refused by {self.url}: {response.status_code} {_reason(response)}")
        self._accepted = statement
        return True

    def delay(self) -> float:
        """Seconds until the next try: the interval, doubled per failure in a row, at most 60 s."""
        return min(self.interval_s * 2 ** min(self.failures, 6), MAX_INTERVAL_S)

    def _run(self) -> None:
        wait = min(1.0, self.interval_s)  # at start at once: a log restored while the node was down shows now
        while not self._stop.wait(wait):
            try:
                if self.push_once() and self.failures:
                    log.info("audit checkpoint pushed to %s again after %d failures", self.url, self.failures)
                self.failures = 0
            except PushError as exc:
                self.failures += 1
                log.warning("%s (try %d; next in %.0f s)", exc.one_line(), self.failures, self.delay())
            except Exception:  # never let the pusher die: serving goes on, the next tick retries
                self.failures += 1
                log.exception("audit checkpoint push failed")
            wait = self.delay()

    def start(self) -> CheckpointPush:
        self._thread = threading.Thread(target=self._run, name="audit-checkpoint-push", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout + 5)


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
