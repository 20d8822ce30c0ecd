"""Is an explanation faithful to the model? Deletion/insertion curves and ERASER's metrics.

An attribution claims an order of importance; these checks test it with the model itself,
masking features exactly as the explainer did (``prompt_masker``) and scoring the masked
prompts with the same scorer:

* deletion curve: features removed most-positive first; a faithful order makes the
  probability fall fast (low area under the curve);
* insertion curve: features restored into the fully masked prompt in the same order; a
  faithful order makes it rise fast (high area);
* comprehensiveness at top-k (DeYoung et al. 2020, ERASER): how much the probability drops
  when the top-k features are removed; sufficiency: how much it drops when only they are kept
  (small is good). Both are points of the curves, so they cost no extra evaluations.

Curves are in probability (``to_probability`` of the scalar score: ``exp`` of a response's
log-probability, or the sigmoid of a log-probability difference for a contrast) against the
fraction of features moved, so both axes, and the areas, lie in [0, 1]. A random order is
scored too, as the reference a reviewer reads the areas against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ScalarScoreFn = Callable[[Sequence[str]], np.ndarray]
"""``score(prompts) -> (len(prompts),)``: the explained quantity (a log-probability or a difference)."""

MAX_POINTS = 10
"""Curve resolution: at most this many steps (+1), so the check costs at most ~4 * (MAX_POINTS + 1) evaluations."""


@dataclass(frozen=True)
class Curve:
    """Probability after moving the first ``steps[i]`` features of ``order`` (``fractions[i]`` of them)."""

    steps: list[int]
    fractions: list[float]
    probabilities: list[float]

    @property
    def auc(self) -> float:
        """Trapezoidal area under probability vs fraction of features: in [0, 1]."""
        return float(np.trapezoid(self.probabilities, self.fractions))

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "fractions": self.fractions,
            "probabilities": self.probabilities,
            "auc": self.auc,
        }


@dataclass(frozen=True)
class Faithfulness:
    """Deletion and insertion curves of one attribution, and comprehensiveness/sufficiency at ``top_k``."""

    quantity: str  # what the probabilities are, in words, e.g. "p('cardiology')"
    order: list[int]  # feature indices, most positive attribution first
    deletion: Curve
    insertion: Curve
    random_deletion: Curve  # the same checks with a seeded random order: the reference
    random_insertion: Curve
    top_k: int
    p_full: float  # the whole prompt
    p_empty: float  # every feature masked
    comprehensiveness: float  # p_full - p(top-k removed): large is faithful
    sufficiency: float  # p_full - p(only top-k kept): small is faithful
    evaluations: int

    def to_json(self) -> dict[str, Any]:
        return {
            "quantity": self.quantity,
            "order": self.order,
            "top_k": self.top_k,
            "p_full": self.p_full,
            "p_empty": self.p_empty,
            "deletion": self.deletion.to_json(),
            "insertion": self.insertion.to_json(),
            "random_deletion": self.random_deletion.to_json(),
            "random_insertion": self.random_insertion.to_json(),
            "deletion_auc": self.deletion.auc,
            "insertion_auc": self.insertion.auc,
            "comprehensiveness": self.comprehensiveness,
            "sufficiency": self.sufficiency,
            "evaluations": self.evaluations,
        }


def probability_of(logprob: np.ndarray) -> np.ndarray:
    """A response's probability from its (summed) log-probability."""
    return np.exp(np.minimum(logprob, 0.0))


def preference_of(difference: np.ndarray) -> np.ndarray:
    """p(response | response or foil) from ``log p(response) - log p(foil)``: the sigmoid."""
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * difference)))  # stable for large |difference|


def measure_faithfulness(
    score: ScalarScoreFn,
    render: Callable[[Sequence[bool]], str],
    values: np.ndarray,
    *,
    quantity: str,
    to_probability: Callable[[np.ndarray], np.ndarray] = probability_of,
    top_k: int = 5,
    max_points: int = MAX_POINTS,
    batch_size: int = 32,
    seed: int = 0,
) -> Faithfulness:
    """Deletion/insertion curves of the order ``values`` (one attribution per feature) claims.

    ``render(keep)`` is the masked prompt (``explain.attribution.prompt_masker``) and ``score``
    the scorer the attribution was computed with, reduced to one number per prompt.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(values)
    if n == 0:
        raise ValueError("no features to check")
    if top_k < 1 or max_points < 1:
        raise ValueError("top_k and max_points must be at least 1")
    k = min(top_k, n)
    order = [int(i) for i in np.argsort(-values, kind="stable")]
    rand = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    steps = sorted({round(float(x)) for x in np.linspace(0, n, min(n, max_points) + 1)} | {k})

    def keep_first(ordering: list[int], m: int, *, present: bool) -> tuple[bool, ...]:
        # insertion keeps the first m features; deletion keeps all but them
        chosen = set(ordering[:m])
        return tuple((i in chosen) == present for i in range(n))

    masks = {
        (name, m): keep_first(ordering, m, present=name.endswith("insertion"))
        for name, ordering in (
            ("deletion", order),
            ("insertion", order),
            ("random_deletion", rand),
            ("random_insertion", rand),
        )
        for m in steps
    }
    texts = {mask: render(mask) for mask in set(masks.values())}  # shared endpoints scored once
    unique = sorted(set(texts.values()))
    scores: dict[str, float] = {}
    for lo in range(0, len(unique), batch_size):
        chunk = unique[lo : lo + batch_size]
        out = np.asarray(score(chunk), dtype=np.float64).reshape(-1)
        if out.shape != (len(chunk),) or not np.all(np.isfinite(out)):
            raise ValueError("the faithfulness scorer must return one finite number per prompt")
        scores.update(zip(chunk, to_probability(out).astype(float).tolist(), strict=True))

    def curve(name: str) -> Curve:
        probs = [scores[texts[masks[(name, m)]]] for m in steps]
        return Curve(steps=list(steps), fractions=[m / n for m in steps], probabilities=probs)

    deletion, insertion = curve("deletion"), curve("insertion")
    p_full = deletion.probabilities[0]
    return Faithfulness(
        quantity=quantity,
        order=order,
        deletion=deletion,
        insertion=insertion,
        random_deletion=curve("random_deletion"),
        random_insertion=curve("random_insertion"),
        top_k=k,
        p_full=p_full,
        p_empty=insertion.probabilities[0],
        comprehensiveness=p_full - deletion.probabilities[steps.index(k)],
        sufficiency=p_full - insertion.probabilities[steps.index(k)],
        evaluations=len(unique),
    )
