"""TLS client contexts that accept a server only if its certificate speaks for the expected party.

Python's `ssl` checks the chain and the host name: any consortium certificate naming the host
passes, so on loopback (where every node certificate names 127.0.0.1) another site's certificate
could answer for this site's agent. A context from `pinned_client_context` also reads the verified
server certificate right after the handshake, before the caller can send a byte (a bearer token,
an adapter), and refuses it unless it is of this consortium (the CA's O), has the expected role
and, when given, the expected party name.

`ssl` has no verification callback; the check runs in `do_handshake` of the context's socket
and memory-BIO classes, which both blocking sockets (`wrap_socket`) and asyncio/anyio streams
(`wrap_bio`) go through.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from federation.security import pki

__all__ = ["PeerIdentityError", "check_server", "pinned_client_context"]


class PeerIdentityError(ssl.SSLCertVerificationError):
    """The server's certificate verified, but speaks for another party than the one expected."""


def check_server(der: bytes | None, *, role: pki.Role, consortium: str, name: str | None) -> pki.Identity:
    """The server's identity if it is `role` (and `name`) of `consortium`; PeerIdentityError otherwise."""
    if not der:
        raise PeerIdentityError("the server presented no certificate")
    try:
        ident = pki.check_member(pki.identity_from_der(der), consortium)
    except pki.PKIError as exc:
        raise PeerIdentityError(f"server certificate refused: {exc}") from exc
    if ident.role != role or (name is not None and ident.name != name):
        want = f"{role} '{name}'" if name is not None else f"a {role}"
        raise PeerIdentityError(f"server certificate is {ident.role} '{ident.name}', not {want}")
    return ident


def pinned_client_context(
    *,
    ca_cert: Path | str,
    role: pki.Role,
    name: str | None = None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
) -> ssl.SSLContext:
    """A TLS 1.3 client context trusting `ca_cert` that only completes a handshake with a server
    whose certificate is `role` (and `name`, if given) of the CA's consortium; presents
    `cert`/`key` when given. Host names are still checked as usual."""
    consortium = pki.consortium_of(Path(ca_cert))

    def pinned(obj: ssl.SSLSocket | ssl.SSLObject) -> None:
        check_server(obj.getpeercert(binary_form=True), role=role, consortium=consortium, name=name)

    class PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            try:
                pinned(self)
            except PeerIdentityError:
                self.close()  # nothing of the caller's is ever written to this server
                raise

    class PinnedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()  # raises SSLWantReadError until the handshake is complete
            pinned(self)

    ctx = ssl.create_default_context(cafile=str(ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    ctx.sslsocket_class = PinnedSocket
    ctx.sslobject_class = PinnedObject
    return ctx
