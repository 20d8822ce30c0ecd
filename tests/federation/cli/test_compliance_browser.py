"""The compliance report in a real browser (headless Chromium): no console error, no request, summary on screen.

Chromium opens the report from disk with every request sent through a local proxy this test runs
(so a request for anything, even a host that does not resolve, is seen) and its console logged to
stderr. A control page with a console error and a remote image shows both detectors work. The
summary must be on the first screen: the verdict badge and the green (pass) or red (fail) result
cells are looked for in the top of the screenshot, and the DOM Chromium built holds no script.
"""

from __future__ import annotations

import http.server
import shutil
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from federation.cli.main import main
from tests.federation.cli.compliance_site import Site, build_site, restore

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian package `chromium` is not installed (scripts/setup.sh installs it)"
)

# Chromium's own background connections (update checks, sign-in, network time), made whatever page it
# shows. A page's request to one of these would also be a CSP violation on the console, which is checked.
BROWSER_OWN = {"update.googleapis.com", "accounts.google.com", "clients2.google.com"}
WIDTH, HEIGHT = 1200, 900


class _Proxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.seen: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                proxy.seen.append(self.path)
                self.send_response(403)
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_CONNECT = _refuse

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def proxy() -> Iterator[_Proxy]:
    server = _Proxy()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass(frozen=True)
class Rendered:
    console: list[str]
    requests: list[str]
    shot: np.ndarray  # the first screen, RGB
    dom: str


def _chromium(page: Path, proxy: _Proxy, profile: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-pings",
        "--disable-features=NetworkTimeServiceQuerying",
        f"--user-data-dir={profile}",
        f"--proxy-server=http://127.0.0.1:{proxy.server_address[1]}",
        "--proxy-bypass-list=<-loopback>",  # even 127.0.0.1 goes through the proxy
        "--enable-logging=stderr",
        "--v=0",
        f"--window-size={WIDTH},{HEIGHT}",
        *mode,
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _render(page: Path, proxy: _Proxy, tmp: Path) -> Rendered:
    proxy.seen.clear()
    png = tmp / f"{page.stem}.png"
    shot = _chromium(page, proxy, tmp / "profile-shot", f"--screenshot={png}")
    dump = _chromium(page, proxy, tmp / "profile-dom", "--dump-dom")
    console = [line for proc in (shot, dump) for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    requests = [r for r in proxy.seen if _host(r) not in BROWSER_OWN]
    return Rendered(console, requests, np.asarray(Image.open(png).convert("RGB")), dump.stdout)


def _host(request: str) -> str:
    """The host a proxied request is for: `host:port` (CONNECT) or an absolute URL (GET)."""
    return (urlsplit(request).hostname or "") if "://" in request else request.rsplit(":", 1)[0]


def _colour(shot: np.ndarray, rgb: tuple[int, int, int]) -> int:
    """Pixels within a few levels of `rgb` (the report's pass green or fail red)."""
    return int((np.abs(shot.astype(int) - np.array(rgb)).max(axis=2) <= 6).sum())


GREEN, RED = (0x16, 0xA3, 0x4A), (0xDC, 0x26, 0x26)


def test_the_detectors_see_a_console_error_and_a_request(proxy: _Proxy, tmp_path: Path) -> None:
    bad = tmp_path / "control.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><p>control</p><script>console.error("control-error")</script>'
        '<img src="http://compliance-control.invalid/x.png"></body></html>',
        encoding="utf-8",
    )
    rendered = _render(bad, proxy, tmp_path)
    assert any("control-error" in line for line in rendered.console), rendered.console
    assert "http://compliance-control.invalid/x.png" in rendered.requests


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return build_site(tmp_path_factory.mktemp("compliance-browser"))


def _write_report(site: Site, out: Path) -> int:
    return main(
        ["compliance", "report", "--site", str(site.state), "--witness", str(site.coord), "--site-keys",
         str(site.site_keys), "--out", str(out)]
    )  # fmt: skip


def test_the_report_renders_cleanly_with_the_summary_on_the_first_screen(
    built: Site, proxy: _Proxy, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    assert _write_report(built, out) == 0
    rendered = _render(out, proxy, tmp_path)
    assert rendered.console == []  # no error, no CSP violation, nothing logged at all
    assert rendered.requests == []  # self-contained: nothing fetched
    assert "<script" not in rendered.dom.lower()  # the `<script>` labels stayed text
    assert "&lt;script&gt;" in rendered.dom and 'id="summary"' in rendered.dom
    assert rendered.shot.shape == (HEIGHT, WIDTH, 3)
    assert len(np.unique(rendered.shot.reshape(-1, 3), axis=0)) > 50  # text and tables, not a blank page
    assert _colour(rendered.shot, GREEN) > 8 * 2000  # the verdict badge and the eight PASS cells, on screen
    assert _colour(rendered.shot, RED) == 0


def test_a_failed_check_is_red_on_the_first_screen(built: Site, proxy: _Proxy, tmp_path: Path) -> None:
    restore(built.snapshot, built.state)  # the last test of the module: the rolled-back site
    out = tmp_path / "report.html"
    assert _write_report(built, out) == 1
    rendered = _render(out, proxy, tmp_path)
    assert rendered.console == [] and rendered.requests == []
    assert _colour(rendered.shot, RED) > 3 * 2000  # the verdict and the two witnessed checks
