"""The fused Triton decode kernels, run through Triton's CPU interpreter (skipped where Triton is absent).

The interpreter must be chosen before Triton compiles anything, so each check runs in a fresh
process with TRITON_INTERPRET=1: the kernels' own self-test, then a FastRunner whose batch-1
steps take the fused path against HF greedy decoding.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import tests.node.serving.interp_fix  # noqa: F401  (numpy >= 2.4 under Triton's interpreter)
import torch
from node.serving import FastRunner, kernels
from node.serving.sampling import RowSampling
from tests.node.serving.conftest import hf_greedy, tiny_qwen

assert kernels.available(torch.device("cpu")) is None, kernels.available(torch.device("cpu"))
model = tiny_qwen()
runner = FastRunner(model, max_slots=2, max_len=96, fused=True)
assert runner.fused_off is None, runner.fused_off
prompt = [(7 * i) % 500 + 2 for i in range(60)]
tokens = [int(runner.prefill([0], [prompt], [0], [RowSampling()])[0])]
for _ in range(8):  # from position 60 past one 64-key block of the attention kernel
    tokens.append(int(runner.decode([0])[0]))
assert tokens == hf_greedy(model, prompt, 9), tokens

# the LoRA/SwiGLU epilogue kernel in a mixed batch (base, v1, v2 rows) against the torch path
from node.serving import lora_from_peft
from tests.node.serving.test_fast_runner import PROMPTS, _peft_with_two_adapters

peft = _peft_with_two_adapters(tiny_qwen())
logits = []
for fused in (True, False):
    r = FastRunner(peft, max_slots=4, max_len=64, fused=fused, share_weights=False)
    assert (r.lora_kernel_off is None) == fused, r.lora_kernel_off
    for name in ("v1", "v2"):
        r.load_adapter(name, lora_from_peft(peft, name))
    r.prefill([0, 1, 2], PROMPTS, [0, 1, 2], [RowSampling()] * 3)
    steps = [r.last_logits.clone()]
    for _ in range(2):
        r.decode([0, 1, 2])
        steps.append(r.last_logits[:3].clone())
    logits.append(torch.cat(steps))
assert (logits[0] - logits[1]).abs().max().item() < 1e-4
print("ok")
"""


def test_fused_batch1_path_matches_hf_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
