"""Contrastive explanations: why this response rather than that one?

"Why cardiology rather than neurology?" is a question about one number per prompt,
``log p(response | prompt) - log p(foil | prompt)``, so it is explained as a game of its own
(not as the difference of two separate explanations, whose Owen approximations would explore
different coalitions): the attributions sum to the change of that difference between the
fully masked prompt and the prompt (SHAP's efficiency), checked by explain_text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from explain.attribution import Attribution, Method, ScoreFn, explain_text, prompt_masker
from explain.granularity import Granularity


@dataclass(frozen=True)
class Contrast:
    """The two responses and their log-probabilities with the prompt and with it fully masked."""

    response: str
    foil: str
    response_logprob: float
    foil_logprob: float
    response_logprob_masked: float
    foil_logprob_masked: float

    @property
    def difference(self) -> float:
        """``log p(response) - log p(foil)`` with the prompt: what the attributions explain."""
        return self.response_logprob - self.foil_logprob

    @property
    def difference_masked(self) -> float:
        return self.response_logprob_masked - self.foil_logprob_masked

    def to_json(self) -> dict[str, Any]:
        return {
            "response": self.response,
            "foil": self.foil,
            "response_logprob": self.response_logprob,
            "foil_logprob": self.foil_logprob,
            "response_logprob_masked": self.response_logprob_masked,
            "foil_logprob_masked": self.foil_logprob_masked,
            "difference": self.difference,
            "difference_masked": self.difference_masked,
        }


class DifferenceScorer:
    """``log p(response) - log p(foil)`` per prompt, remembering both terms of each scored text."""

    def __init__(self, score_fn: ScoreFn, foil_score_fn: ScoreFn) -> None:
        self.score_fn = score_fn
        self.foil_score_fn = foil_score_fn
        self.seen: dict[str, tuple[float, float]] = {}

    def terms(self, prompts: Sequence[str]) -> np.ndarray:
        """``(len(prompts), 2)``: the summed log-probs of the response and of the foil."""
        prompts = list(prompts)
        a = np.asarray(self.score_fn(prompts), dtype=np.float64).reshape(len(prompts), -1).sum(axis=1)
        b = np.asarray(self.foil_score_fn(prompts), dtype=np.float64).reshape(len(prompts), -1).sum(axis=1)
        for text, x, y in zip(prompts, a.tolist(), b.tolist(), strict=True):
            self.seen[text] = (x, y)
        return np.stack([a, b], axis=1)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """``(len(prompts), 1)``: the difference, as explain_text's one output."""
        t = self.terms(prompts)
        return (t[:, 0] - t[:, 1]).reshape(-1, 1)

    def pair(self, text: str) -> tuple[float, float]:
        if text not in self.seen:
            self.terms([text])
        return self.seen[text]


def contrast_label(response: str, foil: str) -> str:
    return f"log p({response.strip()!r}) - log p({foil.strip()!r})"


def explain_contrast(
    score_fn: ScoreFn,
    foil_score_fn: ScoreFn,
    tokenizer: Any,
    prompt: str,
    *,
    response: str,
    foil: str,
    max_evals: int = 300,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    granularity: Granularity = "token",
    method: Method = "auto",
) -> tuple[Attribution, Contrast, DifferenceScorer]:
    """Attributions of ``log p(response) - log p(foil)`` to the prompt's features.

    ``score_fn``/``foil_score_fn`` give the per-token log-probs of the response/foil under each
    prompt. The Attribution has one output, the difference; the scorer is returned so that
    faithfulness checks score the same quantity.
    """
    if response == foil:
        raise ValueError("the response and the contrast are the same text: nothing to contrast")
    scorer = DifferenceScorer(score_fn, foil_score_fn)
    attribution = explain_text(
        scorer,
        tokenizer,
        prompt,
        output_tokens=[contrast_label(response, foil)],
        max_evals=max_evals,
        batch_size=batch_size,
        progress=progress,
        granularity=granularity,
        method=method,
    )
    n = len(attribution.features)
    full = scorer.pair(prompt)
    masked = scorer.pair(prompt_masker(tokenizer, prompt, granularity=granularity)([False] * n))
    contrast = Contrast(
        response=response,
        foil=foil,
        response_logprob=full[0],
        foil_logprob=full[1],
        response_logprob_masked=masked[0],
        foil_logprob_masked=masked[1],
    )
    return attribution, contrast, scorer
