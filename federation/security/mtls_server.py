"""HTTPS for the parties' HTTP APIs (uvicorn) with consortium client certificates.

Why not uvicorn's own `ssl=`: asyncio drops a failed handshake with a debug-level log only,
yet every refused peer must leave a log line and an audit record; and a revoked certificate
must lose its open connections within a minute without restarting the server. So the TLS
handshake runs inside the connection protocol (`loop.start_tls`), with a context rebuilt
whenever the certificate, key, CA or CRL change on disk (renewal without downtime), and a
watcher closes live connections whose certificate appears on a new CRL.

Routes read the verified peer from `request.state.tls_peer` (a `pki.Identity`, or None when
the client sent no certificate and the server allows that) and decide by role.

Every connection is on a clock (`ServerTLS`): the handshake must finish within
`handshake_timeout`, and the request head (status line and headers) must be complete within
`header_timeout` of the handshake or of the first byte of a later request, else the connection
is closed; an idle keep-alive connection is closed after `keep_alive_timeout`. uvicorn alone
times out neither a connection that never sends a request nor one that trickles its headers,
so a few hundred such clients would hold the server's sockets forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import h11
import uvicorn
from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol

from federation.errors import Unavailable
from federation.ops.filewatch import FileWatcher, stamp
from federation.security import pki
from federation.security.refusal_window import WINDOW_S, RefusalWindow

log = logging.getLogger("fedseek.mtls")

PEER_STATE_KEY = "tls_peer"

# Longer than the idle expiry of common HTTP clients (httpx, hence `openai`: 5 s), so the client
# always drops an idle connection first. With equal timeouts a client can reuse a connection at
# the moment the server closes it, and the request fails with a read error (seen under load).
KEEP_ALIVE_S = 30
HEADER_TIMEOUT_S = 10.0
"""How long a client may take to send a complete request head (nginx's client_header_timeout is 60 s;
FedSeek's clients send theirs in one write)."""
SSL_SHUTDOWN_TIMEOUT_S = 5.0
"""How long a closing TLS connection waits for the peer's close_notify before it is dropped."""


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
    header_timeout: float = HEADER_TIMEOUT_S
    keep_alive_timeout: int = KEEP_ALIVE_S
    poll_interval: float = 2.0
    refusal_window_s: float = WINDOW_S


@dataclass(frozen=True)
class Refusal:
    """A connection or request the endpoint turned away, for the log and the audit trail."""

    peer: str
    reason: str
    subject: str | None = None  # the certificate's name, when one was verified


RefusalHook = Callable[[Refusal], None]


def peer_host(peer: str) -> str:
    """The address part of "host:port": a flood comes from one host over many ports."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def audit_hook(append: Callable[..., object], *, window_s: float = WINDOW_S, **details: str) -> RefusalWindow[Refusal]:
    """A refusal hook writing `tls.refused` records through an audit trail's `append`, at most
    one per (peer host, reason) and window plus the window's count (federation.security.refusal_window).

    Each record's `details.count` says how many refusals it stands for; its log line is the only
    one for them. Call `close()` at shutdown (HTTPSService.stop does) to write pending counts.
    """

    def record(refusal: Refusal, count: int, summary: dict[str, object] | None) -> None:
        who = f" ({refusal.subject})" if refusal.subject else ""
        if summary is None:
            log.warning("refused %s%s: %s", refusal.peer, who, refusal.reason)
        else:
            log.warning("refused %s%s %d more times in %gs: %s", refusal.peer, who, count, window_s, refusal.reason)
        append(
            actor=refusal.subject or refusal.peer,
            action="tls.refused",
            details={"peer": refusal.peer, "reason": refusal.reason, "count": count, **(summary or {}), **details},
        )

    return RefusalWindow(record, lambda r: (peer_host(r.peer), r.subject, r.reason), window_s=window_s)


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
        self._consortium = ""  # the CA's O: a peer of another organisation is refused (refresh sets it)
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
                consortium = pki.consortium_of(self.tls.ca_cert)
            except (OSError, ssl.SSLError, pki.PKIError) as exc:
                if self._context is None:
                    raise
                log.error("TLS files changed but do not load (%s); keeping the previous ones", exc)
                return False
            self._context, self._stamps, self._consortium = context, stamps, consortium
            self._revoked = revoked_serials(self.tls.crl)
        self._close_revoked()
        return True

    def context(self) -> ssl.SSLContext:
        self.refresh()
        assert self._context is not None
        return self._context

    @property
    def consortium(self) -> str:
        return self._consortium

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked

    def refuse(self, refusal: Refusal) -> None:
        # An aggregating hook (audit_hook) writes the log line with its record; a plain hook gets one per refusal.
        level = logging.WARNING if not isinstance(self._on_refusal, RefusalWindow) else logging.DEBUG
        log.log(
            level, "refused %s%s: %s", refusal.peer, f" ({refusal.subject})" if refusal.subject else "", refusal.reason
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
        if isinstance(self._on_refusal, RefusalWindow):
            self._on_refusal.close()  # counts still open in their window reach the audit trail

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
            timeout_keep_alive=self.tls.keep_alive_timeout,
        )
        return uvicorn.Server(config)


class TimedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on the request head, and a lingering close.

    The clock starts when the connection is made (for the gated protocol: when the TLS handshake
    has finished) and again at the first byte of each later request; it stops when h11 has parsed
    a whole request head. Body, response and idle keep-alive are uvicorn's business.

    A connection closed while the client is still sending a body (its request refused before the
    body was read, or cut off past the size limit, both answered `Connection: close`) lingers
    first (`_Lingering`): what still arrives is read and dropped for `LINGER_S`, then it closes.
    Closing a socket with unread data makes the kernel reset the connection, and the reset can
    destroy the answer before the client has read it; nginx's lingering_close does the same.
    """

    header_timeout: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._lingering = _Lingering(transport, self)
        super().connection_made(cast(asyncio.Transport, self._lingering))
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering.active:
            return  # the rest of a body nobody will read
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head begun but not complete
            if self._head_timer is None:
                self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._lingering.done()
        super().connection_lost(exc)

    def body_incoming(self) -> bool:
        """Whether the client is still sending the body of its request."""
        return self.conn.their_state is h11.SEND_BODY

    def _arm_head_timer(self) -> None:
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closed %s: no complete request head within %gs", self.client, self.header_timeout)
            self.transport.abort()  # no close_notify exchange: a silent peer would hold it open longer


LINGER_S = 2.0
"""How long a connection closed mid-body keeps reading (and dropping) before it closes."""


class _Lingering:
    """The transport as uvicorn's protocol sees it; `close()` lingers while a body is incoming."""

    def __init__(self, transport: asyncio.Transport, protocol: TimedH11) -> None:
        self._transport = transport
        self._protocol = protocol
        self._timer: asyncio.TimerHandle | None = None
        self.active = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        if self.active or self._transport.is_closing():
            return
        if not self._protocol.body_incoming():
            self._transport.close()
            return
        self.active = True
        self._transport.resume_reading()  # drain: a paused socket would fill and stall the answer
        self._timer = self._protocol.loop.call_later(LINGER_S, self._transport.close)

    def is_closing(self) -> bool:
        return self.active or self._transport.is_closing()

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def timed_h11(header_timeout: float = HEADER_TIMEOUT_S) -> type[TimedH11]:
    """The `http=` protocol class for a plain uvicorn server (`fedseek serve`) with a header deadline."""
    return type("TimedH11", (TimedH11,), {"header_timeout": header_timeout})


class _GatedH11(asyncio.Protocol):
    """TLS handshake first (refusals logged and reported), then uvicorn's HTTP/1.1 protocol."""

    gate: TLSGate

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        inner = timed_h11(self.gate.tls.header_timeout)
        self._inner = inner(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
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
        # A Unix socket's peer has no address (''): name the socket instead.
        self._peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr) or _unix_peer(transport)
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
                ssl_shutdown_timeout=SSL_SHUTDOWN_TIMEOUT_S,
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
                # The chain is the CA's; the organisation (O) and party name must be the consortium's too.
                identity = pki.check_member(pki.identity_from_der(der), self.gate.consortium)
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


def _unix_peer(transport: asyncio.BaseTransport) -> str:
    return f"unix:{transport.get_extra_info('sockname') or '?'}"


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
    if isinstance(exc, asyncio.TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "taking longer than" in str(exc)  # asyncio's handshake timeout
    ):
        return "TLS handshake timed out"
    return f"connection failed during the TLS handshake: {exc}"


def peer_of(request: Any) -> pki.Identity | None:
    """The verified client certificate's identity for a Starlette request, if any."""
    return getattr(request.state, PEER_STATE_KEY, None)


class ServiceStartError(Unavailable):
    """The HTTPS service did not come up (port taken, bad certificate)."""


def unix_listener(path: Path) -> socket.socket:
    """A Unix socket bound at `path`, born 0600 (a stale one from a killed server is replaced).

    Its directory should be 0700: the file modes are what decide who may connect.
    """
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ServiceStartError(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    return sock


@dataclass
class HTTPSService:
    """An ASGI app behind a TLSGate, served by uvicorn in a daemon thread."""

    server: uvicorn.Server
    thread: threading.Thread
    gate: TLSGate
    url: str

    unix_socket: Path | None = None

    @classmethod
    def start(
        cls,
        app: Any,
        tls: ServerTLS,
        *,
        host: str,
        port: int,
        on_refusal: RefusalHook | None,
        timeout: float = 30.0,
        unix_socket: Path | None = None,
    ) -> HTTPSService:
        """Serve `app` on host:port, and also on `unix_socket` if given: the same gate (TLS, client
        certificates, timeouts) on both, for callers with no route to host:port (a private network
        namespace reaches the host only through a socket file)."""
        gate = TLSGate(tls, on_refusal=on_refusal).start()
        server = gate.server(app, host=host, port=port)
        extra = unix_listener(unix_socket) if unix_socket is not None else None

        def run() -> None:
            # uvicorn serves either its own host:port or the sockets it is given, so with a Unix
            # socket it is given both (bind_socket exits this thread on failure: reported below).
            server.run(sockets=None if extra is None else [server.config.bind_socket(), extra])

        thread = threading.Thread(target=run, name=f"https-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                gate.stop()
                if extra is not None:
                    extra.close()
                raise ServiceStartError(f"HTTPS service failed to start on {host}:{port}")
            time.sleep(0.05)
        return cls(server=server, thread=thread, gate=gate, url=f"https://{host}:{port}", unix_socket=unix_socket)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.gate.stop()
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)
