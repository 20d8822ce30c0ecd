"""What a SHAP feature is: a model token, a word or a sentence of the prompt.

Tokens are what the model sees but are often word pieces a reviewer cannot read; words and
sentences cost far fewer evaluations for the same prompt. shap's Text masker takes any
callable that answers ``tok(text, return_offsets_mapping=True)`` with ``input_ids`` and
``offset_mapping``, so words and sentences are regex "tokenizers" with that interface.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Literal, get_args

Granularity = Literal["token", "word", "sentence"]
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)

# A word keeps inner joiners ("ST-elevation", "don't", "5.2", "mg/L"); other punctuation
# runs are features of their own so "fever," attributes to "fever", not to the comma.
_WORD = re.compile(r"\w+(?:[-'’.,/]\w+)*|[^\w\s]+")
# A sentence runs to a terminator (with closing quotes/brackets) before whitespace or the
# end, or to a line break: notes are often lists without full stops.
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+[\"'”’)\]]*(?=\s|\Z)|(?=\n)|\Z)")


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

    def spans(self, text: str) -> list[tuple[int, int]]:
        starts = [m.start() for m in self.pattern.finditer(text)]
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


WORDS = RegexSplitter(_WORD, name="word")
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
