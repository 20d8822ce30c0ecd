"""`fedseek budget add-partition` (issue 14): an explicit, audited operator command adds a new batch of data
with a full budget; the old data's fingerprint is refused. `fedseek budget` shows every partition."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from federation.cli.main import main
from federation.ops.layout import NodeLayout
from privacy.audit import AuditTrail
from privacy.ledger import Budget, PrivacyLedger

ROW = {"messages": [{"role": "user", "content": "Chest pain?"}, {"role": "assistant", "content": "Cardiology"}]}


def _batch(path: Path, n: int, tag: str) -> str:
    path.write_text("".join(json.dumps({**ROW, "id": f"{tag}-{i}"}) + "\n" for i in range(n)))
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def site(tmp_path: Path) -> tuple[NodeLayout, str]:
    """A site whose ledger was made for its first batch and spent one round on it."""
    layout = NodeLayout(tmp_path / "state")
    layout.root.mkdir()
    first = _batch(tmp_path / "2025-01.jsonl", 3, "jan")
    ledger = PrivacyLedger(layout.ledger, budget=Budget(), dataset_sha256=first, audit=AuditTrail(layout.audit))
    plan = ledger.plan_round(sample_rate=0.5, steps=2, rounds_left=1, run_id="r1", share=0.5)
    ledger.complete(ledger.charge(run_id="r1", round=1, plan=plan, max_grad_norm=1.0).id, steps=2)
    return layout, first


def _audit(layout: NodeLayout) -> list[dict[str, object]]:
    return [json.loads(line) for line in layout.audit.read_text().splitlines()]


def test_add_partition_registers_a_new_batch_and_refuses_the_old_data(
    site: tuple[NodeLayout, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout, first = site
    new = _batch(tmp_path / "2025-02.jsonl", 2, "feb")
    state = str(layout.root)
    assert main(["budget", "add-partition", "--state", state, "--data", str(tmp_path / "2025-02.jsonl")]) == 0
    assert new in capsys.readouterr().out
    added = _audit(layout)[-1]
    assert (added["actor"], added["action"]) == ("operator", "ledger.partition")
    assert added["details"]["partition"] == new and added["details"]["records"] == 2  # type: ignore[index]

    # the first batch again, under another name: refused (409), audited, nothing written
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "2025-01.jsonl").read_bytes())
    before = PrivacyLedger.open_existing(layout.ledger).entries()
    assert main(["budget", "add-partition", "--state", state, "--data", str(tmp_path / "copy.jsonl")]) != 0
    err = capsys.readouterr().err
    assert "already in this ledger (the ledger's genesis" in err and "never gets a fresh budget" in err
    assert PrivacyLedger.open_existing(layout.ledger).entries() == before
    refused = _audit(layout)[-1]
    assert (refused["actor"], refused["action"]) == ("operator", "ledger.partition.refused")

    assert main(["budget", "--state", state, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(p["sha256"], p["label"], p["rounds"]) for p in report["partitions"]] == [
        (first, "", 1),
        (new, "2025-02.jsonl", 0),
    ]
    assert report["partitions"][1]["epsilon_remaining"] == 1.0
    assert main(["budget", "--state", state, "--plot", str(tmp_path / "b.png")]) == 0
    text = capsys.readouterr().out
    assert f"partition 2025-02.jsonl {new[:19]}: epsilon 0.0000 over 0 rounds, 1.0000 left [active]" in text
    assert "+ partition 2025-02.jsonl" in text and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_add_partition_refuses_a_batch_that_is_not_training_data(site: tuple[NodeLayout, str], tmp_path: Path) -> None:
    layout, _ = site
    (tmp_path / "bad.jsonl").write_text("not json\n")
    before = layout.ledger.read_bytes()
    assert main(["budget", "add-partition", "--state", str(layout.root), "--data", str(tmp_path / "bad.jsonl")]) != 0
    assert layout.ledger.read_bytes() == before


def test_budget_without_state_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["budget"]) != 0
    assert "--state" in capsys.readouterr().err
