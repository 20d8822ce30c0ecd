"""Issue 17: a command given a path that is not there says so, names it, and exits 2 - never a blank
success, and never a verdict (OK, TAMPERED) about a file that does not exist."""

from __future__ import annotations

import json
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


def test_the_cli_refuses_a_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.json"
    node = {"name": "site-a", "model_dir": "m", "data_dir": "d", "state_dir": "s", "pki_dir": "p"}
    path.write_text(json.dumps({**node, "api_port": "abc"}))
    assert main(["doctor", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedseek: error: {path}: field 'api_port': expected int, got \"abc\"\n"
