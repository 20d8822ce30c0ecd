"""`fedseek key create|list|revoke` (federation/cli/keys.py): keys shown once, digests kept, audited.

The keys themselves (scopes, expiry, revocation, concurrent writers): tests/node/test_access_policy.py;
a revoked key refused by the running node: tests/node/test_access_policy_tls.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from federation.cli.main import main
from federation.ops.layout import NodeLayout
from node.api_keys import ApiKeys
from privacy.audit import AuditTrail, verify


def records(audit: AuditTrail) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit.path.read_text().splitlines() if line.strip()]


def test_key_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = NodeLayout(tmp_path / "state")
    layout.root.mkdir()
    argv = ["key", "create", "--state", str(layout.root), "--scope", "models", "--expires-in", "7d"]
    assert main([*argv, "--label", "dashboard"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0]
    assert key.startswith("fsk-") and "scopes models" in out[1]
    record = ApiKeys(layout.api_key_digests).lookup(key)
    assert record is not None and record.scopes == ("models",) and record.label == "dashboard"
    assert record.expires is not None and timedelta(days=6) < record.expires - datetime.now(UTC) <= timedelta(days=7)

    assert main(["key", "list", "--state", str(layout.root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["state"], r["scopes"]) for r in listed] == [(record.id, "active", ["models"])]
    assert key not in json.dumps(listed) and "sha256" not in listed[0]

    assert main(["key", "revoke", record.id, "--state", str(layout.root)]) == 0
    assert main(["key", "list", "--state", str(layout.root)]) == 0
    table = capsys.readouterr().out
    assert record.id in table and "revoked" in table and key not in table
    actions = [(r["action"], r["resource"]) for r in records(AuditTrail(layout.audit))]
    assert actions == [("key.created", record.id), ("key.revoked", record.id)]
    assert verify(layout.audit).ok


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--expires-in", "0d"], "--expires-in '0d'"),
        (["--expires-in", "3w"], "--expires-in '3w'"),
        (["--expires", "next tuesday"], "not an ISO 8601 time"),
        (["--expires", "2001-01-01T00:00:00Z"], "not in the future"),
    ],
)
def test_key_cli_refuses_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["key", "create", "--state", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedseek: error:") and message in err
    assert not NodeLayout(tmp_path).api_key_digests.exists()
    assert main(["key", "revoke", "key-000000000000", "--state", str(tmp_path)]) != 0
    assert main(["key", "list", "--state", str(tmp_path / "nowhere")]) != 0
