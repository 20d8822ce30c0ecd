"""Are the node's SHAP explanations faithful to the real (tiny) model?

Every coalition of the prompt's features is scored on the real model, so exact Shapley and
exact Owen values can be compared with explain_text's. A prompt this short gets exact Shapley
values (shap's ExactExplainer); longer prompts get Owen values, forced here with
method="partition". Owen values follow shap's token hierarchy, so they equal Shapley values
only when features don't interact across it; a random network interacts a lot, so their rank
agreement is measured, not assumed perfect.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from explain.attribution import _MASK_TOKEN, Attribution, _FaithfulText, explain_text, prompt_masker
from explain.faithfulness import measure_faithfulness
from federation.protocol import wire
from node.engine import ModelHost
from node.model import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = [{"role": "system", "content": "You are a hospital triage assistant. Answer with one department name."}]
PROMPT = "Chest pain, troponin high."
RESPONSE = " cardiology ward"
# Random adapters, larger than a trained one, so the tiny model's log-probs vary by ~0.3-1 nat
# across coalitions instead of ~0.06 (the base model is close to uniform over the vocabulary).
ADAPTER_SEEDS = (0, 1, 2)
ADAPTER_SCALE = 0.5
MAX_EVALS = 500


@dataclass
class Case:
    version: str
    table: np.ndarray  # (2**n, T): log-probs of each response token; row index = bitmask of present features
    attribution: Attribution  # Owen values (method="partition")
    evals: int
    shapley: Attribution  # method="auto", which picks exact Shapley values for this short prompt
    shapley_evals: int
    score: Callable[[Sequence[str]], np.ndarray]  # the explainer's scorer for this adapter


def _bits(mask: Sequence[bool]) -> int:
    return sum(1 << i for i, on in enumerate(mask) if on)


def exact_shapley(table: np.ndarray, n: int) -> np.ndarray:
    """Shapley values (n, T) from the value of every coalition."""
    weights = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    phi = np.zeros((n, table.shape[1]))
    for coalition in range(2**n):
        size = coalition.bit_count()
        for i in range(n):
            if not coalition >> i & 1:
                phi[i] += weights[size] * (table[coalition | 1 << i] - table[coalition])
    return phi


def exact_owen(table: np.ndarray, n: int, linkage: np.ndarray) -> np.ndarray:
    """Owen values (n, T) for a binary hierarchy, by definition: at each level the sibling
    group is present or absent with weight 1/2 (a two-player Shapley game)."""
    children = {n + k: (int(row[0]), int(row[1])) for k, row in enumerate(linkage)}

    def members(node: int) -> int:
        if node < n:
            return 1 << node
        a, b = children[node]
        return members(a) | members(b)

    owen = np.zeros((n, table.shape[1]))
    for i in range(n):
        siblings, node = [], 2 * n - 2
        while node != i:
            a, b = children[node]
            inside, other = (a, b) if members(a) >> i & 1 else (b, a)
            siblings.append(members(other))
            node = inside
        for present in itertools.product((0, 1), repeat=len(siblings)):
            coalition = sum(s for s, on in zip(siblings, present, strict=True) if on)
            owen[i] += (table[coalition | 1 << i] - table[coalition]) / 2 ** len(siblings)
    return owen


def deletion_auc(table: np.ndarray, n: int, order: Sequence[int]) -> float:
    """Mean summed log-prob over the prompt with 0, 1, ..., n features deleted in `order`."""
    coalition, scores = 2**n - 1, [float(table[2**n - 1].sum())]
    for i in order:
        coalition &= ~(1 << int(i))
        scores.append(float(table[coalition].sum()))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def masker(tiny_model_dir: Path) -> _FaithfulText:
    _, tok = load_model(tiny_model_dir)
    return _FaithfulText(tok, mask_token=_MASK_TOKEN, collapse_mask_token=True)


@pytest.fixture(scope="module")
def cases(tiny_model_dir: Path, masker: _FaithfulText) -> list[Case]:
    model, tok = load_model(tiny_model_dir)
    host = ModelHost(model, tok, model_name="tiny")
    response_ids = [int(i) for i in tok(RESPONSE, add_special_tokens=False).input_ids]
    segments, _ = masker.token_segments(PROMPT)
    n = len(segments)
    # Every coalition, masked exactly as shap's masker renders it (row index = bitmask).
    coalitions = [[bool(c >> i & 1) for i in range(n)] for c in range(2**n)]
    texts = [str(masker(np.array(m), PROMPT)[0][0]) for m in coalitions]
    assert len(set(texts)) > 2**n // 2  # masking really changes the prompt
    out = []
    for seed in ADAPTER_SEEDS:
        rng = np.random.default_rng(seed)
        arrays = {
            k: rng.normal(0.0, ADAPTER_SCALE, v.shape).astype(np.float32) for k, v in host.initial_arrays().items()
        }
        version = f"v-faithful-{seed}"
        host.install(version, arrays, sha256=wire.sha256_of(arrays))
        evals = 0

        def score(prompts: Sequence[str], version: str = version) -> np.ndarray:
            # As node/explain_service.py does: earlier messages fixed, the last user message masked.
            nonlocal evals
            evals += len(prompts)
            return host.response_logprobs(
                [[*SYSTEM, {"role": "user", "content": t}] for t in prompts], response_ids, model=version
            )

        # A different batch size than explain_text's calls: the values must not depend on it.
        table = host.response_logprobs(
            [[*SYSTEM, {"role": "user", "content": t}] for t in texts], response_ids, model=version, batch_size=64
        )
        names = [tok.decode([t]) for t in response_ids]
        attribution = explain_text(score, tok, PROMPT, output_tokens=names, max_evals=MAX_EVALS, method="partition")
        assert host.last_scoring_prefix_tokens > 0  # scored through the shared-prefix KV cache
        owen_evals, evals = evals, 0
        shapley = explain_text(score, tok, PROMPT, output_tokens=names, max_evals=2**n + 2)
        out.append(Case(version, table, attribution, owen_evals, shapley, evals, score))
    return out


def test_prompt_has_a_handful_of_features(masker: _FaithfulText, cases: list[Case]) -> None:
    segments, _ = masker.token_segments(PROMPT)
    assert 8 <= len(segments) <= 10
    assert cases[0].attribution.features == [str(s) for s in segments]
    assert "".join(cases[0].attribution.features) == PROMPT


def test_model_output_is_not_flat(cases: list[Case]) -> None:
    for case in cases:
        summed = case.table.sum(axis=1)
        assert np.ptp(summed) > 0.2, case.version


def test_exact_shapley_helper_recovers_an_additive_game() -> None:
    n, weights = 4, np.array([1.5, -0.5, 0.0, 2.0])
    table = np.array([[sum(w for i, w in enumerate(weights) if c >> i & 1)] for c in range(2**n)])
    np.testing.assert_allclose(exact_shapley(table, n)[:, 0], weights, atol=1e-12)
    linkage = np.array([[0, 1, 1, 2], [2, 3, 1, 2], [4, 5, 2, 4]], dtype=float)
    np.testing.assert_allclose(exact_owen(table, n, linkage)[:, 0], weights, atol=1e-12)


def test_explanation_is_the_exact_owen_value_of_the_model(masker: _FaithfulText, cases: list[Case]) -> None:
    """The full partition was explored, and shap's values are the model's exact Owen values
    for every response token: no masker, batching or KV-cache mismatch between the two."""
    linkage = masker.clustering(PROMPT)
    for case in cases:
        a, n = case.attribution, len(case.attribution.features)
        assert case.evals < MAX_EVALS  # the budget did not cut the recursion short
        np.testing.assert_allclose(a.values, exact_owen(case.table, n, linkage), atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.base_values, case.table[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.full_values, case.table[2**n - 1], atol=1e-5, rtol=0)
        shapley = exact_shapley(case.table, n)  # efficiency: both split the same total
        np.testing.assert_allclose(shapley.sum(axis=0), a.values.sum(axis=0), atol=1e-5, rtol=0)


def test_short_prompts_get_exact_shapley_values(cases: list[Case]) -> None:
    """The issue's bar: Spearman >= 0.95 against Shapley values by enumeration. With the
    budget for all 2**n coalitions, the explanation IS the exact Shapley value."""
    for case in cases:
        a, n = case.shapley, len(case.shapley.features)
        assert a.method == "shapley"
        assert case.shapley_evals <= 2**n + 2
        exact = exact_shapley(case.table, n)
        np.testing.assert_allclose(a.values, exact, atol=1e-5, rtol=0)
        rho = float(spearmanr(exact.sum(axis=1), a.total).statistic)
        assert rho >= 0.95, (case.version, rho)


def test_owen_ranks_features_like_exact_shapley(cases: list[Case]) -> None:
    """Measured on random adapters (seed-to-seed spread is large: cross-hierarchy interactions).

    Seen: rho = 0.36, 0.95, 0.45 for seeds 0, 1, 2. The bound catches scrambled or
    sign-flipped attributions (expected rho 0 or negative), not the Owen-Shapley gap itself.
    """
    rhos = []
    for case in cases:
        n = len(case.attribution.features)
        rho = float(spearmanr(exact_shapley(case.table, n).sum(axis=1), case.attribution.total).statistic)
        rhos.append(rho)
    assert min(rhos) > 0.2, rhos
    assert float(np.mean(rhos)) >= 0.5, rhos


def test_deleting_top_attributed_features_first_drops_the_score_fastest(cases: list[Case]) -> None:
    for case in cases:
        n = len(case.attribution.features)
        by_attribution = deletion_auc(case.table, n, np.argsort(-case.attribution.total, kind="stable"))
        shuffled = [deletion_auc(case.table, n, np.random.default_rng(s).permutation(n)) for s in range(20)]
        assert by_attribution < float(np.mean(shuffled)), (case.version, by_attribution, np.mean(shuffled))


def test_reported_curves_are_the_models_scores_of_the_masked_prompts(
    tiny_model_dir: Path, masker: _FaithfulText, cases: list[Case]
) -> None:
    """The deletion/insertion curves an explanation carries are the model's probabilities of the
    response on exactly the coalitions they name (the table scored every one), with the explainer's
    own scorer and masking; comprehensiveness/sufficiency are their points at top-k."""
    _, tok = load_model(tiny_model_dir)
    render = prompt_masker(tok, PROMPT)
    for case in cases:
        a, n = case.shapley, len(case.shapley.features)
        f = measure_faithfulness(
            lambda ts, c=case: np.asarray(c.score(ts), dtype=np.float64).sum(axis=1),
            render,
            a.total,
            quantity="p(response)",
            max_points=n,
            top_k=3,
        )
        order = [int(i) for i in np.argsort(-a.total, kind="stable")]
        assert f.order == order
        for m, p_del, p_ins in zip(f.deletion.steps, f.deletion.probabilities, f.insertion.probabilities, strict=True):
            removed = sum(1 << i for i in order[:m])
            assert p_del == pytest.approx(np.exp(case.table[(2**n - 1) & ~removed].sum()), rel=1e-4)
            assert p_ins == pytest.approx(np.exp(case.table[removed].sum()), rel=1e-4)
        assert 0.0 <= f.deletion.auc <= 1.0 and 0.0 <= f.insertion.auc <= 1.0
        assert f.comprehensiveness == pytest.approx(f.p_full - f.deletion.probabilities[3])
        assert f.sufficiency == pytest.approx(f.p_full - f.insertion.probabilities[3])
