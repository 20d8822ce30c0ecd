"""The scheduler: continuous batching, cancellation, back-pressure, seeds, stop strings; both runners."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from node.serving import Engine, Event, FastRunner, HFRunner, QueueFull, SamplingParams
from node.serving.sampling import TextStream
from tests.node.serving.conftest import ToyTokenizer, run_together, token_ids

LONG = [11, 12, 13, 14, 15, 16, 17, 18]
SHORT = [40, 41, 42]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def alone(runner: Any, tok: Any, prompt: list[int], params: SamplingParams) -> list[int]:
    with Engine(runner, tok) as engine:
        return engine.complete(prompt, params).token_ids


def joined_midway(runner: Any, tok: Any) -> tuple[list[int], list[int]]:
    """LONG runs; after its 3rd token SHORT joins the running batch."""
    engine = Engine(runner, tok)
    short_events: list[Event] = []
    finished = threading.Event()

    def on_short(ev: Event) -> None:
        short_events.append(ev)
        if ev.finish_reason:
            finished.set()

    long_tokens: list[int] = []
    with engine:
        for ev in engine.stream(LONG, greedy(12)):
            long_tokens.extend(ev.token_ids)
            if len(long_tokens) == 3:
                engine.submit(SHORT, greedy(5), on_event=on_short)
        assert finished.wait(30)
    return long_tokens, token_ids(short_events)


def test_request_joining_midway_matches_running_alone_fast(qwen: Any, tok: Any) -> None:
    runner = FastRunner(qwen, max_slots=4, max_len=64)
    long_alone, short_alone = alone(runner, tok, LONG, greedy(12)), alone(runner, tok, SHORT, greedy(5))
    assert joined_midway(runner, tok) == (long_alone, short_alone)


def test_request_joining_midway_matches_running_alone_generic(tiny_model_dir: Any) -> None:
    """The generic runner on the project's tiny DeepSeek-V3 (MLA + MoE)."""
    from node.model import load_model

    model, tok = load_model(tiny_model_dir)
    runner = HFRunner(model, max_slots=4, max_len=64)
    long_alone, short_alone = alone(runner, tok, LONG, greedy(12)), alone(runner, tok, SHORT, greedy(5))
    assert joined_midway(runner, tok) == (long_alone, short_alone)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([LONG]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert long_alone == ref[0, len(LONG) :].tolist()


def test_generic_runner_serves_mixed_adapters_like_model_host(tiny_model_dir: Any) -> None:
    from node.engine import ModelHost
    from node.model import load_model

    model, tok = load_model(tiny_model_dir)
    host = ModelHost(model, tok, model_name="tiny")
    torch.manual_seed(3)
    for version in ("v1", "v2"):
        arrays = {k: v + torch.randn(v.shape).numpy() * 0.5 for k, v in host.initial_arrays().items()}
        from federation.protocol import wire

        host.install(version, arrays, sha256=wire.sha256_of(arrays))
    messages = [{"role": "user", "content": "chest pain"}]
    expected = [host.generate(messages, model=m, max_tokens=5).output_ids for m in ("base", "v1", "v2")]
    runner = HFRunner(host.peft, max_slots=4, max_len=256, lock=host.lock)
    engine = Engine(runner, tok)
    params = SamplingParams(max_tokens=5)
    try:
        events = run_together(engine, [(host.prompt_ids(messages), params, a) for a in (None, "v1", "v2")])
    finally:
        engine.stop()
    assert [token_ids(e) for e in events] == expected


def test_cancel_frees_the_slot_at_once(qwen: Any, tok: Any) -> None:
    runner = FastRunner(qwen, max_slots=1, max_len=256)
    with Engine(runner, tok) as engine:
        stream = engine.stream(LONG, greedy(200))
        first = next(stream)
        assert engine.stats()["free_slots"] == 0
        assert engine.cancel(first.request_id)
        assert engine.stats()["free_slots"] == 1  # before the next step
        assert list(stream)[-1].finish_reason == "cancelled"  # tokens already queued, then the end
        assert engine.complete(SHORT, greedy(3)).finish_reason == "length"  # the freed slot serves the next one


def test_closing_an_async_stream_cancels(qwen: Any, tok: Any) -> None:
    """A client that disconnects mid-stream: the HTTP handler's generator is closed."""
    runner = FastRunner(qwen, max_slots=1, max_len=256)

    async def main(engine: Engine) -> None:
        agen = engine.astream(LONG, greedy(200))
        await agen.__anext__()
        await agen.aclose()
        assert engine.stats()["free_slots"] == 1

    with Engine(runner, tok) as engine:
        asyncio.run(main(engine))


def test_queue_full_raises(qwen: Any, tok: Any) -> None:
    engine = Engine(FastRunner(qwen, max_slots=1, max_len=64), tok, max_queue=2)  # not started: nothing drains
    for _ in range(2):
        engine.submit(SHORT, greedy(2), on_event=lambda ev: None)
    with pytest.raises(QueueFull):
        engine.submit(SHORT, greedy(2), on_event=lambda ev: None)
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit(SHORT, greedy(62), on_event=lambda ev: None)


def test_seeded_sampling_is_reproducible_whatever_the_batch(qwen: Any, tok: Any) -> None:
    runner = FastRunner(qwen, max_slots=4, max_len=64)
    hot = SamplingParams(max_tokens=10, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    solo = alone(runner, tok, LONG, hot)
    assert solo == alone(runner, tok, LONG, hot)
    engine = Engine(runner, tok)
    try:  # the same request in a batch with others (another slot, other rows sampled around it)
        other = SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True)
        events = run_together(engine, [(SHORT, other, None), (LONG, hot, None), (SHORT, greedy(4), None)])
    finally:
        engine.stop()
    assert token_ids(events[1]) == solo
    assert alone(runner, tok, LONG, SamplingParams(max_tokens=10, temperature=1.5, seed=9, ignore_eos=True)) != solo


def test_stop_string_and_eos(qwen: Any) -> None:
    runner = FastRunner(qwen, max_slots=2, max_len=64)
    free = alone(runner, ToyTokenizer(), LONG, greedy(10))
    text = ToyTokenizer().decode(free)
    stop = text[4:6]
    with Engine(runner, ToyTokenizer()) as engine:
        res = engine.complete(LONG, SamplingParams(max_tokens=10, stop=(stop,), ignore_eos=True))
        assert res.finish_reason == "stop" and res.text == text[: text.index(stop)]
        eos_engine_tokens = engine.complete(LONG, SamplingParams(max_tokens=10, stop_token_ids=(free[2],)))
    assert eos_engine_tokens.token_ids == free[:2] and eos_engine_tokens.finish_reason == "stop"


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    stream = TextStream(ToyTokenizer(), stop=("def",))
    out = [stream.push(i) for i in (0, 2, 3, 4)]  # a c d e: "de" might start "def"
    assert "".join(out) == "ac" and not stream.stopped
    assert stream.push(5) == "" and stream.stopped and stream.text == "ac"


def test_stop_checked_one_step_behind_changes_no_output(qwen: Any, tok: Any) -> None:
    """A request stops on a token while others run on: the engine already launched one more step
    for it, whose token must be dropped; its slot then serves a waiting request exactly as alone."""
    runner = FastRunner(qwen, max_slots=2, max_len=64)
    free = alone(runner, tok, LONG, greedy(10))
    other = alone(runner, tok, SHORT, greedy(12))
    third = alone(runner, tok, [60, 61], greedy(6))
    stopper = SamplingParams(max_tokens=10, stop_token_ids=(free[3],))
    engine = Engine(runner, tok)
    try:  # two slots: the third request waits for the stopper's slot
        events = run_together(engine, [(LONG, stopper, None), (SHORT, greedy(12), None), ([60, 61], greedy(6), None)])
    finally:
        engine.stop()
    first = free.index(free[3])  # the first occurrence stops it (the stop token is not output)
    assert token_ids(events[0]) == free[:first] and events[0][-1].finish_reason == "stop"
    assert token_ids(events[1]) == other and events[1][-1].finish_reason == "length"
    assert token_ids(events[2]) == third
    assert [ev.completion_tokens for ev in (events[0][-1], events[2][-1])] == [first, 6]
