"""Empirical privacy check: canaries and a membership-inference test against a trained model.

A claimed epsilon is a proof about the training algorithm; this measures what a model leaks.
Random canary records are split at random into inserted and held out, the model is trained
with the inserted ones, and a score (e.g. how much training lowered a canary's loss) is used
to guess membership. From the guesses come the AUC, the TPR at a low FPR and a lower bound on
epsilon: any (epsilon, delta)-DP training forces TPR <= e^epsilon FPR + delta for every
threshold, so a (TPR, FPR) pair that breaks this, with Clopper-Pearson confidence, proves
epsilon is at least log((TPR - delta) / FPR). With tens of canaries the bound is weak (it can
only show leaks far above epsilon = 1); its job is to catch a broken DP pipeline, and a
non-private baseline run shows the test does detect memorisation.

Training and scoring are callables, so this module needs no model code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from scipy.stats import beta  # type: ignore[import-untyped,unused-ignore]

Item = TypeVar("Item")
Model = TypeVar("Model")


@dataclass(frozen=True)
class Canary:
    """A record nobody could guess: a unique prompt and a secret answer of rare words."""

    prompt: str
    secret: str


@dataclass(frozen=True)
class MembershipResult:
    """Membership inference against one trained model; higher scores mean "was trained on"."""

    members: int
    nonmembers: int
    auc: float
    low_fpr: float
    tpr_at_low_fpr: float
    epsilon_lower_bound: float  # 0.0 when nothing is proven at this confidence
    claimed_epsilon: float  # math.inf for a non-private run
    delta: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite claimed epsilon (no DP) becomes None."""
        data = asdict(self)
        data["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        return data


def make_canaries(count: int, *, words: Sequence[str], words_per_secret: int = 2, seed: int = 0) -> list[Canary]:
    """Canaries whose secrets share no word, so learning one says nothing about another."""
    pool = sorted(set(words))
    if count < 1 or words_per_secret < 1:
        raise ValueError("count and words_per_secret must be >= 1")
    if count * words_per_secret > len(pool):
        raise ValueError(f"{count} canaries of {words_per_secret} words need more than {len(pool)} distinct words")
    rng = random.Random(seed)
    chosen = rng.sample(pool, count * words_per_secret)
    ids = rng.sample(range(16**8), count)
    return [
        Canary(
            prompt=f"Canary record {ids[i]:08x}: what is the access code?",
            secret=" ".join(chosen[i * words_per_secret : (i + 1) * words_per_secret]),
        )
        for i in range(count)
    ]


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """Probability that a random member outscores a random non-member (ties count half)."""
    if not members or not nonmembers:
        raise ValueError("need at least one member and one non-member score")
    wins = sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


def clopper_pearson(successes: int, trials: int, *, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial interval; each side holds alpha / 2."""
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


def epsilon_lower_bound(
    members: Sequence[float], nonmembers: Sequence[float], *, delta: float, confidence: float = 0.95
) -> float:
    """Largest epsilon that some threshold proves with the given confidence (0.0 if none).

    Every observed score is tried as a threshold, so the intervals are Bonferroni-corrected
    over thresholds: choosing the best one after looking cannot inflate the bound.
    """
    thresholds = sorted(set(members) | set(nonmembers))
    alpha = (1 - confidence) / len(thresholds)
    best = 0.0
    for t in thresholds:
        tpr_lo, _ = clopper_pearson(sum(s >= t for s in members), len(members), alpha=alpha)
        _, fpr_hi = clopper_pearson(sum(s >= t for s in nonmembers), len(nonmembers), alpha=alpha)
        for num, den in ((tpr_lo - delta, fpr_hi), (1 - fpr_hi - delta, 1 - tpr_lo)):
            if num > 0 and den > 0:
                best = max(best, math.log(num / den))
    return best


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], *, max_fpr: float) -> float:
    """Best empirical TPR among thresholds whose empirical FPR is at most ``max_fpr``."""
    best = 0.0
    for t in sorted(set(members) | set(nonmembers)):
        if sum(s >= t for s in nonmembers) / len(nonmembers) <= max_fpr:
            best = max(best, sum(s >= t for s in members) / len(members))
    return best


def membership_result(
    members: Sequence[float],
    nonmembers: Sequence[float],
    *,
    claimed_epsilon: float,
    delta: float,
    confidence: float = 0.95,
    low_fpr: float = 0.1,
) -> MembershipResult:
    """Summarise member and non-member scores next to the epsilon the training claimed."""
    return MembershipResult(
        members=len(members),
        nonmembers=len(nonmembers),
        auc=auc(members, nonmembers),
        low_fpr=low_fpr,
        tpr_at_low_fpr=tpr_at_fpr(members, nonmembers, max_fpr=low_fpr),
        epsilon_lower_bound=epsilon_lower_bound(members, nonmembers, delta=delta, confidence=confidence),
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        confidence=confidence,
    )


def run_canary_audit(
    canaries: Sequence[Item],
    *,
    train: Callable[[Sequence[Item]], Model],
    score: Callable[[Model, Sequence[Item]], Sequence[float]],
    claimed_epsilon: float,
    delta: float,
    seed: int = 0,
    confidence: float = 0.95,
) -> MembershipResult:
    """Insert a random half of ``canaries``, train, and test membership on all of them.

    The split is random so that, to the model, inserted and held-out canaries differ only in
    membership; ``train`` gets the inserted ones (to add to the real data), ``score`` returns
    one membership score per canary, higher meaning more likely trained on.
    """
    if len(canaries) < 2:
        raise ValueError("need at least two canaries (one inserted, one held out)")
    order = list(range(len(canaries)))
    random.Random(seed).shuffle(order)
    inserted = sorted(order[: len(order) // 2])
    held_out = sorted(order[len(order) // 2 :])
    model = train([canaries[i] for i in inserted])
    scores = list(score(model, canaries))
    if len(scores) != len(canaries) or not all(math.isfinite(s) for s in scores):
        raise ValueError("score must return one finite score per canary")
    return membership_result(
        [scores[i] for i in inserted],
        [scores[i] for i in held_out],
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        confidence=confidence,
    )
