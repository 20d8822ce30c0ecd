"""The node's HTTP API through FastAPI's TestClient: OpenAI shape, errors, auth, audit, explanations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from federation.protocol import wire
from node.api import MAX_BODY_BYTES, create_app
from node.api.protocol import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionStreamResponse,
    ModelList,
)
from node.client_app import CONFIG_HEADER, REPORT_HEADER
from node.service import NodeService
from privacy.audit import verify
from tests.federation.security.refusal_record import content, refusal
from tests.node.peers import HEADER, api_key, as_peer, policy_for
from tests.node.tiny_service import tiny_service

N_TRAIN, N_EVAL = 16, 4
PROMPT = "ST elevation on ECG and troponin elevated. Which department?"
CHAT = {"messages": [{"role": "user", "content": "Chest pain since this morning."}], "max_tokens": 3}


def random_arrays(like: wire.Arrays, *, seed: int, scale: float = 0.05) -> wire.Arrays:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, scale, v.shape).astype(np.float32) for k, v in like.items()}


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeService:
    state = tmp_path_factory.mktemp("server-state")
    svc = tiny_service(tiny_model_dir, site_data_dir, state, n_train=N_TRAIN, n_eval=N_EVAL)
    v1 = random_arrays(svc.host.initial_arrays(), seed=1)
    v2 = random_arrays(svc.host.initial_arrays(), seed=2)
    svc.deploy("v1", wire.sha256_of(v1), v1)
    svc.deploy("v2", wire.sha256_of(v2), v2, parent="v1")
    return svc


@pytest.fixture(scope="module")
def client(service: NodeService) -> TestClient:
    """An application with its API key, and (for the explanation routes) a reviewer's certificate."""
    app = create_app(service, access=policy_for(service))
    headers = {"authorization": f"Bearer {api_key(service)}", **as_peer("rita", "reviewer")}
    return TestClient(app, headers=headers, raise_server_exceptions=False)


def auth(service: NodeService) -> dict[str, str]:
    """The local ClientApp: this site's node certificate and the agent token."""
    return {"authorization": f"Bearer {service.token}", **as_peer("site-a", "node")}


ADMIN = as_peer("olga", "admin")


def assert_openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return dict(err)


def audit_records(service: NodeService) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.audit.path.read_text().splitlines()]


# ---- models and chat -------------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "site": "site-a"}


def test_models_lists_base_and_versions_with_parent(client: TestClient, service: NodeService) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    base = service.host.model_name
    assert set(by_id) == {base, "v1", "v2"}
    assert body["data"][0]["id"] == base
    assert by_id[base]["parent"] is None
    assert by_id["v1"]["parent"] == base
    assert by_id["v2"]["parent"] == "v1"
    for version in ("v1", "v2"):
        assert by_id[version]["object"] == "model"
        assert by_id[version]["sha256"] == service.host.adapters[version].sha256
        assert by_id[version]["owned_by"] == "consortium"


