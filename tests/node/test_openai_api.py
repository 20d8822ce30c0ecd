"""The OpenAI API over a real socket: the `openai` client, streaming, errors, disconnects, metrics, load, fuzzing.

The server is `create_serving_app` (what `fedseek serve` runs) on uvicorn on loopback, over the tiny
DeepSeek-V3 model with two adapter versions; `create_app` (the node) mounts the same routes.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from node.access import AccessPolicy
from node.api import create_serving_app
from node.service import Serving
from tests.load import chat_load
from tests.node.openai_server import USER, Site, served_site

torch.set_num_threads(2)

METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:lora_requests_info",
)


@pytest.fixture(scope="module")
def site(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with served_site(tmp_path_factory.mktemp("openai-site"), tiny_model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def url(site: Site) -> str:
    return site.url


@pytest.fixture
def client(site: Site) -> openai.OpenAI:
    return site.client(timeout=60)


@contextlib.contextmanager
def queue_limit(site: Site, n: int) -> Iterator[None]:
    old, site.serving.engine.max_queue = site.serving.engine.max_queue, n
    try:
        yield
    finally:
        site.serving.engine.max_queue = old


# ---- the openai client ---------------------------------------------------------------------------


def test_models_list_base_and_versions_with_parent(client: openai.OpenAI, site: Site) -> None:
    models = {m.id: m for m in client.models.list()}
    base = site.host.model_name
    assert set(models) == {base, "v1", "v2"}
    assert models["v2"].model_extra and models["v2"].model_extra["parent"] == "v1"
    assert models["v1"].model_extra and models["v1"].model_extra["parent"] == base


def test_chat_completion_is_audited(client: openai.OpenAI, site: Site) -> None:
    before = len(site.records())
    out = client.chat.completions.create(model="v1", messages=USER, max_tokens=4, seed=7)  # type: ignore[arg-type]
    assert out.object == "chat.completion" and out.model == "v1"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage and out.usage.completion_tokens <= 4
    rec = site.records()[before:]
    assert [r["action"] for r in rec] == ["serve"]
    assert rec[0]["details"]["completion_tokens"] == out.usage.completion_tokens
    assert rec[0]["hash"][:16] == out.system_fingerprint
    assert "Chest pain" not in json.dumps(rec)


def test_text_completion_and_seeded_sampling_repeat(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "v2", "prompt": "Triage:", "max_tokens": 5, "temperature": 1.0, "seed": 3}
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert first.object == "text_completion"
    assert first.choices[0].text == second.choices[0].text
    assert first.usage and first.usage.prompt_tokens > 0


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(  # type: ignore[call-overload]
        model="v2",
        messages=USER,  # type: ignore[arg-type]
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="v2", messages=USER, max_tokens=6)  # type: ignore[arg-type]
    assert text == full.choices[0].message.content  # greedy: the stream is the same answer


def test_text_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="v1", prompt="Triage:", max_tokens=3, stream=True))
    assert chunks and all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_are_openai_errors(client: openai.OpenAI, site: Site, url: str) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4", messages=USER)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="v1", messages=USER, temperature=5)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="v1", prompt="x", max_tokens=4000)
    assert long.value.code == "context_length_exceeded"
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with queue_limit(site, 0), pytest.raises(openai.RateLimitError) as busy:
        client.chat.completions.create(model="v1", messages=USER, max_tokens=1)  # type: ignore[arg-type]
    assert busy.value.code == "queue_full"


def test_wrong_certificate_role_is_403_in_mtls_mode(site: Site) -> None:
    policy = AccessPolicy(
        site="site-a",
        audit=site.audit,
        api_keys=site.policy.api_keys,
        agent_token="-",
        policy=site.policy.policy,
        openai_auth="mtls",
    )
    app = create_serving_app(lambda: site.serving, policy, name="site-a")
    r = TestClient(app).get("/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_503_while_loading(site: Site) -> None:
    app = create_serving_app(lambda: None, site.policy, name="site-a")
    r = TestClient(app).get("/v1/models", headers={"authorization": f"Bearer {site.key}"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]


# ---- disconnects, metrics ------------------------------------------------------------------------


def test_client_disconnect_mid_stream_frees_the_slot(site: Site, url: str) -> None:
    body = {"model": "v1", "prompt": "Triage:", "max_tokens": 1500, "temperature": 1.0, "seed": 1, "stream": True}
    headers = {"authorization": f"Bearer {site.key}"}
    with (
        httpx.Client(base_url=url, headers=headers, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        while not json.loads(next(lines).removeprefix("data: "))["choices"][0]["text"]:
            pass
        assert site.serving.engine.stats()["running"] == 1
        closed = time.monotonic()
    # leaving the block closed the connection mid-stream
    while site.serving.engine.stats()["running"]:
        assert time.monotonic() - closed < 2.0, "the slot was not freed"
        time.sleep(0.01)
    freed = time.monotonic() - closed
    deadline = time.monotonic() + 5
    while site.records()[-1]["details"].get("finish_reason") != "cancelled":
        assert time.monotonic() < deadline, "the cancelled request was not audited"
        time.sleep(0.02)
    assert site.records()[-1]["details"]["completion_tokens"] < 1500
    print(f"slot freed {freed * 1000:.0f} ms after the disconnect")


def test_metrics_use_vllm_names(client: openai.OpenAI, site: Site, url: str) -> None:
    client.chat.completions.create(model="v1", messages=USER, max_tokens=2)  # type: ignore[arg-type]
    r = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {site.key}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {line.split("{")[0].split(" ")[0] for line in r.text.splitlines() if not line.startswith("#")}
    for name in METRICS:
        assert any(n == name or n.startswith(f"{name}_") for n in names), name
    assert 'max_lora="8"' in r.text
    assert httpx.get(f"{url}/metrics").status_code == 401


# ---- load ------------------------------------------------------------------------------------------


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_bounded_load_every_request_answered_or_429(site: Site, url: str) -> None:
    """16 clients x 40 requests; a queue of 4 behind 8 slots forces some 429s: nothing else is allowed.

    Sized for a 2-core CI box (client and server share it): about 30 req/s here.
    """
    clients, per_client = 16, 40
    body = {"model": "v2", "messages": USER, "max_tokens": 2}
    before = rss_mib()
    with queue_limit(site, 4):
        statuses, took = chat_load(
            url=url, key=site.key, body=body, clients=clients, per_client=per_client, backoff_s=0.02
        )
    grew = rss_mib() - before
    print(f"load: {dict(statuses)} in {took:.1f} s, RSS +{grew:.0f} MiB")
    assert sum(statuses.values()) == clients * per_client
    assert set(statuses) <= {200, 429} and statuses[200] > 0
    assert site.serving.engine.stats() | {"steps": 0, "generated_tokens": 0} == {
        "waiting": 0,
        "running": 0,
        "free_slots": 8,
        "steps": 0,
        "generated_tokens": 0,
    }
    assert grew < 256


# ---- fuzzing ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_schema(site: Site) -> Any:
    """The OpenAI routes of a server with a short context, so schema-valid requests stay cheap."""
    short = Serving(site.host, site.audit, owner="site-a", max_slots=4, max_model_len=48)
    # random `response_format` schemas: a valid but costly one is cut off quickly (a 400), not compiled for 30 s
    short.engine.grammars.compile_timeout_s = 2.0
    app = create_serving_app(lambda: short, site.policy, name="site-a")
    schema = schemathesis.openapi.from_dict(app.openapi())  # in-process: the app serves no /openapi.json
    schema.app = app
    return schema.include(path_regex=r"^/(v1/(chat/)?completions|v1/models|metrics)$")


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
FUZZ = [
    ("GET /v1/models", POSITIVE),  # no parameters: nothing to get wrong
    ("GET /metrics", POSITIVE),
    *((f"POST /v1/{route}", mode) for route in ("chat/completions", "completions") for mode in (POSITIVE, NEGATIVE)),
]


@pytest.mark.parametrize(("label", "mode"), FUZZ, ids=[f"{label}-{mode.value}" for label, mode in FUZZ])
def test_fuzz_never_a_server_error(openai_schema: Any, site: Site, label: str, mode: Any) -> None:
    """Schema-valid and schema-violating requests (schemathesis strategies, run by hypothesis directly)."""
    operation = openai_schema.find_operation_by_label(label)
    auth = {"authorization": f"Bearer {site.key}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        response = case.call(headers=auth)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
