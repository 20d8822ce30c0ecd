"""The MLA + MoE runner (DeepSeek-V2/V3) against the HF model: logits, greedy tokens, latent cache,
several LoRA versions in one batch (kv_b_proj's adapter through the absorbed decode), slot reuse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from node.model import load_model, lora_target_modules
from node.serving import Engine, FastRunner, HFRunner, SamplingParams, lora_from_peft, make_runner, supports
from node.serving.mla import MLARunner
from node.serving.sampling import RowSampling
from tests.node.serving.conftest import hf_greedy, run_together, tiny_qwen, token_ids

PROMPTS = [[5, 17, 99, 3, 250, 7], [42, 8], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310]]
STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matmuls: a second thread only adds sync cost (measured 30 ms vs 400 ms a step on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def v3(tiny_model_dir: Path) -> Any:
    """The project's tiny DeepSeek-V3 (node/model.py), as the node loads it."""
    return load_model(tiny_model_dir)[0]


def tiny_deepseek(kind: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A seeded random DeepSeek-V2 or -V3 built from a config (vocab 512, 3 layers, the first dense)."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

    shape: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        **overrides,
    }
    torch.manual_seed(seed)
    cfg = (DeepseekV2Config if kind == "v2" else DeepseekV3Config)(**shape)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if kind == "v3":  # a visible correction bias, so the biased choice differs from the weights' ranking
        for layer in model.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def run_greedy(runner: Any, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill every prompt in one call (different lengths), then decode them together."""
    slots = list(range(len(prompts)))
    first = runner.prefill(slots, prompts, [0] * len(prompts), [RowSampling()] * len(prompts))
    tokens = [[int(t)] for t in first]
    for _ in range(steps - 1):  # the rows sit at different positions; the runner feeds its own tokens back
        step = runner.decode(slots)
        for row in slots:
            tokens[row].append(int(step[row]))
    return tokens


def test_prefill_and_batched_decode_match_hf(v3: Any) -> None:
    runner = MLARunner(v3, max_slots=4, max_len=64)
    tokens = run_greedy(runner, PROMPTS, STEPS)
    assert tokens == [hf_greedy(v3, p, STEPS) for p in PROMPTS]
    # the last step's logits against HF's forward over the whole sequence so far
    assert runner.last_logits is not None
    with torch.no_grad():
        for row, (p, out) in enumerate(zip(PROMPTS, tokens, strict=True)):
            ref = v3(input_ids=torch.tensor([p + out[:-1]])).logits[0, -1]
            assert (runner.last_logits[row] - ref).abs().max().item() < 1e-4


def test_without_a_grouped_kernel_prefill_is_never_captured_and_still_matches_hf(
    v3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where `F.grouped_mm` would loop on the host (fp32 on CUDA: ATen's fallback), prefill's experts
    take the loop: its graph capture could only fail, and a failed capture can leave the allocator's
    capture state behind for the next graph (seen on an H100 as an illegal memory access), so the
    runner does not try it; the loop gives HF's tokens."""
    import node.serving.moe as moe

    monkeypatch.setattr(moe, "grouped_mm_works", lambda device, dtype: False)
    runner = MLARunner(v3, max_slots=4, max_len=64)
    assert runner.prefill_graphs_off is not None and "host" in runner.prefill_graphs_off
    assert runner.capture(max_prompt=32) >= 0 and not runner._prefill_graphs
    assert run_greedy(runner, PROMPTS, STEPS) == [hf_greedy(v3, p, STEPS) for p in PROMPTS]


def test_the_cache_holds_the_latent_and_the_rope_key_as_hf_does(v3: Any) -> None:
    """Per token and layer kv_lora_rank + qk_rope_head_dim values (not full K/V), equal to HF's cache."""
    runner = MLARunner(v3, max_slots=2, max_len=64)
    cfg = v3.config
    prompt = PROMPTS[2]
    run_greedy(runner, [prompt], 3)  # prefill, then 2 decode steps: positions 0..len+1 written
    assert runner.latent.cache[0].shape == (2, 64, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    with torch.no_grad():
        seq = torch.tensor([prompt + hf_greedy(v3, prompt, 2)])
        layers = v3(input_ids=seq, use_cache=True).past_key_values.layers
    n = seq.shape[1]
    for i, layer in enumerate(layers):
        ours = runner.latent.cache[i][0, :n]
        assert torch.allclose(ours[:, : cfg.kv_lora_rank], layer.keys[0, 0], atol=1e-5)  # the normalised latent
        assert torch.allclose(ours[:, cfg.kv_lora_rank :], layer.values[0, 0], atol=1e-5)  # the rotated rope key


def test_slots_are_released_and_reused_through_the_engine(v3: Any, tok: Any) -> None:
    """Five requests on two slots: each slot serves several requests in turn, every output equals HF's."""
    runner = MLARunner(v3, max_slots=2, max_len=64)
    prompts = [*PROMPTS, [7, 7, 7], [100, 200, 300, 400]]
    lengths = [6, 3, 5, 4, 6]
    reqs = [(p, SamplingParams(max_tokens=n, ignore_eos=True), None) for p, n in zip(prompts, lengths, strict=True)]
    with Engine(runner, tok) as engine:
        got = [engine.complete(p, params).token_ids for p, params, _ in reqs[:1]]
    engine = Engine(runner, tok)
    try:
        got += [token_ids(e) for e in run_together(engine, reqs[1:])]
    finally:
        engine.stop()
    assert got == [hf_greedy(v3, p, n) for p, n in zip(prompts, lengths, strict=True)]


def _peft_with_two_adapters(model: Any) -> Any:
    """v1 on every MLA target (rank 4); v2 on kv_b_proj and o_proj only (rank 2); B non-zero."""
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(model)), "v1")
    peft.add_adapter("v2", LoraConfig(r=2, lora_alpha=8, target_modules=["kv_b_proj", "o_proj"]))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters a visible effect
            p.data.normal_(0, 0.3)
    return peft.eval()


