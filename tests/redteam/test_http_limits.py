"""Red team, findings 2 and 7: request limits before parsing and before authentication; no API docs.

Against a real node agent (`fedseek node start`, its HTTPS API as a site exposes it):

- finding 2: an unauthenticated chunked body (no Content-Length) of 300 MB was read and parsed
  before the API-key check (401 after 4 s, agent RSS +0.9 GB), and malformed JSON without a
  key got 400, not 401. Now the caller is decided from the headers before any body is read and
  a body is counted as it arrives;
- finding 7: `/docs`, `/redoc` and `/openapi.json` answered without credentials, on the node's
  and the coordinator's APIs. Now no app serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from coordinator.admin_api import create_admin_app
from coordinator.registry import AdapterRegistry
from coordinator.sites import SiteAccess
from federation.ops.layout import NodeLayout
from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.mtls_server import HTTPSService, ServerTLS, audit_hook
from node.api import create_serving_app
from node.build import serving_access
from privacy.audit import AuditTrail
from tests.redteam.node_agent import Agent, node_agent

pytestmark = pytest.mark.e2e

UPLOAD = 300 * 1024 * 1024
REFUSED_WITHIN_S = 5.0
RSS_GROWTH_MIB = 100.0
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path
) -> Iterator[Agent]:
    root = tmp_path_factory.mktemp("redteam-limits")
    with node_agent(root, pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir) as running:
        yield running


@dataclass
class Upload:
    status_line: bytes
    answered_s: float  # from the request head to the response's status line
    closed_s: float | None  # to the server dropping the connection (None: still open at the end)
    sent: int  # body bytes the client wrote (the server drops what follows a refusal for LINGER_S, then closes)


async def _exchange(
    port: int,
    ctx: ssl.SSLContext,
    head: str,
    body: Callable[[asyncio.StreamWriter, list[int]], Awaitable[None]],
    *,
    answer_within: float,
) -> Upload:
    """Send `head`, then `body` (which counts what it wrote in its list) while reading the answer, as a
    client that cannot be stopped would: the status line, and when the server drops the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    sent = [0]

    async def pump() -> None:
        with contextlib.suppress(ConnectionError, OSError):  # the server dropped the connection: the point
            await body(writer, sent)

    started = time.monotonic()
    writer.write(head.encode("ascii"))
    task = asyncio.create_task(pump())
    try:
        try:
            status = await asyncio.wait_for(reader.readline(), timeout=answer_within)
        except TimeoutError:
            return Upload(b"", answer_within, None, sent[0])
        answered = time.monotonic() - started
        closed: float | None = None
        try:
            await asyncio.wait_for(reader.read(), timeout=REFUSED_WITHIN_S)
            closed = time.monotonic() - started
        except (ConnectionError, OSError):
            closed = time.monotonic() - started
        except TimeoutError:
            closed = None
    finally:
        task.cancel()
        writer.close()
    return Upload(status, answered, closed, sent[0])


