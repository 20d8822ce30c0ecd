"""Closed-loop load on an OpenAI chat endpoint, shared by the in-process and the CLI load tests."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx


def chat_load(
    *,
    url: str,
    key: str,
    body: dict[str, Any],
    clients: int,
    per_client: int,
    backoff_s: float,
    timeout_s: float = 60.0,
) -> tuple[Counter[int], float]:
    """`clients` concurrent clients send `per_client` chat requests each, back to back.

    A 429 must carry OpenAI's rate-limit error (`queue_full`) and the client backs off
    `backoff_s`; a 200 must be a finished completion. Returns the status counts and the
    wall time, so the caller asserts what its server promises (only 200/429, memory, ...).
    """
    statuses: Counter[int] = Counter()

    async def one_client(http: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            r = await http.post("/v1/chat/completions", json=body)
            statuses[r.status_code] += 1
            if r.status_code == 429:
                error = r.json()["error"]
                assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full"), r.text
                await asyncio.sleep(backoff_s)
            elif r.status_code == 200:
                assert r.json()["choices"][0]["finish_reason"] in {"length", "stop"}, r.text

    async def run() -> None:
        headers = {"authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as http:
            await asyncio.gather(*(one_client(http) for _ in range(clients)))

    start = time.monotonic()
    asyncio.run(run())
    return statuses, time.monotonic() - start
