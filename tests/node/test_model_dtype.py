"""Weight precision (`NodeConfig.dtype`, `fedseek serve --dtype`): what loads, what is refused, and fp16
serving through the fast runner against HF's own fp16 greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from federation.protocol.config import NodeConfig, from_json
from node.model import ModelLoadError, load_model, pick_dtype
from node.serving import FastRunner
from node.serving.sampling import RowSampling
from tests.node.serving.conftest import EOS, hf_greedy
from tests.tiny_qwen import tiny_qwen2


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("auto", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)],
)
def test_weights_load_in_the_chosen_precision(tiny_model_dir: Path, dtype: str, expected: torch.dtype) -> None:
    model, _ = load_model(tiny_model_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {expected}


def test_auto_is_bf16_on_cuda_and_fp32_on_the_cpu() -> None:
    assert pick_dtype("cuda:0") == torch.bfloat16 and pick_dtype("cpu") == torch.float32
    assert pick_dtype("cuda", "float16") == torch.float16


def test_an_unknown_precision_is_refused_in_one_line(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^dtype must be one of auto, bfloat16, float16, float32, not 'fp8'$"):
        load_model(tiny_model_dir, dtype="fp8")


def test_node_config_carries_the_precision() -> None:
    fields = {"name": "site-a", "model_dir": "m", "data_dir": "d", "state_dir": "s", "pki_dir": "p"}
    assert from_json(NodeConfig, {**fields, "dtype": "float16"}).dtype == "float16"
    assert from_json(NodeConfig, fields).dtype == "auto"


def test_fp16_fast_runner_decodes_as_hf_does_in_fp16() -> None:
    """The fast path computes in the weights' dtype: in fp16 its greedy tokens are HF's fp16 greedy tokens."""
    model = tiny_qwen2(dtype=torch.float16, vocab_size=512, max_position_embeddings=256, eos_token_id=EOS)
    prompts = [[5, 17, 99, 3, 250, 7], [42, 8], [300, 301, 302, 303, 304, 305, 306]]
    runner = FastRunner(model, max_slots=4, max_len=64)
    first = runner.prefill([0, 1, 2], prompts, [0, 0, 0], [RowSampling()] * 3)
    tokens = [[int(t)] for t in first]
    for _ in range(7):
        step = runner.decode([0, 1, 2])
        for row in range(3):
            tokens[row].append(int(step[row]))
    assert tokens == [hf_greedy(model, p, 8) for p in prompts]