async def _chunked_upload(port: int, ctx: ssl.SSLContext, path: str, extra_headers: str, total: int) -> Upload:
    """POST `total` bytes as a chunked body, reading the answer while still sending."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n{extra_headers}\r\n"
    )
    chunk = 64 * 1024
    frame = b"%x\r\n" % chunk + b"{" * chunk + b"\r\n"

    async def chunks(writer: asyncio.StreamWriter, sent: list[int]) -> None:
        while sent[0] < total:
            writer.write(frame)
            await writer.drain()
            sent[0] += chunk
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return await _exchange(port, ctx, head, chunks, answer_within=60)


def _upload(agent: Agent, path: str, total: int, *, key: str | None = None) -> tuple[Upload, float]:
    before = agent.rss_mib()
    extra = f"Authorization: Bearer {key}\r\n" if key else ""
    result = asyncio.run(_chunked_upload(agent.port, agent.tls(), path, extra, total))
    return result, agent.rss_mib() - before


def test_unauthenticated_chunked_300mb_is_refused_at_once_and_never_read(agent: Agent) -> None:
    """Finding 2: 401 before the body is read, in under 5 s, agent RSS growing under 100 MB."""
    audit_before = len(agent.audit())
    result, grew = _upload(agent, "/v1/chat/completions", UPLOAD)
    print(
        f"unauthenticated 300 MB chunked upload: {result.status_line!r} after {result.answered_s:.3f}s, "
        f"closed after {result.closed_s}s, {result.sent / 2**20:.1f} MiB sent, agent RSS +{grew:.1f} MiB"
    )
    assert result.status_line.startswith(b"HTTP/1.1 401 "), result
    assert result.answered_s < REFUSED_WITHIN_S
    assert result.closed_s is not None and result.closed_s < REFUSED_WITHIN_S, "the server kept reading the body"
    assert grew < RSS_GROWTH_MIB, f"agent RSS grew {grew:.0f} MiB"
    refusals = [r for r in agent.audit()[audit_before:] if r["action"].endswith(".refused")]
    assert [(r["action"], r["resource"]) for r in refusals] == [("access.refused", "/v1/chat/completions")]


def test_authenticated_chunked_body_past_the_limit_is_cut_off(agent: Agent) -> None:
    """Finding 2, with a valid key: the body is counted as it arrives; past 1 MiB it is 413."""
    result, grew = _upload(agent, "/v1/chat/completions", UPLOAD, key=agent.key)
    print(f"authenticated 300 MB chunked upload: {result.status_line!r} after {result.answered_s:.3f}s")
    assert result.status_line.startswith(b"HTTP/1.1 413 "), result
    assert result.answered_s < REFUSED_WITHIN_S
    assert result.closed_s is not None and result.closed_s < REFUSED_WITHIN_S
    assert grew < RSS_GROWTH_MIB, f"agent RSS grew {grew:.0f} MiB"


def test_refusals_of_other_rules_come_before_the_body_too(agent: Agent) -> None:
    """Reviewer, admin and internal routes: no certificate, no body read (401 at once)."""
    for path in ("/v1/explanations", "/v1/admin/status", "/internal/deploy"):
        result, grew = _upload(agent, path, 64 * 1024 * 1024)
        assert result.status_line.startswith(b"HTTP/1.1 401 "), (path, result)
        assert result.answered_s < REFUSED_WITHIN_S and result.closed_s is not None, (path, result)
        assert grew < RSS_GROWTH_MIB


async def _trickle(port: int, ctx: ssl.SSLContext, key: str, *, declared: int, for_s: float) -> Upload:
    """Declare a body of `declared` bytes and send it one byte every 0.1 s for at most `for_s` seconds."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {declared}\r\n\r\n"
    )

    async def drip(writer: asyncio.StreamWriter, sent: list[int]) -> None:
        while sent[0] < declared:
            writer.write(b" ")
            await writer.drain()
            sent[0] += 1
            await asyncio.sleep(0.1)

    return await _exchange(port, ctx, head, drip, answer_within=for_s)