@pytest.mark.parametrize("model", ["v1", "v2", "base-name"])
def test_chat_completion_has_openai_shape_and_is_audited(client: TestClient, service: NodeService, model: str) -> None:
    model_id = service.host.model_name if model == "base-name" else model
    before = len(service.audit)
    r = client.post("/v1/chat/completions", json={**CHAT, "model": model_id})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == model_id
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 <= usage["completion_tokens"] <= CHAT["max_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    assert len(service.audit) == before + 1
    result = verify(service.audit.path)
    assert result.ok, result.error
    last = audit_records(service)[-1]
    assert last["action"] == "serve"
    assert last["resource"] == model_id
    assert last["details"]["prompt_tokens"] == usage["prompt_tokens"]
    assert last["details"]["completion_tokens"] == usage["completion_tokens"]
    assert "Chest pain" not in json.dumps(last)  # the prompt itself never enters the audit trail
    assert body["system_fingerprint"] == last["hash"][:16]


def test_chat_with_openai_client_shape(client: TestClient) -> None:
    """What an OpenAI SDK would parse: the response validates as a ChatCompletion."""
    from openai.types.chat import ChatCompletion

    r = client.post("/v1/chat/completions", json={**CHAT, "model": "v1"})
    completion = ChatCompletion.model_validate(r.json())
    assert completion.choices[0].message.role == "assistant"


def test_responses_are_exactly_the_protocol_models(client: TestClient) -> None:
    """Each answer parses as its node/api/protocol.py model and as the `openai` type, and the model
    re-serializes to the very same JSON: the models describe the wire format field for field."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    chat = client.post("/v1/chat/completions", json={**CHAT, "model": "v1"}).json()
    assert ChatCompletionResponse.model_validate(chat).model_dump(mode="json") == chat
    ChatCompletion.model_validate(chat)
    text = client.post("/v1/completions", json={"model": "v2", "prompt": PROMPT, "max_tokens": 2}).json()
    assert CompletionResponse.model_validate(text).model_dump(mode="json") == text
    Completion.model_validate(text)
    models = client.get("/v1/models").json()
    assert ModelList.model_validate(models).model_dump(mode="json") == models
    base = models["data"][0]
    assert base["parent"] is None and "sha256" not in base  # only adapter versions have a digest


def sse(client: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_stream_chunks_are_exactly_the_protocol_models(client: TestClient, include_usage: bool) -> None:
    """`usage` is in every chunk (null until the last) only when asked for; deltas carry the role once."""
    from openai.types.chat import ChatCompletionChunk

    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    skip = None if include_usage else {"usage"}
    chat = sse(client, "/v1/chat/completions", {**CHAT, "model": "v1", **options})
    for chunk in chat:
        assert ChatCompletionStreamResponse.model_validate(chunk).model_dump(mode="json", exclude=skip) == chunk
        ChatCompletionChunk.model_validate(chunk)
        assert ("usage" in chunk) == include_usage
    deltas = [c["choices"][0]["delta"] for c in chat if c["choices"]]
    assert set(deltas[0]) == {"role", "content"} and deltas[-1] == {}
    assert all(set(d) == {"content"} for d in deltas[1:-1])
    text = sse(client, "/v1/completions", {"model": "v2", "prompt": PROMPT, "max_tokens": 2, **options})
    for chunk in text:  # (the `openai` client reads these unvalidated: its Completion type has no null finish)
        assert CompletionStreamResponse.model_validate(chunk).model_dump(mode="json", exclude=skip) == chunk


def test_chat_stream_is_server_sent_chunks_and_audited(client: TestClient, service: NodeService) -> None:
    before = len(service.audit)
    body = {**CHAT, "model": "v1", "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= CHAT["max_tokens"]
    assert len(service.audit) == before + 1


def test_unknown_model_is_404(client: TestClient, service: NodeService) -> None:
    before = len(service.audit)
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"})
    err = assert_openai_error(r, 404)
    assert err["code"] == "model_not_found"
    assert "gpt-4" in err["message"]
    assert len(service.audit) == before


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(json.dumps({**CHAT, "temperature": 5}), id="temperature-5"),
        pytest.param(json.dumps({"messages": []}), id="empty-messages"),
        pytest.param(json.dumps({"model": "v1"}), id="missing-messages"),
        pytest.param('{"messages": [{"role": "user", "content": "hi"', id="malformed-json"),
        pytest.param("[1, 2, 3]", id="array-body"),
        pytest.param("", id="empty-body"),
        pytest.param(json.dumps({"messages": "hi"}), id="messages-not-a-list"),
        pytest.param(json.dumps({"messages": [{"role": "doctor", "content": "hi"}]}), id="bad-role"),
        pytest.param(json.dumps({"messages": [{"role": "user"}]}), id="no-content"),
        pytest.param(json.dumps({**CHAT, "max_tokens": 0}), id="max-tokens-0"),
        pytest.param(json.dumps({**CHAT, "max_tokens": "many"}), id="max-tokens-str"),
        pytest.param(json.dumps({**CHAT, "top_p": 0}), id="top-p-0"),
        pytest.param(json.dumps({**CHAT, "n": 2}), id="n-2"),
        pytest.param(json.dumps({**CHAT, "stop": [""]}), id="empty-stop"),
        pytest.param(json.dumps({**CHAT, "stop": ["a", "b", "c", "d", "e"]}), id="five-stops"),
        pytest.param(json.dumps({**CHAT, "seed": 2**64}), id="seed-beyond-int64"),
        pytest.param(json.dumps({**CHAT, "max_tokens": 4000}), id="context-overflow"),
    ],
)
def test_invalid_chat_requests_are_400(client: TestClient, service: NodeService, body: str) -> None:
    before = len(service.audit)
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert len(service.audit) == before


def test_oversized_body_is_413(client: TestClient, service: NodeService) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}]})
    r = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert_openai_error(r, 413)


# ---- internal and admin routes ---------------------------------------------------------


NO_PEER = {HEADER: ""}


@pytest.mark.parametrize(
    ("method", "path", "who", "status"),
    [
        pytest.param("post", "/internal/train", {**NO_PEER, "authorization": ""}, 401, id="train-nothing"),
        pytest.param(
            "post",
            "/internal/train",
            {**as_peer("site-a", "node"), "authorization": "Bearer x"},
            401,
            id="train-wrong-token",
        ),
        pytest.param("post", "/internal/train", "token+site-b", 403, id="train-other-site"),
        pytest.param("post", "/internal/deploy", "token+reviewer", 403, id="deploy-reviewer"),
        pytest.param("post", "/internal/ready", {**NO_PEER, "authorization": ""}, 401, id="ready-nothing"),
        pytest.param("post", "/internal/ready", "token+site-b", 403, id="ready-other-site"),
        pytest.param("get", "/v1/admin/status", as_peer("site-a", "node"), 403, id="admin-node-cert"),
        pytest.param("get", "/v1/admin/status", {}, 403, id="admin-reviewer-cert"),
        pytest.param("get", "/v1/admin/status", NO_PEER, 401, id="admin-no-cert"),
        pytest.param("post", "/v1/explanations", as_peer("site-a", "node"), 403, id="explain-node-cert"),
        pytest.param("post", "/v1/explanations", ADMIN, 403, id="explain-admin-cert"),
        pytest.param("get", "/v1/explanations/expl-0", NO_PEER, 401, id="get-explanation-no-cert"),
        pytest.param("post", "/v1/chat/completions", {"authorization": ""}, 401, id="chat-no-key"),
        pytest.param("post", "/v1/chat/completions", {"authorization": "Bearer fsk-forged"}, 401, id="chat-bad-key"),
        pytest.param("get", "/v1/models", {"authorization": f"Bearer {'0' * 64}"}, 401, id="models-digest-as-key"),
    ],
)
def test_routes_refuse_the_wrong_caller_and_audit_it(
    client: TestClient, service: NodeService, method: str, path: str, who: dict[str, str] | str, status: int
) -> None:
    if isinstance(who, str):  # the right agent token, presented with the wrong certificate
        name, role = {"token+site-b": ("site-b", "node"), "token+reviewer": ("rita", "reviewer")}[who]
        who = {**auth(service), **as_peer(name, role)}
    entries, records = service.ledger.entries(), len(service.audit)
    body = {"run-id": "x"}  # a well-formed body would not matter: the caller is checked first
    r = client.request(method.upper(), path, headers={**who, CONFIG_HEADER: json.dumps(body)}, json=CHAT)
    err = assert_openai_error(r, status)
    assert err["type"] == ("authentication_error" if status == 401 else "permission_error")
    assert service.ledger.entries() == entries
    # exactly one record, the very one the coordinator writes (refusal_record.refusal)
    name, _, role = who.get(HEADER, client.headers[HEADER]).partition(":")  # the certificate presented, if any
    expected = refusal(
        actor=name or "testclient:50000", resource=path, status=status, reason=err["message"], role=role or None
    )
    assert [content(record) for record in audit_records(service)[records:]] == [expected]


def test_api_key_added_while_running_works_and_only_its_digest_is_stored(
    client: TestClient, service: NodeService
) -> None:
    from node.api_keys import ApiKeys

    keys = ApiKeys(service.layout.api_key_digests)
    new = keys.create()
    assert new not in keys.path.read_text()
    r = client.get("/v1/models", headers={"authorization": f"Bearer {new}"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", headers={"authorization": f"Bearer {new}"}, json=CHAT)
    assert r.status_code == 200, r.text
    assert audit_records(service)[-1]["actor"].startswith("key-")


def test_admin_status_with_token(client: TestClient, service: NodeService) -> None:
    r = client.get("/v1/admin/status", headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "site-a"
    assert body["model"] == service.host.model_name
    assert np.isfinite(body["eval_loss_before"])
    assert "eval_loss_after" in body
    privacy = body["privacy"]
    assert {"epsilon_spent", "delta", "budget_epsilon", "accountant", "entries"} <= set(privacy)
    assert privacy["budget_epsilon"] == 1.0
    assert body["audit_records"] == len(service.audit)


def test_internal_train_with_token(client: TestClient, service: NodeService) -> None:
    config = {"run-id": "http-run", "server-round": 1, "num-rounds": 3, "batch-size": N_TRAIN}
    global_arrays = service.host.initial_arrays()
    r = client.post(
        "/internal/train",
        content=wire.encode(global_arrays),
        headers={**auth(service), CONFIG_HEADER: json.dumps(config)},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    arrays = wire.decode(r.content)
    assert sorted(arrays) == sorted(global_arrays)
    report = wire.PrivacyReport.from_dict(json.loads(r.headers[REPORT_HEADER]))
    assert report.site == "site-a"
    assert report.num_examples == N_TRAIN
    assert report.epsilon == pytest.approx(service.ledger.spent())
    status = client.get("/v1/admin/status", headers=ADMIN).json()
    assert status["rounds_trained"] == 1
    assert status["privacy"]["epsilon_spent"] == pytest.approx(report.epsilon)
    assert [e["status"] for e in status["privacy"]["entries"]] == ["completed"]


@pytest.mark.parametrize(
    ("content", "config"),
    [
        pytest.param(b"", "{not json", id="bad-config-header"),
        pytest.param(b"not safetensors", "{}", id="bad-payload"),
        pytest.param(b"", '{"run-id": "r", "learning_rate": 0.01}', id="unknown-setting"),
    ],
)
def test_internal_train_bad_input_is_400(client: TestClient, service: NodeService, content: bytes, config: str) -> None:
    entries = service.ledger.entries()
    r = client.post("/internal/train", content=content, headers={**auth(service), CONFIG_HEADER: config})
    assert_openai_error(r, 400)
    assert service.ledger.entries() == entries


@pytest.mark.parametrize(
    ("config", "status"),
    [
        pytest.param("{not json", 400, id="bad-config-header"),
        pytest.param('{"run-id": "r", "learning_rate": 0.01}', 400, id="unknown-setting"),
        pytest.param('{"run-id": "ready-run", "num-rounds": 2}', 200, id="a-round-it-can-train"),
    ],
)
def test_internal_ready_answers_and_charges_nothing(
    client: TestClient, service: NodeService, config: str, status: int
) -> None:
    """The coordinator's readiness query (issue 14): a plan of the round from the ledger, never a charge."""
    entries, audit = service.ledger.entries(), len(service.audit)
    r = client.post("/internal/ready", headers={**auth(service), CONFIG_HEADER: config})
    assert r.status_code == status, r.text
    if status == 200:
        answer = wire.Readiness.from_dict(r.json())
        assert (answer.site, answer.ready, answer.reason) == ("site-a", True, "")
        assert answer.epsilon_spent == pytest.approx(service.ledger.spent())
    else:
        assert_openai_error(r, status)
    assert service.ledger.entries() == entries and len(service.audit) == audit


def test_internal_train_with_misshaped_arrays_spends_no_budget(client: TestClient, service: NodeService) -> None:
    arrays = service.host.initial_arrays()
    arrays[next(iter(arrays))] = np.zeros((2, 2), dtype=np.float32)
    entries = service.ledger.entries()
    config = {"run-id": "bad-run", "server-round": 1, "num-rounds": 3, "batch-size": N_TRAIN}
    r = client.post(
        "/internal/train", content=wire.encode(arrays), headers={**auth(service), CONFIG_HEADER: json.dumps(config)}
    )
    assert_openai_error(r, 400)
    assert service.ledger.entries() == entries


def test_internal_deploy_with_bad_sha256_is_400(client: TestClient, service: NodeService) -> None:
    arrays = random_arrays(service.host.initial_arrays(), seed=3)
    config = {"adapter-version": "v-bad", "adapter-sha256": "f" * 64}
    r = client.post(
        "/internal/deploy", content=wire.encode(arrays), headers={**auth(service), CONFIG_HEADER: json.dumps(config)}
    )
    err = assert_openai_error(r, 400)
    assert "sha256" in err["message"]
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert "v-bad" not in ids
    assert not (service.layout.adapters / "v-bad").exists()
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "v-bad"})
    assert_openai_error(r, 404)


