"""The HTML report renders in a real browser: headless Chromium screenshot is not blank."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explain.attribution import Attribution
from explain.report import ReportContext, write_report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian package `chromium` is not installed (scripts/setup.sh installs it)"
)

FEATURES = ["Patient ", "has ", "high ", "fever ", "and ", "chest ", "pain; ", "ECG ", "normal", "."]
WEIGHTS = [0.0, 0.05, 0.4, 2.0, 0.0, 0.6, 0.9, -0.3, -1.5, 0.01]


def _attribution() -> Attribution:
    values = np.array([[w, w / 2] for w in WEIGHTS])
    base = np.array([-4.0, -3.0])
    return Attribution(
        features=FEATURES,
        output_tokens=["Card", "iology"],
        values=values,
        base_values=base,
        full_values=base + values.sum(axis=0),
    )


def _screenshot(html: Path, png: Path, profile: Path) -> Image.Image:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--screenshot={png}",
        "--window-size=1200,900",
        html.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    return Image.open(png).convert("RGB")


def test_report_renders_with_highlights(tmp_path: Path) -> None:
    ctx = ReportContext(
        model="tiny-deepseek-v3",
        adapter_version="v2",
        adapter_sha256="cd" * 32,
        requested_by="127.0.0.1",
        created_at="2025-11-28T00:00:00Z",
        audit_record="7:" + "ab" * 32,
        response="Cardiology",
    )
    html = write_report(_attribution(), ctx, html_path=tmp_path / "r.html", png_path=tmp_path / "r.png")
    shot = _screenshot(html, tmp_path / "shot.png", tmp_path / "profile")
    assert shot.size == (1200, 900)

    pixels = np.asarray(shot).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 50  # text, tables and highlights, not a blank page
    r, g, b = pixels.T
    red = (r > 180) & (g < 140) & (b < 140) & (r - g > 80)  # "fever" (and the plot's bars)
    blue = (b > 180) & (r < 140) & (b - r > 80) & (b - g > 40)  # "normal"
    assert red.sum() > 200, "no red highlight rendered"
    assert blue.sum() > 200, "no blue highlight rendered"


# ---- Chinese ------------------------------------------------------------------------------

ZH_PROMPT = "患者胸痛三小时，肌钙蛋白升高。心电图正常；请问应转诊哪个科室？"
ZH_RESPONSE = "心内科"
# Private-use code points: no font has glyphs for them, so they render as the missing-glyph box,
# which is what Chinese renders as on a machine without a CJK font.
_PUA = {c: chr(0xE000 + i) for i, c in enumerate(sorted(set(ZH_PROMPT + ZH_RESPONSE)))}


def _zh_report(tmp_path: Path, *, boxes: bool = False) -> Path:
    """The report of a Chinese prompt; with ``boxes``, the same report (same features, weights and
    layout) with every Chinese character swapped for a glyphless code point."""
    from explain.granularity import WORDS

    def swap(text: str) -> str:
        return "".join(_PUA.get(c, c) for c in text) if boxes else text

    features = WORDS.split(ZH_PROMPT)
    weights = np.array([2.0 if f in ("胸痛", "肌钙蛋白") else 0.1 for f in features])
    values = np.stack([weights, weights / 3], axis=1)
    attribution = Attribution(
        features=[swap(f) for f in features],
        output_tokens=[swap("心"), swap("内科")],
        values=values,
        base_values=np.array([-4.0, -3.0]),
        full_values=np.array([-4.0, -3.0]) + values.sum(axis=0),
        method="shapley",
    )
    ctx = ReportContext(
        model="tiny-deepseek-v3",
        adapter_version="global-v0001",
        adapter_sha256="cd" * 32,
        requested_by="reviewer",
        created_at="2026-12-06T00:00:00Z",
        audit_record="7:" + "ab" * 32,
        response=swap(ZH_RESPONSE),
        granularity="word",
        response_source="supplied",
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_report(attribution, ctx, html_path=tmp_path / "zh.html", png_path=tmp_path / "zh.png")


def _dump_dom(html: Path, profile: Path) -> str:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
        "--dump-dom",
        html.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, encoding="utf-8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_chinese_prompt_reaches_the_page_intact(tmp_path: Path) -> None:
    """What the browser parsed (its DOM, serialised back) holds the prompt character for character."""
    import html as html_lib
    import re

    page = _zh_report(tmp_path)
    dom = _dump_dom(page, tmp_path / "profile")
    assert "\ufffd" not in dom  # no byte decoded with the wrong charset
    prompt_div = re.search(r'<div class="text prompt" lang="zh">(.*?)</div>', dom, re.S)
    assert prompt_div is not None, dom[:2000]
    assert html_lib.unescape(re.sub(r"<[^>]+>", "", prompt_div.group(1))) == ZH_PROMPT
    response_div = re.search(r'<div class="text response" lang="zh">(.*?)</div>', dom, re.S)
    assert response_div is not None and html_lib.unescape(response_div.group(1)) == ZH_RESPONSE
    assert "\u201c心内科\u201d" in html_lib.unescape(dom)  # the title and summary quote it


def _has_cjk_font() -> bool:
    fc = shutil.which("fc-list")
    if fc is None:
        return False
    return bool(subprocess.run([fc, ":lang=zh"], capture_output=True, text=True, check=False).stdout.strip())


@pytest.mark.skipif(
    not _has_cjk_font(), reason="no CJK font (fc-list :lang=zh); scripts/setup.sh installs fonts-wqy-microhei"
)
def test_chinese_renders_as_glyphs_not_boxes(tmp_path: Path) -> None:
    """The same report with every Chinese character swapped for a glyphless code point would look
    identical if Chinese fell back to the missing-glyph box; it must not."""
    zh = _screenshot(_zh_report(tmp_path / "zh"), tmp_path / "zh.png", tmp_path / "p1")
    pua = _screenshot(_zh_report(tmp_path / "pua", boxes=True), tmp_path / "pua.png", tmp_path / "p2")
    a, b = np.asarray(zh).astype(int), np.asarray(pua).astype(int)
    differing = np.any(a != b, axis=2)
    assert differing.sum() > 2000, "Chinese text rendered like glyphless boxes"
