"""The fast Qwen2 runner against the HF model: logits, greedy tokens, multi-LoRA rows, INT8."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from node.serving import Engine, FastRunner, SamplingParams, lora_from_arrays, lora_from_peft, make_runner
from node.serving.quant import quantize_int8
from node.serving.sampling import RowSampling
from tests.node.serving.conftest import hf_greedy, run_together, token_ids

PROMPTS = [[5, 17, 99, 3, 250, 7], [42, 8], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310]]


def test_prefill_and_batched_decode_match_hf(qwen: Any) -> None:
    runner = FastRunner(qwen, max_slots=4, max_len=64)
    first = runner.prefill([0, 1, 2], PROMPTS, [0, 0, 0], [RowSampling()] * 3)  # different lengths in one prefill
    assert runner.last_logits is not None
    with torch.no_grad():
        for row, p in enumerate(PROMPTS):
            ref = qwen(input_ids=torch.tensor([p])).logits[0, -1]
            assert (runner.last_logits[row] - ref).abs().max().item() < 1e-4
    tokens = [[int(t)] for t in first]
    for _ in range(7):  # rows sit at different positions in every step; the runner feeds its own tokens back
        step = runner.decode([0, 1, 2])
        for row in range(3):
            tokens[row].append(int(step[row]))
    assert tokens == [hf_greedy(qwen, p, 8) for p in PROMPTS]


def test_decode_leaves_rows_outside_the_step_alone(qwen: Any) -> None:
    """A slot not in the step (finished, or between requests) keeps its token and position."""
    runner = FastRunner(qwen, max_slots=4, max_len=64)
    runner.prefill([0, 1], PROMPTS[:2], [0, 0], [RowSampling()] * 2)
    pos_before, tok_before = int(runner._pos[1]), int(runner._tok[1])
    runner.decode([0])
    runner.decode([0])
    assert (int(runner._pos[1]), int(runner._tok[1])) == (pos_before, tok_before)
    assert int(runner._pos[0]) == len(PROMPTS[0]) + 2
    got = [int(runner.decode([0, 1])[1]) for _ in range(3)]  # slot 1 resumes exactly where it was
    assert got == hf_greedy(qwen, PROMPTS[1], 4)[1:]


def _peft_with_two_adapters(model: Any) -> Any:
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    peft = get_peft_model(model, cfg, adapter_name="v1")
    peft.add_adapter("v2", LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters a visible effect
            p.data.normal_(0, 0.5)
    return peft.eval()


def test_mixed_adapters_in_one_batch_equal_separate_peft_runs(qwen: Any, tok: Any) -> None:
    peft = _peft_with_two_adapters(qwen)
    expected = []
    for adapter in (None, "v1", "v2"):
        if adapter is None:
            with peft.disable_adapter():
                expected.append(hf_greedy(peft, PROMPTS[0], 6))
        else:
            peft.set_adapter(adapter)
            expected.append(hf_greedy(peft, PROMPTS[0], 6))
    assert len({tuple(e) for e in expected}) == 3  # the adapters do change the output

    runner = FastRunner(peft, max_slots=4, max_len=64)
    for name in ("v1", "v2"):
        runner.load_adapter(name, lora_from_peft(peft, name))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = Engine(runner, tok)
    try:
        events = run_together(engine, [(PROMPTS[0], params, a) for a in (None, "v1", "v2")])
    finally:
        engine.stop()
    assert [token_ids(e) for e in events] == expected


def test_adapter_from_wire_arrays_equals_peft(qwen: Any) -> None:
    peft = _peft_with_two_adapters(qwen)
    arrays = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(peft, adapter_name="v1").items()}
    from_wire = lora_from_arrays(arrays, scaling=8 / 4)
    from_peft = lora_from_peft(peft, "v1")
    assert from_wire.keys() == from_peft.keys()
    for key, (a, b) in from_peft.items():
        assert torch.allclose(from_wire[key][0], a) and torch.allclose(from_wire[key][1], b)


def test_int8_weights_error_bound(qwen: Any) -> None:
    w = qwen.model.layers[0].mlp.down_proj.weight
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()

    exact = _prompt_logits(FastRunner(qwen, max_slots=2, max_len=64, share_weights=False))
    int8 = _prompt_logits(FastRunner(qwen, max_slots=2, max_len=64, int8=True))
    rel = (int8 - exact).abs().max() / exact.abs().max()
    assert rel.item() < 0.05
    assert torch.corrcoef(torch.stack([int8, exact]))[0, 1].item() > 0.999


def _prompt_logits(runner: FastRunner) -> torch.Tensor:
    runner.prefill([0], [PROMPTS[0]], [0], [RowSampling()])
    assert runner.last_logits is not None
    return runner.last_logits[0]


def test_lora_rows_follow_the_live_adapters(qwen: Any, tok: Any) -> None:
    """Base rows with adapters loaded equal a runner without any; after unloading v1 the bank has a
    hole (only slot 2 live) and v2's rows still equal peft's v2."""
    peft = _peft_with_two_adapters(qwen)
    with peft.disable_adapter():
        base = hf_greedy(peft, PROMPTS[2], 5)
    peft.set_adapter("v2")
    v2 = hf_greedy(peft, PROMPTS[2], 5)
    runner = FastRunner(peft, max_slots=4, max_len=64)
    for name in ("v1", "v2"):
        runner.load_adapter(name, lora_from_peft(peft, name))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    with Engine(runner, tok) as engine:
        assert engine.complete(PROMPTS[2], params).token_ids == base
        engine.call(lambda: runner.unload_adapter("v1"))
        assert runner.lora.live() == 2 and runner.adapter_id("v2") == 2
        assert engine.complete(PROMPTS[2], params, adapter="v2").token_ids == v2
        assert engine.complete(PROMPTS[2], params).token_ids == base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_adapter_sync_between_steps_keeps_running_requests(tok: Any) -> None:
    """Loading an adapter mid-stream captures the new live set's decode graphs at once (warm-up
    runs over the running rows); the running request's tokens stay those of an undisturbed run,
    and the new version then serves like peft's."""
    from tests.node.serving.conftest import tiny_qwen

    peft = _peft_with_two_adapters(tiny_qwen()).cuda()
    peft.set_adapter("v1")
    v1 = hf_greedy(peft, PROMPTS[0], 6)
    runner = make_runner(peft, max_slots=4, max_len=64)  # graphs captured at load, as Serving builds it
    assert isinstance(runner, FastRunner)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    with Engine(runner, tok) as engine:
        expected = engine.complete(PROMPTS[2], params).token_ids
        graphs = len(runner._graphs)
        seen: list[int] = []

        def on_event(ev: Any) -> None:  # the engine thread, between two steps
            seen.extend(ev.token_ids)
            if len(seen) == 3:
                runner.sync_adapters(["v1"], {"v1": lora_from_peft(peft, "v1")})

        done = run_one(engine, PROMPTS[2], params, on_event)
        assert done and seen == expected
        assert len(runner._graphs) > graphs  # the live set's graphs came with the load
        assert engine.complete(PROMPTS[0], SamplingParams(max_tokens=6, ignore_eos=True), adapter="v1").token_ids == v1


def run_one(engine: Any, prompt: list[int], params: SamplingParams, on_event: Any) -> bool:
    import threading

    finished = threading.Event()

    def cb(ev: Any) -> None:
        on_event(ev)
        if ev.finish_reason is not None:
            finished.set()

    engine.submit(prompt, params, on_event=cb)
    return finished.wait(timeout=120)