def _peft_greedy(peft: Any, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    if adapter is None:
        with peft.disable_adapter():
            return hf_greedy(peft, prompt, n)
    peft.set_adapter(adapter)
    return hf_greedy(peft, prompt, n)


def serve_versions(peft: Any, tok: Any, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Base, v1 and v2 rows of each prompt through make_runner + Engine, adapters synced as Serving loads
    them: (the served tokens, peft's greedy tokens), 6 of each."""
    runner = make_runner(peft, max_slots=4, max_len=64)
    assert isinstance(runner, MLARunner)
    runner.sync_adapters(["v1", "v2"], {n: lora_from_peft(peft, n) for n in ("v1", "v2")})
    requests = [(p, a) for a in (None, "v1", "v2") for p in prompts]
    want = [_peft_greedy(peft, p, a, 6) for p, a in requests]
    engine = Engine(runner, tok)
    try:
        events = run_together(engine, [(p, SamplingParams(max_tokens=6, ignore_eos=True), a) for p, a in requests])
    finally:
        engine.stop()
    return [token_ids(e) for e in events], want


def assert_rows_match_peft(runner: Any, peft: Any, steps: int) -> None:
    """Base, v1 and v2 rows of PROMPTS[0] in one batch (v1, v2 loaded as ids 1, 2): every decode step's
    logits equal peft's forward over the row's sequence so far."""
    first = runner.prefill([0, 1, 2], [PROMPTS[0]] * 3, [0, 1, 2], [RowSampling()] * 3)
    seqs = [[*PROMPTS[0], int(t)] for t in first]
    for _ in range(steps):
        step = runner.decode([0, 1, 2])
        assert runner.last_logits is not None
        with torch.no_grad():
            for row, name in enumerate([None, "v1", "v2"]):
                ids = torch.tensor([seqs[row]], device=runner.device)
                if name is None:
                    with peft.disable_adapter():
                        ref = peft(input_ids=ids).logits[0, -1]
                else:
                    peft.set_adapter(name)
                    ref = peft(input_ids=ids).logits[0, -1]
                assert (runner.last_logits[row] - ref).abs().max().item() < 1e-4, name
        for row in range(3):
            seqs[row].append(int(step[row]))


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_two_adapter_versions_and_the_base_in_one_batch_equal_peft(kind: str, tiny_model_dir: Path, tok: Any) -> None:
    model = load_model(tiny_model_dir)[0] if kind == "v3" else tiny_deepseek("v2", q_lora_rank=None)
    peft = _peft_with_two_adapters(model)
    served, expected = serve_versions(peft, tok, PROMPTS[:2])
    assert len({tuple(e) for e in expected[::2]}) == 3  # each version changes the output
    assert served == expected


def test_kv_b_adapter_through_absorption_is_exact_per_row(tiny_model_dir: Path) -> None:
    """The decode step's logits with v2 (kv_b_proj + o_proj only) equal peft's forward over the sequence,
    while a base row and a v1 row share the batch."""
    peft = _peft_with_two_adapters(load_model(tiny_model_dir)[0])
    runner = MLARunner(peft, max_slots=4, max_len=64)
    for name in ("v1", "v2"):
        runner.load_adapter(name, lora_from_peft(peft, name))
    assert_rows_match_peft(runner, peft, 3)


def test_unloading_an_adapter_leaves_a_hole_and_the_others_serve(tiny_model_dir: Path, tok: Any) -> None:
    peft = _peft_with_two_adapters(load_model(tiny_model_dir)[0])
    runner = MLARunner(peft, max_slots=2, max_len=64)
    for name in ("v1", "v2"):
        runner.load_adapter(name, lora_from_peft(peft, name))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with Engine(runner, tok) as engine:
        engine.call(lambda: runner.unload_adapter("v1"))
        assert runner.lora.live() == 2 and runner.adapter_id("v2") == 2
        assert engine.complete(PROMPTS[2], params, adapter="v2").token_ids == _peft_greedy(peft, PROMPTS[2], "v2", 4)
        assert engine.complete(PROMPTS[2], params).token_ids == _peft_greedy(peft, PROMPTS[2], None, 4)


def test_deepseek_v2_shape_no_q_lora_softmax_gating_yarn_matches_hf() -> None:
    """V2-Lite's structure: q_proj (no q_lora), softmax top-k, 2 shared experts, a dense first layer,
    YaRN rope with mscale (the softmax scale changes), complex (interleaved) rotary."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    yarn |= {"beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    model = tiny_deepseek("v2", q_lora_rank=None, n_shared_experts=2, rope_parameters=yarn)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj is not None and attn.scaling != (16 + 8) ** -0.5
    runner = MLARunner(model, max_slots=4, max_len=128)
    assert run_greedy(runner, PROMPTS, STEPS) == [hf_greedy(model, p, STEPS) for p in PROMPTS]


def test_deepseek_v2_group_limited_greedy_matches_hf() -> None:
    model = tiny_deepseek("v2", q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    runner = MLARunner(model, max_slots=4, max_len=64)
    assert run_greedy(runner, PROMPTS, STEPS) == [hf_greedy(model, p, STEPS) for p in PROMPTS]


def test_deepseek_v3_group_limited_biased_routing_half_rotary_matches_hf() -> None:
    """V3 gating with several groups (topk_group of n_group), a correction bias, norm_topk_prob and
    routed_scaling_factor; rope_interleave off (rotate-half pairs)."""
    model = tiny_deepseek(
        "v3", q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_interleave=False
    )
    runner = MLARunner(model, max_slots=4, max_len=64)
    assert not runner.interleaved
    assert run_greedy(runner, PROMPTS, STEPS) == [hf_greedy(model, p, STEPS) for p in PROMPTS]


def test_seeded_sampling_equals_the_generic_runner(v3: Any) -> None:
    """The same counter-based draw as every runner: a seeded request gets HFRunner's tokens."""
    smp = [RowSampling(temperature=0.9, top_p=0.8, seed=1234), RowSampling(temperature=1.2, seed=7)]
    outs = []
    for runner in (MLARunner(v3, max_slots=2, max_len=64), HFRunner(v3, max_slots=2, max_len=64)):
        first = runner.prefill([0, 1], PROMPTS[:2], [0, 0], smp)
        toks = [[int(t) for t in first]]
        for _ in range(5):
            step = runner.decode([0, 1])
            toks.append([int(step[0]), int(step[1])])
        outs.append(toks)
    assert outs[0] == outs[1]


def test_make_runner_picks_the_runner_by_architecture(v3: Any) -> None:
    assert supports(v3) and supports(tiny_qwen())
    assert isinstance(make_runner(v3, max_slots=2, max_len=32), MLARunner)
    fast = make_runner(tiny_qwen(), max_slots=2, max_len=32)
    assert isinstance(fast, FastRunner) and not isinstance(fast, MLARunner)
    with pytest.raises(ValueError, match="INT8"):
        MLARunner(v3, max_slots=2, max_len=32, int8=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton kernels need a GPU")
def test_cuda_graphs_and_kernels_match_hf(tok: Any) -> None:
    """On the GPU, replayed from graphs: in fp32 (no rounding may flip a token) the fused batch-1 step and
    batched steps with each MoE form equal HF's greedy tokens, and three versions in one batch peft's; in
    bf16 through make_runner (every form timed at load) the logits stay within bf16 rounding of HF's."""
    from node.serving.moe import grouped_mm_works

    model = tiny_deepseek("v3", q_lora_rank=24, n_group=4, topk_group=2).cuda()
    expected = [hf_greedy(model, p, STEPS) for p in PROMPTS]
    fp32_grouped = grouped_mm_works(torch.device("cuda"), torch.float32)  # torch documents bf16 only
    for moe in ("pairs", "grouped") if fp32_grouped else ("pairs",):
        runner = MLARunner(model, max_slots=4, max_len=64, moe=moe)
        assert runner.use_graphs and runner.kernels_off is None and runner.fused_off is None, runner.kernels_off
        runner.capture(max_prompt=32)
        assert run_greedy(runner, [PROMPTS[2]], STEPS)[0] == expected[2]  # batch 1: the fused step
        assert run_greedy(runner, PROMPTS, STEPS) == expected
        assert any(key[0] == 1 for key in runner._graphs) and any(key[0] == 4 for key in runner._graphs)
    # bf16, the serving dtype, through make_runner (forms timed at load): logits within bf16 rounding of HF's
    model = model.to(torch.bfloat16)
    runner = make_runner(model, max_slots=4, max_len=64)
    assert isinstance(runner, MLARunner) and runner.kernels_off is None, getattr(runner, "kernels_off", None)
    tokens = run_greedy(runner, PROMPTS, 3)
    assert runner.last_logits is not None
    with torch.no_grad():
        for row, (p, out) in enumerate(zip(PROMPTS, tokens, strict=True)):
            ref = model(input_ids=torch.tensor([p + out[:-1]], device="cuda")).logits[0, -1].float()
            assert (runner.last_logits[row].float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    peft = _peft_with_two_adapters(tiny_deepseek("v2", q_lora_rank=None).cuda())
    served, want = serve_versions(peft, tok, PROMPTS[:1])
    assert served == want
