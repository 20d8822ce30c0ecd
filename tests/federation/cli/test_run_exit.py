"""Issue 14, finding 4, at the CLI: a run whose rounds made no global adapter exits non-zero.

Before, such a run reported `finished` and `fedseek run` exited 0. The ServerApp now writes
`failed` with an error naming the sites (tests/coordinator/test_strategy.py makes those
summaries; tests/redteam/test_round_failure.py runs it all with real processes); here
`fedseek run` is followed from the summary on, since submitting needs a running SuperLink.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coordinator import runs
from federation.cli.main import main
from federation.ops.layout import CoordinatorLayout

ERROR = (
    "round 1 made no global adapter (2 valid updates, min-nodes 3); dropped or rejected: site-c (node-33): "
    "Error: Node Unavailable; charged for this round with no adapter made: site-a (node-11) epsilon 0.250, "
    "site-b (node-22) epsilon 0.250; later rounds not started"
)


def _coordinator(tmp_path: Path, summary: dict[str, Any]) -> Path:
    """A coordinator state whose registry holds `summary` as run `r1`."""
    state = tmp_path / "coord"
    endpoints = CoordinatorLayout(state).endpoints
    endpoints.parent.mkdir(parents=True)
    endpoints.write_text(json.dumps({"registry": str(state / "registry")}))
    (state / "registry" / "runs").mkdir(parents=True)
    (state / "registry" / "runs" / "r1.json").write_text(json.dumps(summary))
    return state


def _round(version: str | None) -> dict[str, Any]:
    return {"round": 1, "version": version, "accepted": ["site-a"], "eval_loss": {}, "rejected": {}, "not_ready": {}}


def _run(state: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(runs, "submit_run", lambda *a, **k: "1")
    return main(["run", "--state", str(state), "--name", "r1", "--min-nodes", "3", "--timeout", "10"])


def test_a_failed_run_exits_2_with_one_line_naming_the_sites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _coordinator(tmp_path, {"status": "failed", "error": ERROR, "rounds": [_round(None)]})
    assert _run(state, monkeypatch) == 2
    out, err = capsys.readouterr()
    assert err == f"fedseek: error: run r1 failed: {ERROR}\n"
    assert out == "round 1: no global adapter\n"


def test_a_finished_run_exits_0_and_prints_its_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = {"version": "global-v0001", "sha256": "ab" * 32}
    state = _coordinator(
        tmp_path, {"status": "finished", "rounds": [_round("global-v0001")], "global_adapter": adapter}
    )
    assert _run(state, monkeypatch) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("round 1: global-v0001 from ['site-a']")
    assert json.loads(out.split("\n", 1)[1]) == adapter
