"""`fedseek model list|promote|rollback|policy`: arguments, and what a person reads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from federation.cli.main import build_parser, main
from federation.cli.model import _show
from node.release import Release, ReleasePolicy
from privacy.audit import AuditTrail

NODE = ["--node", "https://localhost:1", "--ca", "ca.pem", "--cert", "c.pem", "--key", "k.pem"]


def test_the_commands_parse_and_keep_model_tiny() -> None:
    parser = build_parser()
    assert parser.parse_args(["model", "promote", "global-v0003", *NODE]).version == "global-v0003"
    assert parser.parse_args(["model", "rollback", *NODE]).version is None
    args = parser.parse_args(["model", "policy", "--share", "0.25", "--min-requests", "10", *NODE])
    assert (args.share, args.min_requests, args.tolerance) == (0.25, 10, None)
    assert parser.parse_args(["model", "tiny", "--out", "x"]).out == "x"


def test_an_unreadable_admin_certificate_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model", "list", "--node", "https://localhost:1", "--ca", str(tmp_path / "missing.pem")]
    assert main([*argv, "--cert", "c.pem", "--key", "k.pem"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fedseek: error: cannot load the CA")


def test_list_shows_each_version_status_share_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release = Release(tmp_path / "release.json", audit=AuditTrail(tmp_path / "audit.jsonl"), base_eval_loss=2.0)
    release.set_policy(ReleasePolicy(share=0.25, min_requests=50), actor="admin")
    release.offer("global-v0001", eval_loss=9.0)  # rolled back: worse than the stable (the base model)
    release.offer("global-v0002", eval_loss=1.9)
    release.served("global-v0002", ok=True)
    _show(argparse.Namespace(json=False), release.to_json())
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("stable: base  candidate: global-v0002  (share 0.25")
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert rows["base"][1:3] == ["stable", "0.75"]
    assert rows["global-v0002"][1:6] == ["candidate", "0.25", "1.9000", "1", "0"]
    assert rows["global-v0001"][1:3] == ["retired", "0.00"] and "eval loss 9.0000 worse" in out[3]
