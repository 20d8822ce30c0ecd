"""What a SHAP feature is: a model token, a word or a sentence of the prompt.

Tokens are what the model sees but are often word pieces a reviewer cannot read; words and
sentences cost far fewer evaluations for the same prompt. shap's Text masker takes any
callable that answers ``tok(text, return_offsets_mapping=True)`` with ``input_ids`` and
``offset_mapping``, so words and sentences are regex "tokenizers" with that interface.

Chinese is written without spaces, so a regex would take a whole clause for one word: runs
containing CJK ideographs are segmented into words by jieba-rs (``rjieba``, a maintained
Rust port of jieba with the same dictionary), and sentences also end at Chinese full-width
terminators (。！？；), which need no space after them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any, Literal, get_args

import rjieba

Granularity = Literal["token", "word", "sentence"]
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)

# A word keeps inner joiners ("ST-elevation", "don't", "5.2", "mg/L"); other punctuation
# runs are features of their own so "fever," attributes to "fever", not to the comma.
_WORD = re.compile(r"\w+(?:[-'’.,/]\w+)*|[^\w\s]+")
# A sentence runs to a terminator (with closing quotes/brackets) before whitespace or the
# end, to a Chinese full-width terminator (no space follows those), or to a line break:
# notes are often lists without full stops.
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+[\"'”’)\]]*(?=\s|\Z)|[。！？；]+[”’」』）\]]*|(?=\n)|\Z)")
# CJK Unified Ideographs (and extension A, compatibility ideographs): text jieba segments.
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class RegexSplitter:
    """Pseudo-tokenizer whose pieces start at each ``pattern`` match and run to the next one.

    Whitespace goes with the piece before it (leading whitespace with the first), so the
    pieces concatenate exactly to the text and masking a piece keeps the layout around it.
    ``input_ids`` are piece indices: shap only needs their count, and "" has none, so the
    masker keeps no prefix or suffix token.
    """

    def __init__(self, pattern: re.Pattern[str], *, name: str) -> None:
        self.pattern = pattern
        self.name = name

    def starts(self, text: str) -> list[int]:
        """Where each piece starts."""
        return [m.start() for m in self.pattern.finditer(text)]

    def spans(self, text: str) -> list[tuple[int, int]]:
        starts = self.starts(text)
        if not starts:
            return []
        bounds = [0, *starts[1:], len(text)]
        return list(itertools.pairwise(bounds))

    def split(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.spans(text)]

    def __call__(self, text: str, return_offsets_mapping: bool = False, **_: Any) -> dict[str, list[Any]]:
        spans = self.spans(text)
        out: dict[str, list[Any]] = {"input_ids": list(range(len(spans)))}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out

    def __repr__(self) -> str:
        return f"RegexSplitter({self.name})"


class WordSplitter(RegexSplitter):
    """Words by regex, with every run that holds Chinese ideographs cut into jieba's words."""

    def starts(self, text: str) -> list[int]:
        out: list[int] = []
        for m in self.pattern.finditer(text):
            if not _CJK.search(m.group()):
                out.append(m.start())
                continue
            # jieba's offsets are in characters of the run (mixed runs such as "ECG正常" split too)
            out += [m.start() + int(start) for _, start, _ in rjieba.tokenize(m.group())]
        return out


WORDS = WordSplitter(_WORD, name="word")
SENTENCES = RegexSplitter(_SENTENCE, name="sentence")


def feature_tokenizer(granularity: Granularity, tokenizer: Any) -> Any:
    """The tokenizer shap's masker should split the prompt with at ``granularity``."""
    if granularity == "token":
        return tokenizer
    if granularity == "word":
        return WORDS
    if granularity == "sentence":
        return SENTENCES
    raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")


def feature_labels(features: Sequence[str], granularity: Granularity | None = None) -> list[str]:
    """How a report names each feature: its text, and where it repeats, its position too.

    "pain (word 7)" and "pain (word 12)" tell apart two occurrences a chart would otherwise
    show twice under one name; positions count the features that carry text, from 1.
    """
    unit = granularity or "feature"
    texts = [" ".join(f.split()) for f in features]
    counts: dict[str, int] = {}
    for t in texts:
        if t:
            counts[t] = counts.get(t, 0) + 1
    out, position = [], 0
    for t in texts:
        if t:
            position += 1
        out.append(f"{t} ({unit} {position})" if t and counts[t] > 1 else t)
    return out


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds Chinese ideographs (a report marks it ``lang="zh"`` for the font)."""
    return _CJK.search(text) is not None