@pytest.mark.parametrize(
    ("content", "config"),
    [
        pytest.param(b"", {"adapter-version": "v-x", "adapter-sha256": "0" * 64}, id="no-arrays"),
        pytest.param(None, {"adapter-sha256": "0" * 64}, id="no-version"),
        pytest.param(None, {"adapter-version": "v-x"}, id="no-sha"),
    ],
)
def test_internal_deploy_incomplete_is_400(
    client: TestClient, service: NodeService, content: bytes | None, config: dict[str, str]
) -> None:
    body = wire.encode(service.host.initial_arrays()) if content is None else content
    r = client.post("/internal/deploy", content=body, headers={**auth(service), CONFIG_HEADER: json.dumps(config)})
    assert_openai_error(r, 400)
    assert "v-x" not in service.host.adapters


def test_internal_deploy_with_token(client: TestClient, service: NodeService) -> None:
    arrays = random_arrays(service.host.initial_arrays(), seed=4)
    sha = wire.sha256_of(arrays)
    config = {"adapter-version": "v3", "adapter-sha256": sha}
    r = client.post(
        "/internal/deploy", content=wire.encode(arrays), headers={**auth(service), CONFIG_HEADER: json.dumps(config)}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "v3" and body["sha256"] == sha and body["site"] == "site-a"
    assert np.isfinite(body["eval_loss"]) and body["num_examples"] == N_EVAL
    assert (service.layout.adapters / "v3" / "adapter.safetensors").is_file()
    assert "v3" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    # deployed, then judged by the gray release (node/release.py; a pending candidate may be settled first)
    rows = audit_records(service)
    at = max(i for i, r in enumerate(rows) if (r["action"], r["resource"]) == ("deploy", "v3"))
    release = rows[-1]
    assert at < len(rows) - 1 and release["resource"] == "v3"
    assert release["action"] == {"candidate": "release.candidate", "retired": "release.rolled_back"}[body["release"]]


# ---- explanations ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def explanation(client: TestClient, service: NodeService) -> tuple[dict[str, Any], int]:
    before = len(service.audit)
    r = client.post(
        "/v1/explanations", json={"model": "v1", "prompt": PROMPT, "response": "cardiology", "max_evals": 40}
    )
    assert r.status_code == 200, r.text
    return r.json(), before


def test_explanation_attributions_are_efficient(explanation: tuple[dict[str, Any], int]) -> None:
    body, _ = explanation
    attr = body
    values = np.array(attr["values"])
    base, full = np.array(attr["base_values"]), np.array(attr["full_values"])
    total = np.array(attr["total"])
    assert values.shape == (len(attr["features"]), len(attr["output_tokens"]))
    assert "".join(attr["features"]) == PROMPT  # the features partition the prompt
    np.testing.assert_allclose(values.sum(axis=1), total, rtol=1e-6, atol=1e-9)
    expected = float((full - base).sum())
    assert abs(total.sum() - expected) <= 1e-4 * max(1.0, abs(expected))
    np.testing.assert_allclose(values.sum(axis=0), full - base, rtol=1e-4, atol=1e-4)


def test_explanation_full_value_is_the_served_models_logprob(
    explanation: tuple[dict[str, Any], int], service: NodeService
) -> None:
    body, _ = explanation
    host = service.host
    response_ids = host.tokenizer("cardiology", add_special_tokens=False).input_ids
    direct = host.response_logprobs([[{"role": "user", "content": PROMPT}]], response_ids, model="v1")[0]
    np.testing.assert_allclose(body["full_values"], direct, atol=1e-4)
    assert body["response"] == "cardiology"
    assert body["model"] == "v1"
    assert body["adapter_sha256"] == host.adapters["v1"].sha256


def test_explanation_top_tokens_and_report(
    explanation: tuple[dict[str, Any], int], client: TestClient, service: NodeService
) -> None:
    body, _ = explanation
    features = [f.strip() for f in body["features"]]
    assert 1 <= len(body["top_tokens"]) <= 5
    assert all(tok and tok in features for tok in body["top_tokens"])
    page = client.get(body["html"])  # served to reviewers; sealed at rest (tests/node/test_explain_api.py)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert body["id"] in body["html"]
    assert body["audit_record"]["hash"] in page.text
    assert (service.layout.explanations / f"{body['id']}.html.sealed").is_file()


def test_explanation_is_in_the_audit_log(explanation: tuple[dict[str, Any], int], service: NodeService) -> None:
    body, before = explanation
    assert len(service.audit) >= before + 1
    result = verify(service.audit.path)
    assert result.ok, result.error
    seq, hash_ = body["audit_record"]["seq"], body["audit_record"]["hash"]
    record = next(r for r in audit_records(service) if r["seq"] == seq)
    assert record["hash"] == hash_
    assert record["action"] == "explain"
    assert record["resource"] == "v1"
    assert record["details"]["explanation_id"] == body["id"]
    assert record["details"]["adapter_sha256"] == service.host.adapters["v1"].sha256
    assert record["details"]["max_evals"] == 40
    assert PROMPT not in json.dumps(record)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"prompt": ""}, id="empty-prompt"),
        pytest.param({"prompt": "   \n"}, id="blank-prompt"),
        pytest.param({}, id="no-prompt"),
        pytest.param({"messages": [{"role": "assistant", "content": "hi"}]}, id="last-not-user"),
        pytest.param({"prompt": "Fever?", "response": ""}, id="empty-response"),
        pytest.param({"prompt": "Fever?", "max_evals": 5}, id="max-evals-too-small"),
        pytest.param({"prompt": "Fever?", "max_evals": 10**6}, id="max-evals-too-large"),
    ],
)
def test_invalid_explanation_requests_are_400(
    client: TestClient, service: NodeService, payload: dict[str, Any]
) -> None:
    before = len(service.audit)
    r = client.post("/v1/explanations", json=payload)
    assert_openai_error(r, 400)
    assert len(service.audit) == before


def test_explanation_for_unknown_model_is_404(client: TestClient, service: NodeService) -> None:
    before = len(service.audit)
    r = client.post("/v1/explanations", json={"model": "nope", "prompt": "Fever?", "response": "x"})
    err = assert_openai_error(r, 404)
    assert err["code"] == "model_not_found"
    assert len(service.audit) == before
