"""The operator guide's commands, run as written (issue 17: "the operator guide's commands were run as written").

docs/OPERATOR_GUIDE.md marks each block an operator can run on one machine with `<!-- run -->` on the line
before its fence. They are run here in order, as one bash script with `set -euo pipefail`, in an empty
directory: a CA, a site enrolled by certificate request, a renewal, the CRL refreshed, an admin revoked,
a site's KEK encrypted and rotated, API keys made and revoked, a backup restored and its audit log
verified, a Prometheus configuration written. Blocks without the marker need a running daemon,
systemd or root and say so in the guide; the test checks each says why it is not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "OPERATOR_GUIDE.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[a-z]*)\s*$")
MARK = "<!-- run -->"


def blocks(text: str) -> list[tuple[int, str, bool, str]]:
    """Every fenced block: (line number, language, marked runnable, body)."""
    found: list[tuple[int, str, bool, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group("lang"):
            start, indent = i, len(m.group("indent"))
            body: list[str] = []
            i += 1
            while not FENCE.match(lines[i]):
                body.append(lines[i][indent:])
                i += 1
            marked = start > 0 and lines[start - 1].strip() == MARK
            found.append((start + 1, m.group("lang"), marked, "\n".join(body) + "\n"))
        i += 1
    return found


def fedseek_on_path() -> dict[str, str]:
    """The environment the guide's commands see: this interpreter's `fedseek` first on PATH."""
    bindir = Path(sys.executable).parent
    if not (bindir / "fedseek").exists():
        pytest.skip(f"no fedseek command beside {sys.executable} (install the package)")
    return {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def test_the_guide_marks_runnable_blocks_and_says_why_the_others_are_not_run() -> None:
    found = blocks(GUIDE.read_text())
    runnable = [b for b in found if b[2]]
    assert len(runnable) >= 12, "the guide lost its runnable blocks"
    assert all(lang == "bash" for _, lang, marked, _ in found if marked)
    for line, lang, marked, body in found:
        if lang == "bash" and not marked:
            assert body.lstrip().startswith("# not run by the test:"), f"line {line}: say why it is not run"
    text = "\n".join(body for *_, body in runnable)
    for command in (
        "fedseek ca init",
        "fedseek node enroll",
        "fedseek ca sign",
        "--accept",
        "fedseek ca revoke",
        "fedseek ca crl --pki ca --if-due",
        "fedseek backup",
        "fedseek restore",
        "fedseek keys rotate",
        "fedseek audit verify",
    ):
        assert command in text, f"no runnable block runs `{command}`"


def test_the_guides_runnable_blocks_run_as_written(tmp_path: Path) -> None:
    env = fedseek_on_path()
    script = ["set -euo pipefail"]
    for line, _lang, marked, body in blocks(GUIDE.read_text()):
        if marked:
            script += [f"echo '### docs/OPERATOR_GUIDE.md block at line {line}'", body]
    work = tmp_path / "operator"
    work.mkdir()
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    # What the blocks did, checked from the files they left, not only their exit codes.
    assert "### docs/OPERATOR_GUIDE.md block" in done.stdout
    assert (work / "site-a" / "pki" / "site-a" / "key.pem").exists()
    assert not (work / "ca" / "site-a" / "key.pem").exists()
    assert (
        "revoked"
        in subprocess.run(
            ["fedseek", "ca", "list", "--pki", "ca"], cwd=work, env=env, capture_output=True, text=True, timeout=120
        ).stdout
    )
    assert list((work / "site-a" / "data" / "train").glob("*.jsonl.enc"))
    assert not list((work / "site-a" / "data" / "train").glob("*.jsonl"))
    # The restored audit log is the site's, record for record, then the restore's own record.
    restored = (work / "restored" / "state" / "audit.jsonl").read_text()
    assert restored.startswith((work / "site-a" / "state" / "audit.jsonl").read_text())
    assert '"action":"state.restored"' in restored.splitlines()[-1].replace(" ", "")
    for action in ("at_rest.encrypted", "kek.rotated", "key.created", "key.revoked"):
        assert f'"action":"{action}"' in restored.replace(" ", ""), f"no {action} in the restored audit log"
    assert "OK:" in done.stdout
    if shutil.which("promtool"):
        shutil.copy(ROOT / "deploy" / "monitoring" / "alerts.yml", work / "alerts.yml")
        checked = subprocess.run(
            ["promtool", "check", "config", "--syntax-only", "prometheus.yml"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
