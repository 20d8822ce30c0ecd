"""SHAP attributions of fixed response tokens to prompt features.

Exact Shapley values when enumerating every coalition fits the evaluation budget; otherwise
Shapley values estimated by KernelSHAP (paired sampling, exact small strata:
explain.estimators), or on request Owen values over shap's token/word/sentence hierarchy
(shap's PartitionExplainer). Exact and KernelSHAP coalitions are all chosen before any is
scored, so their prompts go to the model in as few calls as ``batch_size`` allows; every
distinct masked text is scored once. The model is a black box ``score_fn`` so this module
stays independent of how (and where) the fine-tuned model runs.

Why KernelSHAP rather than Owen values for long prompts, measured on the pretrained demo model
(3 demo notes, Spearman of per-feature totals with a shap KernelExplainer reference of 8,192
coalitions; KernelSHAP: mean of 5 seeds; tests/explain/test_kernelshap_agreement.py):

=================================  ===========  ===========  ===========
features, evaluations              100          200          500
=================================  ===========  ===========  ===========
24-28 words, Partition (Owen)      0.54-0.61    0.65-0.82    0.88-0.96
24-28 words, KernelSHAP            0.74-0.83    0.90-0.91    0.95-0.97
33-40 tokens, Partition (Owen)     0.20-0.53    0.33-0.59    0.60-0.81
33-40 tokens, KernelSHAP           0.53-0.66    0.74-0.77    0.90-0.92
=================================  ===========  ===========  ===========

Partition stops expanding its hierarchy when the budget runs out and spreads an unexpanded
group's credit evenly over its members, which flattens the ranking at the API's default budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import shap

from explain.estimators import exact_shapley, kernel_coalitions, kernel_shap
from explain.granularity import Granularity, feature_tokenizer
from federation.errors import FedSeekError

ScoreFn = Callable[[Sequence[str]], np.ndarray]
"""``score_fn(prompts) -> (len(prompts), T)`` log-probs of the T fixed response tokens."""

Method = Literal["auto", "exact", "kernel", "partition"]
"""``exact``: Shapley values by enumerating all 2**n coalitions; ``kernel``: Shapley values estimated
by KernelSHAP; ``partition``: Owen values over shap's text hierarchy; ``auto``: exact when 2**n fits
in ``max_evals`` and n <= MAX_EXACT_FEATURES, else kernel when the budget gives KernelSHAP at least
KERNEL_MIN_EVALS_PER_FEATURE coalitions per feature, else partition."""
Values = Literal["shapley", "kernel", "owen"]
"""What an Attribution's values are: exact Shapley values, KernelSHAP estimates of them, Owen values."""

MAX_EXACT_FEATURES = 12
KERNEL_MIN_EVALS_PER_FEATURE = 1.5
"""KernelSHAP's least-squares fit needs a coalition per feature to be determined at all; below 1.5
Owen values, which degrade to coarser groups instead, are the safer estimate. Measured on the demo
model (3 notes, word and token features, 50 evaluations: 1.2 to 2.0 coalitions per feature),
KernelSHAP's Spearman with the reference was 0.42-0.62 (mean of 5 seeds; single seeds as low as
0.02) against Owen values' 0.10-0.41."""
_MASK_TOKEN = "..."
_RTOL = 1e-4
_ATOL = 1e-6


