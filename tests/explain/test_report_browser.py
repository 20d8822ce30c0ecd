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
