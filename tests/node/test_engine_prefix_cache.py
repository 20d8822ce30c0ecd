"""response_logprobs reuses the shared prompt prefix's KV cache and still scores exactly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.protocol import wire
from node.engine import BASE, ModelHost
from node.model import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = {"role": "system", "content": "You are a hospital triage assistant. Answer with one department name."}
TEXTS = [
    "Chest pain, troponin high, age 67.",
    "...",  # everything masked
    "Chest ... high, ... 67.",
    "Patient reports " + "intermittent chest pain radiating to the left arm, with dyspnoea; " * 8 + "ECG pending.",
    "Fever?",
]
PROMPTS = [[SYSTEM, {"role": "user", "content": t}] for t in TEXTS]
Messages = list[dict[str, str]]


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    model, tok = load_model(tiny_model_dir)
    return ModelHost(model, tok, model_name="tiny")


@pytest.fixture(scope="module")
def version(host: ModelHost) -> str:
    """A clearly non-zero adapter, so LoRA layers take part in the prefix and the rows."""
    rng = np.random.default_rng(5)
    arrays = {k: rng.normal(0.0, 0.2, v.shape).astype(np.float32) for k, v in host.initial_arrays().items()}
    host.install("v-cache", arrays, sha256=wire.sha256_of(arrays))
    return "v-cache"


def _response(host: ModelHost) -> list[int]:
    ids = [int(i) for i in host.tokenizer(" cardiology ward", add_special_tokens=False).input_ids]
    assert len(ids) >= 2
    return ids


def _direct(host: ModelHost, prompts: Sequence[Messages], response: list[int], model: str) -> np.ndarray:
    """One unpadded, uncached forward per prompt: the ground truth."""
    rows = []
    for p in prompts:
        ids = host.prompt_ids(p)
        with host.using(model) as m, torch.no_grad():
            logits = m(input_ids=torch.tensor([ids + response])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        at = torch.arange(len(ids) - 1, len(ids) - 1 + len(response))
        rows.append(logp[at, torch.tensor(response)].double().numpy())
    return np.array(rows)


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    n = 0
    while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


@pytest.fixture(scope="module")
def truth(host: ModelHost, version: str) -> dict[str, np.ndarray]:
    response = _response(host)
    return {name: _direct(host, PROMPTS, response, name) for name in (BASE, version)}


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("which", ["base", "adapter"])
def test_cached_scores_equal_uncached_scores(
    host: ModelHost, version: str, truth: dict[str, np.ndarray], which: str, batch_size: int
) -> None:
    model = BASE if which == "base" else version
    response = _response(host)
    seqs = [host.prompt_ids(p) for p in PROMPTS]
    assert len({len(s) for s in seqs}) == len(seqs)  # every row needs different padding

    cached = host.response_logprobs(PROMPTS, response, model=model, batch_size=batch_size)
    shared = _common_prefix(seqs)
    system_only = len(host.tokenizer(SYSTEM["content"], add_special_tokens=False).input_ids)
    assert shared > system_only  # BOS + system prompt + user tag are all shared...
    assert host.last_scoring_prefix_tokens == shared  # ...and all came from the cache

    host.use_prefix_cache = False
    try:
        plain = host.response_logprobs(PROMPTS, response, model=model, batch_size=batch_size)
        assert host.last_scoring_prefix_tokens == 0
    finally:
        host.use_prefix_cache = True

    assert cached.shape == (len(PROMPTS), len(response))
    np.testing.assert_allclose(cached, plain, atol=1e-4, rtol=0)
    np.testing.assert_allclose(cached, truth[model], atol=1e-4, rtol=0)


def test_adapter_changes_cached_scores(host: ModelHost, version: str, truth: dict[str, np.ndarray]) -> None:
    """Guards the comparison above: the prefix must be recomputed under the adapter asked for."""
    assert np.abs(truth[BASE] - truth[version]).max() > 1e-2
    tuned = host.response_logprobs(PROMPTS, _response(host), model=version)
    np.testing.assert_allclose(tuned, truth[version], atol=1e-4, rtol=0)


def test_prefix_cache_is_not_mutated_between_batches_or_calls(host: ModelHost, version: str) -> None:
    response = _response(host)
    prompts = [PROMPTS[0], *PROMPTS[1:], PROMPTS[0]]  # the same row in the first and the last batch
    first = host.response_logprobs(prompts, response, model=version, batch_size=2)
    second = host.response_logprobs(prompts, response, model=version, batch_size=2)
    assert host.last_scoring_prefix_tokens > 0
    np.testing.assert_allclose(first, second, atol=1e-6, rtol=0)
    np.testing.assert_allclose(first[0], first[-1], atol=1e-6, rtol=0)


def test_split_point_does_not_depend_on_the_batch(host: ModelHost, truth: dict[str, np.ndarray]) -> None:
    """A lone prompt splits where its masked variants do, so explain_text's single-prompt
    base/full scores are computed the same way as the batched ones."""
    response = _response(host)
    host.response_logprobs(PROMPTS, response, model=BASE)
    batched_split = host.last_scoring_prefix_tokens
    alone = host.response_logprobs(PROMPTS[3:4], response, model=BASE)
    assert host.last_scoring_prefix_tokens == batched_split > 0
    np.testing.assert_allclose(alone[0], truth[BASE][3], atol=1e-4, rtol=0)


def test_identical_prompts_keep_a_token_to_predict_from(host: ModelHost) -> None:
    """With nothing to split on (no user turn last), the shared prefix still stops one token short."""
    response = _response(host)
    prompt = [{"role": "system", "content": "Triage: chest pain, troponin high."}]
    got = host.response_logprobs([prompt] * 3, response, model=BASE)
    assert host.last_scoring_prefix_tokens == len(host.prompt_ids(prompt)) - 1
    ref = _direct(host, [prompt], response, BASE)[0]
    for row in got:
        np.testing.assert_allclose(row, ref, atol=1e-4, rtol=0)


def test_prompts_without_a_common_prefix_fall_back(host: ModelHost, version: str) -> None:
    response = _response(host)
    prompts = [[{"role": "user", "content": "Fever?"}], [SYSTEM, {"role": "user", "content": "Fever?"}]]
    seqs = [host.prompt_ids(p) for p in prompts]
    assert _common_prefix(seqs) < 2  # only BOS is shared
    got = host.response_logprobs(prompts, response, model=version)
    assert host.last_scoring_prefix_tokens == 0
    np.testing.assert_allclose(got, _direct(host, prompts, response, version), atol=1e-4, rtol=0)


def test_no_prompts(host: ModelHost) -> None:
    response = _response(host)
    assert host.response_logprobs([], response, model=BASE).shape == (0, len(response))
