"""The MLA runner's Triton kernels through Triton's CPU interpreter (skipped where Triton is absent, as in CI).

As tests/node/serving/test_kernels.py: a fresh process with TRITON_INTERPRET=1 runs the kernels' own
self-test (latent write, absorbed attention in both forms with and without kv_b_proj LoRA, routing,
expert pairs), then MLARunners whose steps take the kernel paths against HF: the fused batch-1 step,
batched steps with the expert pairs, V3 group-limited routing and the split attention form, and
base/v1/v2 rows of one batch whose logits equal peft's forward (kv_b_proj's adapter in the kernel).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import tests.node.serving.interp_fix  # noqa: F401  (numpy >= 2.4 under Triton's interpreter)
import torch
torch.set_num_threads(1)
from node.serving import lora_from_peft, mla_kernels
from node.serving.mla import MLARunner
from tests.node.serving.conftest import hf_greedy
from tests.node.serving.test_mla_runner import (
    PROMPTS, _peft_with_two_adapters, assert_rows_match_peft, run_greedy, tiny_deepseek,
)

assert mla_kernels.available(torch.device("cpu")) is None, mla_kernels.available(torch.device("cpu"))
model = tiny_deepseek("v3", q_lora_rank=24, n_group=4, topk_group=2, rope_interleave=False)
runner = MLARunner(model, max_slots=4, max_len=64, fused=True, moe="pairs")
assert runner.fused_off is None and runner.kernels_off is None, (runner.fused_off, runner.kernels_off)
assert runner._check_real_shapes() is None  # what a CUDA load runs after tuning
assert run_greedy(runner, [PROMPTS[2]], 6)[0] == hf_greedy(model, PROMPTS[2], 6)  # the fused batch-1 step
runner = MLARunner(model, max_slots=4, max_len=64, fused=True, moe="pairs")
runner.attn_split = dict.fromkeys(runner.batch_buckets, True)  # W_UK/W_UV as batched matmuls around the kernel
assert run_greedy(runner, PROMPTS, 5) == [hf_greedy(model, p, 5) for p in PROMPTS]  # batched: kernels + pairs

peft = _peft_with_two_adapters(tiny_deepseek("v2", q_lora_rank=None))
runner = MLARunner(peft, max_slots=4, max_len=64, fused=True, moe="pairs")
runner.attn_split = dict.fromkeys(runner.batch_buckets, True)  # the kernel adds only kv_b_proj's LoRA value term
for name in ("v1", "v2"):
    runner.load_adapter(name, lora_from_peft(peft, name))
assert_rows_match_peft(runner, peft, 2)
print("ok")
"""


def test_mla_kernels_match_torch_and_hf_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_kernels_compile_for_hopper_without_spills() -> None:
    """Every kernel variant the runner can pick, at DeepSeek-V2-Lite's shapes, compiled ahead of time for
    sm_90a (no GPU needed: Triton's own ptxas): it compiles, and ptxas reports no register spills (an
    unrolled W_UK loop once spilled 0.9-2.5 KB a thread in every attention config)."""
    import re
    import tempfile

    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    from node.serving import mla_kernels as mk

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton ships no ptxas")

    def spills(fn: Any, types: dict[str, str], consts: dict[str, Any], warps: int) -> int:
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        compiled = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps},
        )
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(compiled.asm["ptx"])
            f.flush()
            info = subprocess.run(
                [str(ptxas), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
            )
        assert info.returncode == 0, info.stderr
        return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", info.stderr))

    bf, f32 = "*bf16", "*fp32"
    mla = {"q_ptr": bf, "q_stride": "i32", "w_ptr": bf, "cos_ptr": f32, "sin_ptr": f32, "pos_ptr": "*i64"}
    mla |= {"cache_ptr": bf, "c_slot": "i32", "c_pos": "i32", "out_ptr": bf, "out_stride": "i32", "scale": "fp32"}
    mla |= {"aid_ptr": "*i64", "la_ptr": bf, "lb_ptr": bf, "ext_ptr": bf, "ext_stride": "i32"}
    shape = {"R": 512, "RP": 512, "DN": 128, "DV": 128, "HALF": 32, "HP": 32, "HEADS": 16, "INTERLEAVED": True}
    for bw, bd, warps in mk.MLA_CONFIGS:
        for rank in (0, 16):
            for ext in (False, True):
                consts = {**shape, "RANK": rank, "RANKP": max(2, rank), "EXT": ext, "BLOCK_W": bw, "BLOCK_D": bd}
                assert spills(mk._mla_decode_kernel, mla, consts, warps) == 0, (bw, bd, warps, rank, ext)
    up = {"x_ptr": f32, "x_stride": "i32", "ln_ptr": bf, "eps": "fp32", "idx_ptr": "*i32", "w_ptr": bf, "act_ptr": bf}
    for bn, bk, warps in mk.MOE_UP_CONFIGS:
        consts = {"INTER": 1408, "HD": 2048, "K": 6, "NORM": True, "BLOCK_N": bn, "BLOCK_K": bk}
        assert spills(mk._moe_up_kernel, up, consts, warps) == 0, (bn, bk, warps)
    down = {"act_ptr": bf, "idx_ptr": "*i32", "wt_ptr": f32, "w_ptr": bf, "out_ptr": f32, "out_stride": "i32"}
    for bn, bk, warps in mk.MOE_DOWN_CONFIGS:
        consts = {"INTER": 1408, "HD": 2048, "K": 6, "RESIDUAL": True, "BLOCK_N": bn, "BLOCK_K": bk}
        assert spills(mk._moe_down_kernel, down, consts, warps) == 0, (bn, bk, warps)
    latent = {"a_ptr": bf, "a_stride": "i32", "ln_ptr": bf, "eps": "fp32", "cos_ptr": f32, "sin_ptr": f32}
    latent |= {"pos_ptr": "*i64", "cache_ptr": bf, "c_slot": "i32", "c_pos": "i32"}
    consts = {"OFF": 3072, "R": 512, "RP": 512, "HALF": 32, "HP": 32, "INTERLEAVED": True}
    assert spills(mk._latent_kernel, latent, consts, 4) == 0
    route = {"logits_ptr": f32, "bias_ptr": f32, "idx_ptr": "*i32", "wt_ptr": f32, "scaling": "fp32"}
    consts = {"E": 256, "EP": 256, "K": 8, "KP": 8, "G": 8, "GP": 8, "TG": 4, "V3": True, "NORM": True}
    assert spills(mk._route_kernel, route, consts, 4) == 0
