"""HTTPS for the parties' HTTP APIs (uvicorn) with consortium client certificates.

Why not uvicorn's own `ssl=`: asyncio drops a failed handshake with a debug-level log only,
yet every refused peer must leave a log line and an audit record; and a revoked certificate
must lose its open connections within a minute without restarting the server. So the TLS
handshake runs inside the connection protocol (`loop.start_tls`), with a context rebuilt
whenever the certificate, key, CA or CRL change on disk (renewal without downtime), and a
watcher closes live connections whose certificate appears on a new CRL.

Routes read the verified peer from `request.state.tls_peer` (a `pki.Identity`, or None when
the client sent no certificate and the server allows that) and decide by role.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol

from federation.errors import Unavailable
from federation.ops.filewatch import FileWatcher, stamp
from federation.security import pki

log = logging.getLogger("fedseek.mtls")

PEER_STATE_KEY = "tls_peer"

# Longer than the idle expiry of common HTTP clients (httpx, hence `openai`: 5 s), so the client
# always drops an idle connection first. With equal timeouts a client can reuse a connection at
# the moment the server closes it, and the request fails with a read error (seen under load).
KEEP_ALIVE_S = 30


@dataclass(frozen=True)
class ServerTLS:
    """Files and policy of one HTTPS endpoint.

    `require_client_cert=False` lets clients without a certificate finish the handshake (an
    application using an API key); a certificate that is presented must still verify.
    """

    cert: Path
    key: Path
    ca_cert: Path
    crl: Path | None = None
    require_client_cert: bool = False
    handshake_timeout: float = 10.0
    poll_interval: float = 2.0


@dataclass(frozen=True)
class Refusal:
    """A connection or request the endpoint turned away, for the log and the audit trail."""

    peer: str
    reason: str
    subject: str | None = None  # the certificate's name, when one was verified


RefusalHook = Callable[[Refusal], None]


def audit_hook(append: Callable[..., object], **details: str) -> RefusalHook:
    """A refusal hook writing `tls.refused` records through an audit trail's `append`."""

    def record(refusal: Refusal) -> None:
        append(
            actor=refusal.subject or refusal.peer,
            action="tls.refused",
            details={"peer": refusal.peer, "reason": refusal.reason, **details},
        )

    return record


def revoked_serials(crl_path: Path | None) -> frozenset[int]:
    """Serials on the CRL; an unreadable CRL yields none here (the TLS context then refuses all)."""
    if crl_path is None or not crl_path.exists():
        return frozenset()
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except (OSError, ValueError):
        return frozenset()
    return frozenset(r.serial_number for r in crl)


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    """TLS 1.3 only; client certificates verified against the CA and, if present, the CRL."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.load_verify_locations(cafile=str(tls.ca_cert))
    if tls.crl is not None and tls.crl.exists():
        ctx.load_verify_locations(cafile=str(tls.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class TLSGate:
    """Owns the endpoint's TLS state: current context, revoked serials, live connections."""

    def __init__(self, tls: ServerTLS, *, on_refusal: RefusalHook | None = None) -> None:
        self.tls = tls
        self._on_refusal = on_refusal
        self._lock = threading.Lock()
        self._stamps: tuple[tuple[float, int], ...] = ()
        self._context: ssl.SSLContext | None = None
        self._revoked: frozenset[int] = frozenset()
        self._live: dict[_GatedH11, tuple[asyncio.AbstractEventLoop, int]] = {}
        self.refresh()  # a broken certificate or key fails here, at start-up
        files = (tls.cert, tls.key, tls.ca_cert, tls.crl)
        self._watcher = FileWatcher(files, self.refresh, interval=tls.poll_interval)

    # ---- state that follows the files on disk ----------------------------------------------
    def refresh(self) -> bool:
        """Reload if any file changed; returns whether it did. Keeps the old context on error."""
        files = (self.tls.cert, self.tls.key, self.tls.ca_cert, self.tls.crl)
        stamps = tuple(stamp(p) for p in files)
        with self._lock:
            if stamps == self._stamps and self._context is not None:
                return False
            try:
                context = server_context(self.tls)
            except (OSError, ssl.SSLError) as exc:
                if self._context is None:
                    raise
                log.error("TLS files changed but do not load (%s); keeping the previous ones", exc)
                return False
            self._context, self._stamps = context, stamps
            self._revoked = revoked_serials(self.tls.crl)
        self._close_revoked()
        return True

    def context(self) -> ssl.SSLContext:
        self.refresh()
        assert self._context is not None
        return self._context

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked

    def refuse(self, refusal: Refusal) -> None:
        log.warning(
            "refused %s%s: %s", refusal.peer, f" ({refusal.subject})" if refusal.subject else "", refusal.reason
        )
        if self._on_refusal is not None:
            try:
                self._on_refusal(refusal)
            except Exception:  # an audit failure must not take the server down; it is logged
                log.exception("recording a refusal failed")

    # ---- live connections ----------------------------------------------------------------
    def _track(self, proto: _GatedH11, serial: int) -> None:
        with self._lock:
            self._live[proto] = (asyncio.get_running_loop(), serial)

    def _untrack(self, proto: _GatedH11) -> None:
        with self._lock:
            self._live.pop(proto, None)

    def _close_revoked(self) -> None:
        with self._lock:
            doomed = [(p, loop) for p, (loop, serial) in self._live.items() if serial in self._revoked]
        for proto, loop in doomed:
            loop.call_soon_threadsafe(proto.close_revoked)

    def live_connections(self) -> int:
        with self._lock:
            return len(self._live)

    # ---- watcher ---------------------------------------------------------------------------
    def start(self) -> TLSGate:
        """Poll the files so revocation and renewal apply without any new connection."""
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._watcher.stop()

    def protocol_class(self) -> type[asyncio.Protocol]:
        """The uvicorn `http=` protocol class bound to this gate (uvicorn must get no `ssl_*`)."""
        return type("GatedH11", (_GatedH11,), {"gate": self})

    def server(self, app: Any, *, host: str, port: int, log_level: str = "warning") -> uvicorn.Server:
        """A uvicorn server whose every connection passes this gate.

        The asyncio loop, not uvloop: uvloop's server-side `start_tls` never finished the
        handshake here (the client saw EOF after the handshake timeout).
        """
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=self.protocol_class(),
            loop="asyncio",
            log_level=log_level,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
        return uvicorn.Server(config)


