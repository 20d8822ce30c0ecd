"""SHAP attributions of fixed response tokens to prompt features.

Exact Shapley values when enumerating every coalition fits the evaluation budget
(shap's ExactExplainer, as shap's own ``algorithm="auto"`` does for small inputs),
otherwise Owen values over the token/word/sentence hierarchy (PartitionExplainer).
The model is a black box ``score_fn`` so this module stays independent of how
(and where) the fine-tuned model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import shap

from explain.granularity import Granularity, feature_tokenizer
from federation.errors import FedSeekError

ScoreFn = Callable[[Sequence[str]], np.ndarray]
"""``score_fn(prompts) -> (len(prompts), T)`` log-probs of the T fixed response tokens."""

Method = Literal["auto", "exact", "partition"]
"""``exact``: Shapley values by enumerating all 2**n coalitions; ``partition``: Owen values;
``auto``: exact when 2**n fits in ``max_evals`` and n <= MAX_EXACT_FEATURES."""

MAX_EXACT_FEATURES = 12
_MASK_TOKEN = "..."
_RTOL = 1e-4
_ATOL = 1e-6


class NonFiniteScores(FedSeekError):
    """The model returned NaN or infinite log-probs, so no attribution would mean anything."""

    default_code = "non_finite_scores"


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make generated __eq__ ambiguous
class Attribution:
    """Attribution of each output token's log-prob to the prompt features.

    ``values[i, t]`` is feature ``i``'s SHAP value (``method``: "shapley" or "owen") for
    output token ``t``; per token, ``values[:, t].sum() == full_values[t] - base_values[t]``.
    """

    features: list[str]
    output_tokens: list[str]
    values: np.ndarray
    base_values: np.ndarray
    full_values: np.ndarray
    method: Literal["shapley", "owen"] = "owen"

    def __post_init__(self) -> None:
        n, t = len(self.features), len(self.output_tokens)
        if self.values.shape != (n, t):
            raise ValueError(f"values has shape {self.values.shape}, expected {(n, t)}")
        for name in ("base_values", "full_values"):
            if getattr(self, name).shape != (t,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {(t,)}")

    @property
    def total(self) -> np.ndarray:
        """Per-feature attribution to the whole response's log-prob (sum over tokens)."""
        return np.asarray(self.values.sum(axis=1))

    def top_features(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most influential features by ``|total|``; whitespace-only ones carry no content."""
        total = self.total
        order = sorted(range(len(self.features)), key=lambda i: -abs(float(total[i])))
        out: list[tuple[str, float]] = []
        for i in order:
            if len(out) >= k:
                break
            text = self.features[i].strip()
            if text:
                out.append((text, float(total[i])))
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for audit storage (floats, lists, strings only)."""
        return {
            "features": list(self.features),
            "output_tokens": list(self.output_tokens),
            "values": self.values.astype(float).tolist(),
            "base_values": self.base_values.astype(float).tolist(),
            "full_values": self.full_values.astype(float).tolist(),
            "total": self.total.astype(float).tolist(),
            "method": self.method,
        }


class _FaithfulText(shap.maskers.Text):  # type: ignore[misc]
    """``shap.maskers.Text`` whose unmasked rendering is exactly the prompt.

    The stock masker collapses all whitespace (newlines included) and duplicates
    characters that byte-level BPE splits over several tokens, so the model would
    be explained on a different text than it was asked about and the efficiency
    check against ``score_fn(prompt)`` would fail. Here segments partition the
    prompt and a masked run keeps its surrounding whitespace.
    """

    def token_segments(self, s: str) -> tuple[list[str], list[int]]:
        try:
            data = self.tokenizer(s, return_offsets_mapping=True)
        except (NotImplementedError, TypeError):
            return super().token_segments(s)  # type: ignore[no-any-return]
        ids = list(data["input_ids"])
        spans = [(0, 0) if o is None else (int(o[0]), int(o[1])) for o in data["offset_mapping"]]
        # Zero-width (special) tokens such as BOS/EOS sit where the next real token starts,
        # so they get "" rather than swallowing a neighbour's text.
        starts, nxt = [0] * len(spans), len(s)
        for i in reversed(range(len(spans))):
            a, b = spans[i]
            starts[i] = nxt if a == b else a
            nxt = starts[i]
        cuts = [0]
        for a in starts[1:]:
            cuts.append(max(cuts[-1], a))  # monotone, so overlapping tokens get "" not a copy
        cuts.append(len(s))
        return [s[cuts[i] : cuts[i + 1]] for i in range(len(ids))], ids

    def __call__(self, mask: Any, s: str) -> tuple[np.ndarray]:
        if self.output_type != "string":
            return super().__call__(mask, s)  # type: ignore[no-any-return]
        mask = np.array(self._standardize_mask(mask, s), dtype=bool)
        self._update_s_cache(s)
        if self.keep_prefix > 0:
            mask[: self.keep_prefix] = True
        if self.keep_suffix > 0:
            mask[-self.keep_suffix :] = True
        sep = getattr(self.tokenizer, "sep_token", None)
        parts: list[str] = []
        in_run, trail = False, ""  # trail: whitespace ending the current masked run
        for seg, keep in zip(self._segments_s.tolist(), mask.tolist(), strict=True):
            if not seg:  # a token sharing its character with a neighbour: nothing to mask
                continue
            if keep or seg == sep:
                parts += [trail, seg]
                in_run, trail = False, ""
            elif in_run and self.collapse_mask_token:
                body = seg.rstrip()
                trail = trail + seg if not body else seg[len(body) :]
            else:
                body = seg.lstrip()
                lead = seg[: len(seg) - len(body)]
                last = trail or next((p for p in reversed(parts) if p), "")
                if not lead and last and not last[-1].isspace():
                    lead = " "  # keep "..." a separate word, as shap's masker does
                parts += [trail, lead, self.mask_token]
                in_run, trail = True, body[len(body.rstrip()) :]
        parts.append(trail)
        return (np.array(["".join(parts)]),)


class _FlatText(_FaithfulText):
    """The same masking without the token hierarchy: shap's ExactExplainer then computes
    Shapley values (with a hierarchy it would compute exact Owen values)."""

    clustering = None


def explain_text(
    score_fn: ScoreFn,
    tokenizer: Any,
    prompt: str,
    *,
    output_tokens: Sequence[str],
    max_evals: int = 300,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    granularity: Granularity = "token",
    method: Method = "auto",
) -> Attribution:
    """SHAP values of each prompt feature for each of the fixed ``output_tokens``.

    Features are ``tokenizer`` tokens, words or sentences (see explain.granularity).
    Masked prompts replace feature runs by ``...``. Short prompts get exact Shapley
    values; longer ones Owen values over shap's text hierarchy, which need far fewer
    than 2**n evaluations. ``score_fn`` is called with at most ``batch_size`` prompts
    and about ``max_evals`` prompts in total (plus 2 for base/full values);
    ``progress(done, max_evals)`` follows the explainer's evaluations.
    """
    if max_evals < 2:
        raise ValueError("max_evals must be at least 2")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    names = list(output_tokens)
    if not names:
        raise ValueError("output_tokens must not be empty")

    def score(prompts: Sequence[str]) -> np.ndarray:
        out = np.asarray(score_fn(prompts), dtype=np.float64)
        if out.shape != (len(prompts), len(names)):
            raise ValueError(f"score_fn returned shape {out.shape}, expected {(len(prompts), len(names))}")
        if not np.all(np.isfinite(out)):
            bad = int((~np.isfinite(out)).sum())
            raise NonFiniteScores(f"the model returned {bad} non-finite log-probs; nothing to attribute")
        return out

    done = 0

    def f(masked: np.ndarray) -> np.ndarray:
        nonlocal done
        out = score([str(x) for x in masked])
        done += len(out)
        if progress is not None:
            progress(done, max(max_evals, done))
        return out

    masker = _masker(tokenizer, granularity)
    segments, _ = masker.token_segments(prompt)
    if not segments:
        raise ValueError("prompt has no tokens to attribute")
    n = len(segments)
    exact = resolve_method(method, n_features=n, max_evals=max_evals) == "shapley"
    # One prompt per call, as shap evaluates them, so batch-dependent kernels can't differ.
    (masked_all,) = masker(np.zeros(n, dtype=bool), prompt)[0]
    base, full = score([str(masked_all)])[0], score([prompt])[0]
    delta = full - base
    if n == 1:  # shap's text clustering needs two features; a lone feature gets all of it
        values = delta.reshape(1, -1)
    else:
        if exact:
            flat = _FlatText(masker.tokenizer, mask_token=_MASK_TOKEN, collapse_mask_token=True)
            explainer = shap.Explainer(f, flat, algorithm="exact", output_names=names)
        else:
            explainer = shap.Explainer(f, masker, algorithm="partition", output_names=names)
        budget = 2**n + 2 if exact else max_evals
        result = explainer([prompt], max_evals=budget, batch_size=batch_size, silent=True)
        values = np.asarray(result.values[0], dtype=np.float64).reshape(n, len(names))
    err = np.abs(values.sum(axis=0) - delta)
    if np.any(err > _RTOL * np.abs(delta) + _ATOL):
        raise RuntimeError(
            "SHAP efficiency check failed (masker/score_fn mismatch): "
            f"max |sum(values) - (full - base)| = {float(err.max()):.3g}"
        )
    return Attribution(
        features=[str(x) for x in segments],
        output_tokens=names,
        values=values,
        base_values=base,
        full_values=full,
        method="shapley" if exact or n == 1 else "owen",
    )


def _masker(tokenizer: Any, granularity: Granularity) -> _FaithfulText:
    return _FaithfulText(feature_tokenizer(granularity, tokenizer), mask_token=_MASK_TOKEN, collapse_mask_token=True)


def prompt_masker(
    tokenizer: Any, prompt: str, *, granularity: Granularity = "token"
) -> Callable[[Sequence[bool]], str]:
    """``keep -> text``: ``prompt`` with the features not kept replaced by ``...``, exactly as
    explain_text masks it (so faithfulness checks score the same texts the explainer did)."""
    masker = _masker(tokenizer, granularity)

    def render(keep: Sequence[bool]) -> str:
        (text,) = masker(np.asarray(keep, dtype=bool), prompt)[0]
        return str(text)

    return render


def count_features(tokenizer: Any, prompt: str, *, granularity: Granularity = "token") -> int:
    """How many features explain_text will attribute ``prompt`` to (no model call)."""
    return len(_masker(tokenizer, granularity).token_segments(prompt)[0])


def resolve_method(method: Method, *, n_features: int, max_evals: int) -> Literal["shapley", "owen"]:
    """Which values a request gets; ValueError when ``exact`` cannot fit the budget."""
    if method not in ("auto", "exact", "partition"):
        raise ValueError(f"unknown method {method!r}; use auto, exact or partition")
    fits = n_features <= MAX_EXACT_FEATURES and 2**n_features <= max_evals
    if method == "exact" and not fits:
        raise ValueError(
            f"exact Shapley values need 2**{n_features} evaluations (at most 2**{MAX_EXACT_FEATURES} allowed); "
            f"max_evals is {max_evals}: use method 'partition' or a coarser granularity"
        )
    return "shapley" if fits and method != "partition" else "owen"
