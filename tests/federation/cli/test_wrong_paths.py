"""Issue 17: a command given a path that is not there says so, names it, and exits 2 - never a blank
success, and never a verdict (OK, TAMPERED) about a file that does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.cli.main import main


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["audit", "verify", "{missing}/audit.jsonl"], "no such file: {missing}/audit.jsonl"),
        (["budget", "--state", "{missing}"], "no such directory: {missing}"),
        (["coordinator", "start", "--pki", "{missing}", "--state", "{missing}"], "no such directory: {missing}"),
        (["ca", "list", "--pki", "{missing}"], "no consortium CA in {missing}"),
        (["doctor", "--config", "{missing}/node.json"], "no such file: {missing}/node.json"),
        (["node", "start", "--config", "{missing}/node.json"], "cannot read config {missing}/node.json"),
        (["witness", "show", "--state", "{missing}"], "no coordinator state at {missing}"),
    ],
)
def test_a_missing_path_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], what: str
) -> None:
    missing = str(tmp_path / "absent")
    assert main([a.format(missing=missing) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert what.format(missing=missing) in err
    assert "OK" not in out and "TAMPERED" not in err
