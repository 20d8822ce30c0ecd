"""The site's app guard, in process: it fails closed when Flower changes under it or its trust file is unusable.

The guard's real path (SuperNode, task processes, refusals, audit records) is
tests/redteam/test_foreign_app.py.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from federation.security.app_signing import publishers_bytes
from node.app_guard import superexec
from node.app_guard.superexec import _parse_verdict, seam_problem


def _module(calls: str) -> types.ModuleType:
    """A stand-in Flower module whose run function calls only `calls`."""
    module = types.ModuleType("fake")
    namespace: dict[str, object] = {}
    exec(f"def run(): return {calls}()", namespace)
    module.run_superexec = module.run_clientapp = namespace["run"]  # type: ignore[attr-defined]
    module.get_executor = module.install_from_fab = lambda: None  # type: ignore[attr-defined]
    return module


def test_the_installed_flower_has_both_seams() -> None:
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode.runtime import run_clientapp

    assert seam_problem(run_superexec, run_clientapp) is None


def test_a_flower_that_no_longer_calls_the_seams_is_refused() -> None:
    superexec_ok, clientapp_ok = _module("get_executor"), _module("install_from_fab")
    assert seam_problem(superexec_ok, clientapp_ok) is None
    assert "get_executor" in str(seam_problem(_module("make_executor"), clientapp_ok))
    assert "install_from_fab" in str(seam_problem(superexec_ok, _module("unpack")))


def test_guard_refuses_to_start_without_a_usable_trust_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    audit = tmp_path / "audit.jsonl"
    argv = ["--runtime-api-address", "127.0.0.1:1", "--superexec-auth-secret-file", str(secret), "--audit", str(audit)]
    assert superexec.main([*argv, "--publishers", str(tmp_path / "missing.json")]) == 2
    assert "no trusted app publishers" in capsys.readouterr().err
    broken = tmp_path / "publishers.json"
    broken.write_bytes(publishers_bytes([]))
    assert superexec.main([*argv, "--publishers", str(broken)]) == 2
    assert "no publisher keys" in capsys.readouterr().err
    assert not audit.exists()  # refused before the trail is opened


@pytest.mark.parametrize("line", ["", "not json", "[]", '{"verdict": "maybe"}', '{"reason": "x"}'])
def test_a_missing_or_malformed_verdict_is_not_taken(line: str) -> None:
    assert _parse_verdict(line) is None


def test_a_verdict_keeps_only_short_scalars() -> None:
    action, details = _parse_verdict('{"verdict": "refused", "reason": "' + "x" * 1000 + '", "run_id": 7, "o": {}}')  # type: ignore[misc]
    assert action == "clientapp.refused"
    assert details == {"reason": "x" * 300, "run_id": 7}
