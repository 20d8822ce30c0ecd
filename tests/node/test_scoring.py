"""Teacher-forced scoring packs, pads and caches without changing a single log-probability."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from node import scoring
from node.engine import BASE, ModelHost
from node.model import load_model
from node.scoring import ScoringStats, prefix_kv, teacher_forced_logprobs
from tests.tiny_qwen import tiny_qwen2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
RESPONSE = [7, 3, 11]
PREFIX = [1, 5, 9, 2]
ROWS = [[4, 8, 15, 16], [23], [42, 4, 8], [4, 8, 15, 16], [99, 98, 97, 96, 95, 94, 93, 92], [6, 6]]


def direct(model: torch.nn.Module, prefix: Sequence[int], rows: Sequence[Sequence[int]]) -> np.ndarray:
    """One unpadded, uncached fp32 forward per row: the ground truth."""
    out = []
    for row in rows:
        ids = [*prefix, *row]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + RESPONSE])).logits[0].float()
        logp = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(RESPONSE)], dim=-1)
        out.append(logp.gather(-1, torch.tensor(RESPONSE)[:, None]).squeeze(-1).double().numpy())
    return np.array(out)


@pytest.mark.parametrize("budget", [1, 24, 10_000], ids=["row-per-forward", "some-rows", "one-forward"])
@pytest.mark.parametrize("with_prefix", [False, True], ids=["no-prefix", "prefix"])
def test_packed_scores_equal_one_forward_per_row(budget: int, with_prefix: bool) -> None:
    model = tiny_qwen2(seed=1)
    stats = ScoringStats()
    with torch.no_grad():
        kv = prefix_kv(model, PREFIX, CPU) if with_prefix else None
        got = teacher_forced_logprobs(
            model,
            ROWS,
            RESPONSE,
            pad_id=0,
            device=CPU,
            prefix=kv,
            prefix_len=len(PREFIX),
            max_batch_tokens=budget,
            stats=stats,
        )
    truth = direct(model, PREFIX if with_prefix else [], ROWS)
    np.testing.assert_allclose(got, truth, atol=1e-5, rtol=0)
    assert stats.rows == len(ROWS) - 1  # the repeated row is scored once...
    np.testing.assert_array_equal(got[0], got[3])  # ...and answers both
    if budget == 1:
        assert stats.forwards == stats.rows
    elif budget == 10_000:
        assert stats.forwards == 1
    else:
        assert 1 < stats.forwards < stats.rows
    assert stats.prefix_tokens == (len(PREFIX) if with_prefix else 0)


def test_bf16_normaliser_is_taken_in_fp32_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 logits, fp32 log-softmax normaliser, a few rows at a time: the same as all rows at once."""
    model = tiny_qwen2(seed=2, dtype=torch.bfloat16)
    monkeypatch.setattr(scoring, "_LSE_CHUNK_BYTES", 2 * len(RESPONSE) * 512 * 4)  # two rows per chunk
    with torch.no_grad():
        got = teacher_forced_logprobs(model, ROWS, RESPONSE, pad_id=0, device=CPU, max_batch_tokens=10_000)
        logits = torch.randn(5, 3, 512).bfloat16()
        np.testing.assert_allclose(
            scoring._logsumexp_fp32(logits).numpy(), torch.logsumexp(logits.float(), dim=-1).numpy(), rtol=1e-6
        )
    truth = direct(model, [], ROWS)  # bf16 model, fp32 softmax over bf16 logits
    np.testing.assert_allclose(got, truth, atol=0.05, rtol=0)  # bf16 batched vs unbatched matmuls
    assert got.dtype == np.float64


def test_rows_need_a_token_and_no_rows_score_nothing() -> None:
    model = tiny_qwen2()
    with pytest.raises(ValueError, match="at least one token"):
        teacher_forced_logprobs(model, [[1, 2], []], RESPONSE, pad_id=0, device=CPU)
    assert teacher_forced_logprobs(model, [], RESPONSE, pad_id=0, device=CPU).shape == (0, len(RESPONSE))


# ---- the engine: one tokenizer call, the prefix's KV cache kept between calls --------------------


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    model, tok = load_model(tiny_model_dir)
    return ModelHost(model, tok, model_name="tiny")


SYSTEM = {"role": "system", "content": "Triage assistant."}
TEXTS = ["Chest pain.", " leading space", "trailing space \n", "...", "胸痛，发热。", "a\n\nb", "<｜User｜> in text"]


def test_prompts_tokenized_in_one_call_are_what_prompt_ids_gives(host: ModelHost) -> None:
    prompts = [[SYSTEM, {"role": "user", "content": t}] for t in TEXTS]
    assert host._prompt_ids_many(prompts) == [host.prompt_ids(p) for p in prompts]
    assert host._template_parts([SYSTEM]) is not None  # the fast path was taken


def test_a_template_that_rewrites_content_falls_back_to_rendering_each_prompt(host: ModelHost) -> None:
    tok = host.tokenizer
    old = tok.chat_template
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n{% endfor %}"
    try:
        prompts = [[{"role": "user", "content": t}] for t in TEXTS]
        assert host._template_parts([]) is None
        assert host._prompt_ids_many(prompts) == [host.prompt_ids(p) for p in prompts]
    finally:
        tok.chat_template = old
        host.__dict__.pop("_template_memo", None)


def test_the_prefix_cache_is_kept_between_calls_for_the_same_adapter(host: ModelHost) -> None:
    response = [int(i) for i in host.tokenizer(" cardiology", add_special_tokens=False).input_ids]
    prompts = [[SYSTEM, {"role": "user", "content": t}] for t in TEXTS]
    host.forget_scoring_prefix()
    first = host.response_logprobs(prompts, response, model=BASE)
    assert host.last_scoring is not None and host.last_scoring.prefix_forwards == 1
    again = host.response_logprobs(prompts[:3], response, model=BASE)
    assert host.last_scoring.prefix_forwards == 0  # the explanation's later calls reuse it
    np.testing.assert_allclose(again, first[:3], atol=1e-6, rtol=0)
    host.forget_scoring_prefix()
    host.response_logprobs(prompts[:1], response, model=BASE)
    assert host.last_scoring.prefix_forwards == 1
