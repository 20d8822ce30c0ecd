"""Logprobs from the engine: the log_softmax of the very logits the tokens were sampled from, on both
runners, only for the rows that asked; `max_tokens=None` runs to the end of the context."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from node.serving import Constraint, Engine, FastRunner, HFRunner, SamplingParams
from tests.node.serving.conftest import CharTokenizer, run_together, tiny_qwen, token_ids

PROMPT = [5, 9, 14, 3, 77, 21]


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_qwen(seed=4)


def make_runner(model: Any, kind: str, max_len: int = 64) -> Any:
    if kind == "fast":
        return FastRunner(model, max_slots=4, max_len=max_len, cuda_graphs=False, fused=False)
    return HFRunner(model, max_slots=4, max_len=max_len)


def reference(model: Any, prompt: list[int], out: list[int]) -> torch.Tensor:
    """HF's log_softmax over the next-token logits at each output position (teacher forcing)."""
    ids = torch.tensor([prompt + out])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("kind", ["fast", "hf"])
def test_logprobs_are_the_models_log_softmax_and_only_for_rows_that_asked(model: Any, kind: str) -> None:
    engine = Engine(make_runner(model, kind), CharTokenizer())
    asked = SamplingParams(max_tokens=8, logprobs=3, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, logprobs=0, temperature=1.0, seed=2, ignore_eos=True)
    plain = SamplingParams(max_tokens=8, ignore_eos=True)
    try:
        events = run_together(engine, [(PROMPT, asked, None), (PROMPT[:4], sampled, None), (PROMPT, plain, None)])
    finally:
        engine.stop()
    for evs, prompt, k in ((events[0], PROMPT, 3), (events[1], PROMPT[:4], 0)):
        out = token_ids(evs)
        lps = [lp for e in evs for lp in e.logprobs]
        assert [lp.token for lp in lps] == out and len(out) == 8
        ref = reference(model, prompt, out)
        for i, lp in enumerate(lps):
            assert lp.logprob == pytest.approx(float(ref[i, out[i]]), abs=1e-4)
            assert len(lp.top) == k
            values, ids = ref[i].topk(k) if k else (ref[i, :0], ref[i, :0].long())
            assert [t for t, _ in lp.top] == ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert all(lp.top[0][0] == lp.token for e in events[0] for lp in e.logprobs)  # greedy took the top token
    assert all(e.logprobs == () for e in events[2])  # did not ask: nothing computed for it


def test_logprob_equals_log_softmax_of_the_sampled_logits_exactly(model: Any) -> None:
    runner = make_runner(model, "fast")
    engine = Engine(runner, CharTokenizer())
    try:
        events = run_together(engine, [(PROMPT, SamplingParams(max_tokens=1, logprobs=2), None)])
    finally:
        engine.stop()
    (lp,) = [lp for e in events[0] for lp in e.logprobs]
    logp = torch.log_softmax(runner.last_logits[0].float(), dim=-1)  # the prefill's logits, which sampled it
    assert lp.logprob == float(logp[lp.token])


def test_constrained_logprobs_are_raw_model_logprobs(model: Any) -> None:
    """With a grammar the token is the best ALLOWED one; its logprob is still the model's own."""
    engine = Engine(make_runner(model, "fast"), CharTokenizer())
    params = SamplingParams(max_tokens=None, logprobs=1, constraint=Constraint.json_object())
    try:
        events = run_together(engine, [(PROMPT, params, None)])
    finally:
        engine.stop()
    out = token_ids(events[0])
    ref = reference(model, PROMPT, out)
    lps = [lp for e in events[0] for lp in e.logprobs]
    assert [lp.logprob for lp in lps] == pytest.approx([float(ref[i, t]) for i, t in enumerate(out)], abs=1e-4)
    assert any(lp.top[0][0] != lp.token for lp in lps)  # the mask overrode the model's favourite somewhere


@pytest.mark.parametrize("kind", ["fast", "hf"])
def test_max_tokens_none_runs_to_the_end_of_the_context(model: Any, kind: str) -> None:
    engine = Engine(make_runner(model, kind, max_len=32), CharTokenizer())
    try:
        events = run_together(engine, [(PROMPT, SamplingParams(max_tokens=None, ignore_eos=True), None)])
    finally:
        engine.stop()
    assert len(token_ids(events[0])) == 32 - len(PROMPT) and events[0][-1].finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        Engine(make_runner(model, kind, max_len=6), CharTokenizer()).submit(
            PROMPT, SamplingParams(max_tokens=None), on_event=print
        )
