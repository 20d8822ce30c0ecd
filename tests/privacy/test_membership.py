"""Membership-inference statistics: AUC, Clopper-Pearson and the epsilon lower bound, on known scores."""

from __future__ import annotations

import math

import pytest

from privacy.membership import (
    Canary,
    auc,
    clopper_pearson,
    epsilon_lower_bound,
    make_canaries,
    membership_result,
    run_canary_audit,
    tpr_at_fpr,
)

WORDS = [f"word{i:03d}" for i in range(200)]


def test_canaries_have_unique_prompts_and_disjoint_secrets() -> None:
    canaries = make_canaries(40, words=WORDS, words_per_secret=3, seed=7)
    assert len({c.prompt for c in canaries}) == 40
    words = [w for c in canaries for w in c.secret.split()]
    assert len(words) == len(set(words)) == 120
    assert make_canaries(40, words=WORDS, words_per_secret=3, seed=7) == canaries
    with pytest.raises(ValueError, match="distinct words"):
        make_canaries(101, words=WORDS, words_per_secret=2)


def test_auc_and_tpr() -> None:
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 3], [2, 2]) == 0.5
    assert auc([2], [2]) == 0.5
    assert tpr_at_fpr([5, 4, 1], [3, 2, 0, 0], max_fpr=0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr([5, 4, 1], [3, 2, 0, 0], max_fpr=0.25) == pytest.approx(2 / 3)


def test_clopper_pearson_matches_closed_forms() -> None:
    # With 0 or n successes the exact interval has a closed form: (alpha/2)^(1/n).
    lo, hi = clopper_pearson(10, 10, alpha=0.1)
    assert hi == 1.0 and lo == pytest.approx(0.05 ** (1 / 10))
    lo, hi = clopper_pearson(0, 10, alpha=0.1)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.05 ** (1 / 10))
    lo, hi = clopper_pearson(5, 10, alpha=0.05)
    assert lo < 0.5 < hi and lo == pytest.approx(1 - hi)


def test_lower_bound_is_zero_without_separation() -> None:
    scores = [float(i) for i in range(50)]
    assert epsilon_lower_bound(scores[::2], scores[1::2], delta=1e-5) == 0.0


def test_perfect_separation_proves_what_its_sample_size_allows() -> None:
    n = 500
    members, nonmembers = [1.0] * n, [0.0] * n
    bound = epsilon_lower_bound(members, nonmembers, delta=1e-5, confidence=0.95)
    alpha = 0.05 / 2  # two thresholds (0.0 and 1.0), Bonferroni
    tpr_lo, fpr_hi = (alpha / 2) ** (1 / n), 1 - (alpha / 2) ** (1 / n)
    assert bound == pytest.approx(math.log((tpr_lo - 1e-5) / fpr_hi), rel=1e-9)
    assert bound > 4  # a total leak is far above epsilon 1
    assert epsilon_lower_bound(members[:10], nonmembers[:10], delta=1e-5) < bound  # fewer canaries, weaker proof


def test_result_is_json_safe() -> None:
    result = membership_result([2.0, 3.0], [1.0, 0.0], claimed_epsilon=math.inf, delta=1e-3)
    assert result.auc == 1.0 and result.to_dict()["claimed_epsilon"] is None
    assert membership_result([1.0], [0.0], claimed_epsilon=1.0, delta=1e-3).to_dict()["claimed_epsilon"] == 1.0


def test_run_canary_audit_inserts_a_random_half() -> None:
    canaries = make_canaries(20, words=WORDS)
    seen: list[Canary] = []

    def train(inserted: list[Canary]) -> set[str]:
        seen.extend(inserted)
        return {c.secret for c in inserted}

    def score(model: set[str], items: list[Canary]) -> list[float]:
        return [1.0 if c.secret in model else 0.0 for c in items]  # a model that leaks everything

    result = run_canary_audit(canaries, train=train, score=score, claimed_epsilon=1.0, delta=1e-3, seed=3)  # type: ignore[arg-type]
    assert len(seen) == 10 and set(seen) < set(canaries)
    assert (result.members, result.nonmembers, result.auc, result.tpr_at_low_fpr) == (10, 10, 1.0, 1.0)
    assert result.epsilon_lower_bound > 0.0
    other = run_canary_audit(canaries, train=train, score=score, claimed_epsilon=1.0, delta=1e-3, seed=4)  # type: ignore[arg-type]
    assert other.auc == 1.0 and set(seen[:10]) != set(seen[10:])  # the split depends on the seed
    with pytest.raises(ValueError, match="one finite score per canary"):
        run_canary_audit(
            canaries, train=train, score=lambda m, items: [math.nan] * len(items), claimed_epsilon=1.0, delta=1e-3
        )  # type: ignore[arg-type]