def test_a_trickled_body_is_cut_off_at_its_deadline(tmp_path: Path, pki_dir: Path) -> None:
    """A caller with a valid key sending its body a byte at a time gets 408 at the body's deadline and
    the connection is closed. Before, only the request head was on a clock: the body held a connection
    and a worker for as long as it trickled. The node's own API (`fedseek serve`'s app, the same guard)
    behind the real HTTPS endpoint, its deadline lowered to 1 s (30 s in production)."""
    layout = NodeLayout(tmp_path / "state")
    app = create_serving_app(lambda: None, serving_access(layout), name="x")  # the model is never reached
    app.state.body_timeout_s = 1.0
    leaf = pki.load_leaf(pki_dir, "site-a")
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)
    service = HTTPSService.start(app, tls, host="127.0.0.1", port=free_port(), on_refusal=None)
    try:
        port = int(service.url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
        key = layout.api_key.read_text().strip()
        result = asyncio.run(_trickle(port, ctx, key, declared=10_000, for_s=10.0))
    finally:
        service.stop()
    print(f"trickled body: {result.status_line!r} after {result.answered_s:.2f}s, {result.sent} bytes sent")
    assert result.status_line.startswith(b"HTTP/1.1 408 "), result
    assert 1.0 <= result.answered_s < 1.0 + REFUSED_WITHIN_S, result
    assert result.closed_s is not None, "the server kept the connection open"


def test_malformed_json_without_a_key_is_401_and_with_a_key_400(agent: Agent) -> None:
    """Finding 2: the caller is refused before the body is even parsed."""
    with agent.client() as http:
        anonymous = http.post("/v1/chat/completions", content=b'{"messages": [', headers=_json())
        keyed = http.post("/v1/chat/completions", content=b'{"messages": [', headers=_json(agent.key))
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["type"] == "authentication_error"
    assert keyed.status_code == 400, keyed.text


def test_a_refused_request_is_audited_once(agent: Agent) -> None:
    before = len(agent.audit())
    with agent.client() as http:
        assert http.post("/v1/chat/completions", content=b"{}", headers=_json("sk-wrong")).status_code == 401
    rows = [r for r in agent.audit()[before:] if r["action"].endswith(".refused")]
    assert [(r["action"], r["details"]["reason"]) for r in rows] == [("access.refused", "invalid API key")]


def _json(key: str | None = None) -> dict[str, str]:
    return {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}


# ---- finding 7: no API docs -------------------------------------------------------------------


def _assert_no_schema(response: httpx.Response, *, allowed: tuple[int, ...]) -> None:
    assert response.status_code in allowed, (response.request.url, response.status_code, response.text[:200])
    assert "openapi" not in response.text.lower() and "swagger" not in response.text.lower()


def test_node_serves_no_docs_or_schema(agent: Agent) -> None:
    """Finding 7, node: without credentials 401 (every unknown path needs a key); with a key, a
    reviewer or an admin certificate, 404."""
    with agent.client() as anonymous, agent.client("reviewer") as reviewer:
        for path in DOC_PATHS:
            _assert_no_schema(anonymous.get(path), allowed=(401,))
            _assert_no_schema(anonymous.get(path, headers={"authorization": f"Bearer {agent.key}"}), allowed=(404,))
            _assert_no_schema(reviewer.get(path), allowed=(401, 404))


@pytest.fixture
def admin_api(tmp_path: Path, pki_dir: Path) -> Iterator[tuple[str, int]]:
    """The coordinator's admin app behind the real HTTPS endpoint (federation.security.mtls_server)."""
    leaf = pki.load_leaf(pki_dir, "coordinator")
    trail = AuditTrail(tmp_path / "audit.jsonl")
    app = create_admin_app(
        sites=cast(SiteAccess, object()),  # never reached: no route runs for these paths
        registry=AdapterRegistry(tmp_path / "registry"),
        audit=trail,
    )
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)
    service = HTTPSService.start(app, tls, host="127.0.0.1", port=free_port(), on_refusal=audit_hook(trail.append))
    try:
        yield service.url, int(service.url.rsplit(":", 1)[1])
    finally:
        service.stop()


def _admin_ctx(pki_dir: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    ctx.check_hostname = False  # the server's names are not under test here
    return ctx


def test_coordinator_admin_api_serves_no_docs_or_schema(admin_api: tuple[str, int], pki_dir: Path) -> None:
    """Finding 7, coordinator: 404 for everyone, a certificate or not."""
    with httpx.Client(base_url=admin_api[0], verify=_admin_ctx(pki_dir), timeout=10) as anonymous:
        for path in DOC_PATHS:
            _assert_no_schema(anonymous.get(path), allowed=(401, 404))


def test_coordinator_admin_api_takes_no_upload(admin_api: tuple[str, int], pki_dir: Path) -> None:
    """Finding 2 at the coordinator's admin port: every route is a GET, so any body is refused at
    once (413, connection closed), before authentication and before a byte of it is read."""
    result = asyncio.run(_chunked_upload(admin_api[1], _admin_ctx(pki_dir), "/v1/admin/sites", "", UPLOAD))
    assert result.status_line.startswith(b"HTTP/1.1 413 "), result
    assert result.answered_s < REFUSED_WITHIN_S and result.closed_s is not None


def test_the_schema_is_still_generated_in_process(tmp_path: Path) -> None:
    """The OpenAPI description exists for the project's own tooling (schemathesis), just not on the wire."""
    app = create_serving_app(lambda: None, serving_access(NodeLayout(tmp_path / "state")), name="x")
    schema: dict[str, Any] = app.openapi()
    assert "/v1/chat/completions" in schema["paths"]