class _GatedH11(asyncio.Protocol):
    """TLS handshake first (refusals logged and reported), then uvicorn's HTTP/1.1 protocol."""

    gate: TLSGate

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        self._inner = H11Protocol(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        self._app_state = app_state
        self._tls: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None
        self._peer = "?"
        self._subject: str | None = None
        self._early: list[bytes] = []  # application data that arrives before start_tls returns
        self._early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        self._raw = transport
        transport.pause_reading()  # the ClientHello must reach start_tls, not this protocol
        addr = transport.get_extra_info("peername")
        self._peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self._handshake_task = asyncio.ensure_future(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                self,
                self.gate.context(),
                server_side=True,
                ssl_handshake_timeout=self.gate.tls.handshake_timeout,
            )
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as exc:
            self.gate.refuse(Refusal(peer=self._peer, reason=_handshake_reason(exc)))
            transport.abort()
            return
        if tls is None:  # the peer went away mid-handshake
            return
        self._tls = tls
        identity = None
        der = tls.get_extra_info("ssl_object").getpeercert(binary_form=True)
        if der:
            try:
                identity = pki.identity_from_der(der)
            except pki.PKIError as exc:
                self.gate.refuse(Refusal(peer=self._peer, reason=str(exc)))
                tls.abort()
                return
            self._subject = identity.name
            if self.gate.is_revoked(identity.serial):  # the CRL changed since this context was built
                self.gate.refuse(Refusal(peer=self._peer, reason="certificate revoked", subject=identity.name))
                tls.abort()
                return
            self.gate._track(self, identity.serial)
        self._inner.app_state = {**self._app_state, PEER_STATE_KEY: identity}
        self._inner.connection_made(tls)
        for chunk in self._early:
            self._inner.data_received(chunk)
        self._early.clear()
        if self._early_eof:
            self._inner.eof_received()

    def close_revoked(self) -> None:
        if self._tls is not None and not self._tls.is_closing():
            self.gate.refuse(
                Refusal(peer=self._peer, reason="certificate revoked; open connection closed", subject=self._subject)
            )
            self._tls.abort()

    # ---- forwarding to uvicorn's protocol --------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._tls is not None:
            self._inner.data_received(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._tls is not None:
            self._inner.eof_received()
        else:
            self._early_eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate._untrack(self)
        if self._tls is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._tls is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._tls is not None:
            self._inner.resume_writing()


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL"):
            return f"not a TLS 1.3 client ({reason}); plaintext is refused"
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "no client certificate"
        return f"TLS handshake failed: {reason}"
    if isinstance(exc, asyncio.TimeoutError):
        return "TLS handshake timed out"
    return f"connection failed during the TLS handshake: {exc}"


def peer_of(request: Any) -> pki.Identity | None:
    """The verified client certificate's identity for a Starlette request, if any."""
    return getattr(request.state, PEER_STATE_KEY, None)


class ServiceStartError(Unavailable):
    """The HTTPS service did not come up (port taken, bad certificate)."""


@dataclass
class HTTPSService:
    """An ASGI app behind a TLSGate, served by uvicorn in a daemon thread."""

    server: uvicorn.Server
    thread: threading.Thread
    gate: TLSGate
    url: str

    @classmethod
    def start(
        cls, app: Any, tls: ServerTLS, *, host: str, port: int, on_refusal: RefusalHook | None, timeout: float = 30.0
    ) -> HTTPSService:
        gate = TLSGate(tls, on_refusal=on_refusal).start()
        server = gate.server(app, host=host, port=port)
        thread = threading.Thread(target=server.run, name=f"https-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                gate.stop()
                raise ServiceStartError(f"HTTPS service failed to start on {host}:{port}")
            time.sleep(0.05)
        return cls(server=server, thread=thread, gate=gate, url=f"https://{host}:{port}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.gate.stop()
