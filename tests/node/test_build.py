"""`node.build`: a node from its config (state laid out, adapters back after a restart) and the
serving-only stack `fedseek serve` runs, each working end to end on the tiny model."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from federation.ops.layout import NodeLayout
from federation.protocol import wire
from federation.protocol.config import NodeConfig
from node.api import create_serving_app
from node.build import ServeOptions, build_node, build_serving, node_access, serving_access
from node.engine import ModelHost
from node.model import load_model
from node.service import NodeService, Serving
from privacy.audit import companion_paths

CHAT = {"messages": [{"role": "user", "content": "Chest pain since this morning."}], "max_tokens": 2}


def adapter_arrays(model_dir: Path, *, seed: int) -> wire.Arrays:
    model, tok = load_model(model_dir)
    rng = np.random.default_rng(seed)
    like = ModelHost(model, tok, model_name="shape").initial_arrays()
    return {k: rng.normal(0.0, 0.05, v.shape).astype(np.float32) for k, v in like.items()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- fedseek serve ---------------------------------------------------------------------------


@pytest.fixture
def peft_adapter(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """An adapter as peft's `save_pretrained` leaves it (the other file name `fedseek serve` takes)."""
    out = tmp_path / "clinic-v1"
    out.mkdir()
    save_file(adapter_arrays(tiny_model_dir, seed=3), str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture
def served(
    tiny_model_dir: Path, peft_adapter: Path, tmp_path: Path
) -> Iterator[tuple[Serving, NodeLayout, TestClient]]:
    layout = NodeLayout(tmp_path / "state")
    policy = serving_access(layout)
    options = ServeOptions(model_dir=tiny_model_dir, adapters={"clinic-v1": peft_adapter}, max_slots=2, max_queue=4)
    serving = build_serving(options, audit=policy.audit)
    app = create_serving_app(lambda: serving, policy, name=tiny_model_dir.name)
    key = layout.api_key.read_text().strip()
    try:
        yield serving, layout, TestClient(app, headers={"authorization": f"Bearer {key}"})
    finally:
        serving.close()


def test_serving_stack_serves_the_model_and_its_adapters(
    served: tuple[Serving, NodeLayout, TestClient], tiny_model_dir: Path
) -> None:
    serving, _, client = served
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {tiny_model_dir.name, "clinic-v1"}
    assert models["clinic-v1"]["parent"] == tiny_model_dir.name
    reply = client.post("/v1/chat/completions", json={**CHAT, "model": "clinic-v1"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "clinic-v1" and 0 < reply.json()["usage"]["completion_tokens"] <= 2
    assert serving.host.model_name == tiny_model_dir.name


def test_serving_stack_keeps_keys_and_audit_in_its_layout(served: tuple[Serving, NodeLayout, TestClient]) -> None:
    _, layout, client = served
    assert mode(layout.api_key) == 0o600 and mode(layout.api_key_digests) == 0o600
    assert layout.api_key.read_text().strip() not in layout.api_key_digests.read_text()  # only digests are kept
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    refused = client.get("/v1/models", headers={"authorization": "Bearer not-a-key"})
    assert refused.status_code == 401
    actions = [json.loads(line)["action"] for line in layout.audit.read_text().splitlines()]
    assert actions == ["serve", "access.refused"]  # serving and refusals share one trail
    assert set(layout.root.iterdir()) <= set(layout.paths().values()) | set(companion_paths(layout.audit))


# ---- a federated node ------------------------------------------------------------------------


def test_built_node_lays_out_its_state_and_restores_adapters_after_a_restart(
    tiny_model_dir: Path, site_data_dir: Path, tmp_path: Path
) -> None:
    config = NodeConfig(
        name="site-a",
        model_dir=str(tiny_model_dir),
        data_dir=str(site_data_dir),
        state_dir=str(tmp_path / "state"),
        pki_dir=str(tmp_path / "unused-pki"),
    )
    layout = NodeLayout(tmp_path / "state")
    arrays = adapter_arrays(tiny_model_dir, seed=1)
    first = build_node(config)
    try:
        assert first.layout == layout
        assert first.host.model_name == tiny_model_dir.name and first.ledger.entries() == []
        first.deploy("v1", wire.sha256_of(arrays), arrays)
    finally:
        first.serving.close()
    assert mode(layout.agent_token) == 0o600
    assert (layout.adapters / "v1" / "adapter.safetensors").is_file()

    second: NodeService = build_node(config)  # the agent restarted: same state directory
    try:
        assert second.token == first.token  # the local ClientApp's token file stays valid
        assert list(second.host.adapters) == ["v1"]
        assert second.host.adapters["v1"].sha256 == wire.sha256_of(arrays)
        assert [m["id"] for m in second.models()] == [tiny_model_dir.name, "v1"]
        access = node_access(second)
        assert access.agent_token == second.token and access.site == "site-a"
        assert layout.api_key.exists()  # the first API key, made with the node's access policy
    finally:
        second.serving.close()