class NonFiniteScores(FedSeekError):
    """The model returned NaN or infinite log-probs, so no attribution would mean anything."""

    default_code = "non_finite_scores"


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make generated __eq__ ambiguous
class Attribution:
    """Attribution of each output token's log-prob to the prompt features.

    ``values[i, t]`` is feature ``i``'s SHAP value (``method``: "shapley", "kernel" or "owen") for
    output token ``t``; per token, ``values[:, t].sum() == full_values[t] - base_values[t]``.
    """

    features: list[str]
    output_tokens: list[str]
    values: np.ndarray
    base_values: np.ndarray
    full_values: np.ndarray
    method: Values = "owen"
    evaluations: int = 0  # distinct masked prompts scored, base and full included

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
            "evaluations": self.evaluations,
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
        return (np.array([self.render(self._segments_s.tolist(), mask)]),)

    def render(self, segments: Sequence[str], mask: np.ndarray) -> str:
        """``segments`` joined with each run of masked ones replaced by the mask token."""
        keep = np.array(mask, dtype=bool)
        if self.keep_prefix > 0:
            keep[: self.keep_prefix] = True
        if self.keep_suffix > 0:
            keep[-self.keep_suffix :] = True
        sep = getattr(self.tokenizer, "sep_token", None)
        parts: list[str] = []
        in_run, trail = False, ""  # trail: whitespace ending the current masked run
        for seg, kept in zip(segments, keep.tolist(), strict=True):
            if not seg:  # a token sharing its character with a neighbour: nothing to mask
                continue
            if kept or seg == sep:
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
        return "".join(parts)

    def null_features(self, segments: Sequence[str]) -> np.ndarray:
        """Features whose masking never changes the text (zero-width tokens, kept prefix/suffix):
        their Shapley value is 0, so the estimators leave them out of the game."""
        null = np.array([not seg for seg in segments], dtype=bool)
        if self.keep_prefix > 0:
            null[: self.keep_prefix] = True
        if self.keep_suffix > 0:
            null[len(segments) - self.keep_suffix :] = True
        return null


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
    seed: int = 0,
) -> Attribution:
    """SHAP values of each prompt feature for each of the fixed ``output_tokens``.

    Features are ``tokenizer`` tokens, words or sentences (see explain.granularity). Masked
    prompts replace feature runs by ``...``. Short prompts get exact Shapley values, longer ones
    KernelSHAP estimates (or Owen values: ``method``, ``resolve_method``). At most ``max_evals``
    distinct prompts are scored in all, base (everything masked) and full prompt included, each
    once; ``score_fn`` gets at most ``batch_size`` of them per call, and exact and KernelSHAP
    coalitions are all known up front, so a large ``batch_size`` scores them in few calls.
    ``progress(done, max_evals)`` follows the explainer's evaluations. KernelSHAP's coalitions
    come from ``seed``: the same request gives the same values.
    """
    if max_evals < 2:
        raise ValueError("max_evals must be at least 2")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    names = list(output_tokens)
    if not names:
        raise ValueError("output_tokens must not be empty")
    masker = _masker(tokenizer, granularity)
    segments, _ = masker.token_segments(prompt)
    if not segments:
        raise ValueError("prompt has no tokens to attribute")
    segments = [str(x) for x in segments]
    n = len(segments)
    kind = resolve_method(method, n_features=n, max_evals=max_evals)
    masked_all = masker.render(segments, np.zeros(n, dtype=bool))
    if masker.render(segments, np.ones(n, dtype=bool)) != prompt:
        raise RuntimeError("SHAP efficiency check failed (masker mismatch): the unmasked rendering is not the prompt")

    seen: dict[str, np.ndarray] = {}  # every distinct text is scored once
    done = 0

    def score(texts: Sequence[str]) -> np.ndarray:
        out = np.asarray(score_fn(texts), dtype=np.float64)
        if out.shape != (len(texts), len(names)):
            raise ValueError(f"score_fn returned shape {out.shape}, expected {(len(texts), len(names))}")
        if not np.all(np.isfinite(out)):
            bad = int((~np.isfinite(out)).sum())
            raise NonFiniteScores(f"the model returned {bad} non-finite log-probs; nothing to attribute")
        seen.update(zip(texts, out, strict=True))
        return out

    def evaluate(texts: Sequence[str]) -> np.ndarray:
        nonlocal done
        todo = [t for t in dict.fromkeys(texts) if t not in seen]
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            score(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, max(max_evals, done))
        return np.stack([seen[t] for t in texts]) if texts else np.zeros((0, len(names)))

    # One prompt per call, as shap's Partition explainer scores them, so its own base and full
    # values (taken from `seen`) are the ones efficiency is checked against.
    base, full = score([masked_all])[0], score([prompt])[0]
    delta = full - base
    active = np.flatnonzero(~masker.null_features(segments))
    values = np.zeros((n, len(names)))
    if len(active) == 1:  # a lone feature gets all of it (shap's text clustering needs two)
        values[active[0]] = delta
    elif len(active) > 1 and kind == "owen":
        explainer = shap.Explainer(
            lambda masked: evaluate([str(x) for x in masked]), masker, algorithm="partition", output_names=names
        )
        result = explainer([prompt], max_evals=max_evals, batch_size=batch_size, silent=True)
        values = np.asarray(result.values[0], dtype=np.float64).reshape(n, len(names))
    elif len(active) > 1:
        m = len(active)
        if kind == "shapley":
            # bit i of row c: active feature i is present in coalition c
            sub = (np.arange(2**m)[:, None] >> np.arange(m)[None, :]) & 1 == 1
            weights = np.zeros(0)
        else:
            sub, weights = kernel_coalitions(m, max_evals - 2, np.random.default_rng(seed))
        masks = np.ones((len(sub), n), dtype=bool)  # null features: present or not, the same text
        masks[:, active] = sub
        scored = evaluate([masker.render(segments, z) for z in masks])
        if kind == "shapley":
            values[active] = exact_shapley(scored, m)
        else:
            values[active] = kernel_shap(sub, weights, scored, base, full)
    err = np.abs(values.sum(axis=0) - delta)
    if np.any(err > _RTOL * np.abs(delta) + _ATOL):
        raise RuntimeError(
            "SHAP efficiency check failed (masker/score_fn mismatch): "
            f"max |sum(values) - (full - base)| = {float(err.max()):.3g}"
        )
    return Attribution(
        features=segments,
        output_tokens=names,
        values=values,
        base_values=base,
        full_values=full,
        method="shapley" if len(active) <= 1 else kind,
        evaluations=len(seen),
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


def resolve_method(method: Method, *, n_features: int, max_evals: int) -> Values:
    """Which values a request gets; ValueError when ``exact`` cannot fit the budget."""
    if method not in ("auto", "exact", "kernel", "partition"):
        raise ValueError(f"unknown method {method!r}; use auto, exact, kernel or partition")
    fits = n_features <= MAX_EXACT_FEATURES and 2**n_features <= max_evals
    if method == "exact" and not fits:
        raise ValueError(
            f"exact Shapley values need 2**{n_features} evaluations (at most 2**{MAX_EXACT_FEATURES} allowed); "
            f"max_evals is {max_evals}: use method 'kernel' or 'partition' or a coarser granularity"
        )
    if method == "partition":
        return "owen"
    if method == "kernel":
        return "kernel"
    if fits:
        return "shapley"
    return "kernel" if max_evals - 2 >= KERNEL_MIN_EVALS_PER_FEATURE * n_features else "owen"
