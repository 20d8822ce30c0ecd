"""Issue 16: each served request's audit record names the adapter by sha256, how it sampled, and keyed
digests of prompt and output (never the text), for the blocking and the streaming path alike."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation.protocol import wire
from node.service import NodeService
from node.serving.sampling import SamplingParams
from tests.node.tiny_service import tiny_service

MESSAGES = [{"role": "user", "content": "Chest pain since this morning."}]


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeService:
    svc = tiny_service(tiny_model_dir, site_data_dir, tmp_path_factory.mktemp("serve-audit"), n_train=8, n_eval=2)
    rng = np.random.default_rng(3)
    arrays = {k: rng.normal(0.0, 0.05, v.shape).astype(np.float32) for k, v in svc.host.initial_arrays().items()}
    svc.deploy("v1", wire.sha256_of(arrays), arrays)
    return svc


def _last(service: NodeService) -> dict[str, Any]:
    return dict(json.loads(service.audit.path.read_text().splitlines()[-1]))


def test_a_completion_record_names_adapter_sampling_and_keyed_digests(service: NodeService) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.7, top_p=0.9, seed=11)
    prep = service.serving.prepare(MESSAGES, "v1")
    gen, record_hash = service.serving.complete(prep, params, actor="app")
    record = _last(service)
    details = record["details"]
    assert record["hash"] == record_hash and record["resource"] == "v1"
    assert details["adapter_sha256"] == service.host.adapters["v1"].sha256
    assert details["sampling"] == {**json.loads(json.dumps(params.__dict__)), "stop": [], "stop_token_ids": []}
    assert details["response_hmac"] == service.serving.keys.digest(gen.text)
    assert details["prompt_hmac"] == prep.prompt_hmac
    assert "Chest pain" not in json.dumps(record)


def test_a_streamed_record_digests_the_whole_output_and_the_base_model_has_no_adapter(service: NodeService) -> None:
    params = SamplingParams(max_tokens=4)
    prep = service.serving.prepare(MESSAGES, service.host.model_name)

    async def run() -> str:
        pieces = []
        async for event in service.serving.generate(prep, params, actor="app"):
            pieces.append(event.text)
        return "".join(pieces)

    text = asyncio.run(run())
    details = _last(service)["details"]
    assert details["adapter_sha256"] is None and details["sampling"]["max_tokens"] == 4
    assert details["response_hmac"] == service.serving.keys.digest(text)
